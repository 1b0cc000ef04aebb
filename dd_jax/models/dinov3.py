"""DINOv3 ViT backbone (Meta's seven released sizes and custom ones) in Flax NNX.

Computes what Meta's `DinoVisionTransformer` computes (SPEC.md §2.1): patch features after the
final LayerNorm, with the class and storage tokens available on request. Eval mode by default;
given `rope_scale`, the train-mode RoPE coordinate rescale of Meta's released configs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import kernels

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

FFN_KINDS = ("mlp", "swiglu")


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
  """Architecture of a DINOv3 ViT. `ffn_hidden` is the resolved hidden width of the FFN."""
  dim: int
  depth: int
  num_heads: int
  ffn: str  # 'mlp' (fc2(gelu(fc1 x))) or 'swiglu' (w3(silu(w1 x) * w2 x))
  ffn_hidden: int
  qkv_bias: bool  # the k third of the bias is always masked to zero when present
  patch_size: int = 16
  num_storage_tokens: int = 4
  ln_eps: float = 1e-5
  rope_base: float = 100.0

  def __post_init__(self):
    problems = []
    if self.ffn not in FFN_KINDS:
      problems.append(f"ffn={self.ffn!r} is not one of {FFN_KINDS}")
    for name in ("dim", "depth", "num_heads", "ffn_hidden", "patch_size"):
      if int(getattr(self, name)) <= 0:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if self.num_storage_tokens < 0:
      problems.append(f"num_storage_tokens={self.num_storage_tokens} must be >= 0")
    if not problems and self.dim % self.num_heads:
      problems.append(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
    elif not problems and (self.dim // self.num_heads) % 4:
      # RoPE splits each head into 4 groups (y/x, cos/sin halves).
      problems.append(f"head dim {self.dim // self.num_heads} is not a multiple of 4")
    if problems:
      raise ValueError("invalid DinoV3Config: " + "; ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.num_storage_tokens


def swiglu_hidden(dim: int, ratio: float, align: int = 8) -> int:
  """Meta's SwiGLU width: h = int(dim*ratio), d = int(2h/3), rounded up to a multiple of align."""
  d = int(int(dim * ratio) * 2 / 3)
  return d + (-d % align)


VARIANTS: dict[str, DinoV3Config] = {
    "dinov3_vits16": DinoV3Config(384, 12, 6, "mlp", 1536, True),
    "dinov3_vits16plus": DinoV3Config(384, 12, 6, "swiglu", swiglu_hidden(384, 6), True),
    "dinov3_vitb16": DinoV3Config(768, 12, 12, "mlp", 3072, True),
    "dinov3_vitl16": DinoV3Config(1024, 24, 16, "mlp", 4096, True),
    "dinov3_vitl16plus": DinoV3Config(1024, 24, 16, "swiglu", swiglu_hidden(1024, 6), True),
    "dinov3_vith16plus": DinoV3Config(1280, 32, 20, "swiglu", swiglu_hidden(1280, 6), True),
    "dinov3_vit7b16": DinoV3Config(4096, 40, 32, "swiglu", swiglu_hidden(4096, 3, 64), False),
}


def get_config(variant: str, **custom: Any) -> DinoV3Config:
  """The config of a named variant ('dinov3_vitl16' or 'vitl16'), with `custom` field overrides.

  variant 'custom' builds one from the keyword fields alone: dim, depth, num_heads, ffn, qkv_bias,
  and ffn_hidden or (ffn_ratio [4], ffn_align [8]) to derive it.
  """
  custom = dict(custom)
  ffn_ratio = custom.pop("ffn_ratio", None)
  ffn_align = custom.pop("ffn_align", 8)
  if variant == "custom":
    required = {"dim", "depth", "num_heads"}
    missing = sorted(required - set(custom))
    if missing:
      raise ValueError(f"custom DINOv3 backbone: missing fields {missing} (given {sorted(custom)})")
    custom.setdefault("ffn", "mlp")
    custom.setdefault("qkv_bias", True)
    if "ffn_hidden" not in custom:
      ratio = 4.0 if ffn_ratio is None else ffn_ratio
      custom["ffn_hidden"] = (int(custom["dim"] * ratio) if custom["ffn"] == "mlp"
                              else swiglu_hidden(custom["dim"], ratio, ffn_align))
    fields = {f.name for f in dataclasses.fields(DinoV3Config)}
    unknown = sorted(set(custom) - fields)
    if unknown:
      raise ValueError(f"custom DINOv3 backbone: unknown fields {unknown}; known: {sorted(fields)}")
    return DinoV3Config(**custom)
  name = variant if variant.startswith("dinov3_") else f"dinov3_{variant}"
  if name not in VARIANTS:
    raise ValueError(f"unknown DINOv3 variant {variant!r}; known: {sorted(VARIANTS)} or 'custom'")
  if ffn_ratio is not None:
    raise ValueError("ffn_ratio only applies to variant 'custom'; override ffn_hidden instead")
  try:
    return dataclasses.replace(VARIANTS[name], **custom)
  except TypeError as e:
    raise ValueError(f"DINOv3 variant {name}: bad overrides {sorted(custom)} ({e})") from None


def variant_name(config: DinoV3Config) -> str:
  """The VARIANTS name equal to `config`, or 'custom'."""
  for name, known in VARIANTS.items():
    if known == config:
      return name
  return "custom"


def default_rope_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
  """periods[j] = base ** (4j / head_dim), j < head_dim/4, computed in float32 as Meta does."""
  exponent = 2 * np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 2)
  return (np.float32(base) ** exponent).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class RopePeriods(nnx.Variable):
  """RoPE periods (head_dim/4,): a buffer from the checkpoint, never trained (not an nnx.Param)."""


_weight_init = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=_weight_init,
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class LayerNorm(nnx.Module):
  """PyTorch LayerNorm (biased variance, eps inside the sqrt); statistics always in float32."""

  def __init__(self, dim: int, eps: float, *, out_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps
    self.out_dtype = out_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps, self.out_dtype)


# LayerNorm, attention and the GELU MLP have hand-written backward passes that keep only what
# cannot be recomputed cheaply, and recompute the rest from kept inputs made to depend on the
# incoming cotangent (`_after`). Gradients: tests/test_convert_dinov3.py against torch.


def _after(x: jax.Array, ct: jax.Array) -> jax.Array:
  """x, computed only once `ct` exists (x + 0 * one element of ct). XLA:CPU removes
  optimization barriers before common-subexpression elimination, so a recomputation from x
  alone is merged back into the forward pass, keeping the activation it was meant to drop."""
  return x + (0 * ct.reshape(-1)[0]).astype(x.dtype)


def _layer_norm_stats(x: jax.Array, eps: float):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  return centred, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, out_dtype
               ) -> jax.Array:
  """PyTorch's LayerNorm over the last axis; the backward keeps only x and two statistics."""
  return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
  centred, mean, rstd = _layer_norm_stats(x, eps)
  return (centred * rstd * scale + bias).astype(out_dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, out_dtype, residuals, ct):
  del eps, out_dtype
  x, mean, rstd, scale = residuals
  x = _after(x, ct)
  normed = (x.astype(jnp.float32) - mean) * rstd
  ct = ct.astype(jnp.float32)
  rows = tuple(range(ct.ndim - 1))
  d_scale, d_bias = jnp.sum(ct * normed, axis=rows), jnp.sum(ct, axis=rows)
  g = ct * scale
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerScale(nnx.Module):
  """Per-channel gamma; returns float32 so the residual stream stays float32 under bf16."""

  def __init__(self, dim: int, init_value: float = 1e-5):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * self.gamma[...]


class PatchEmbed(nnx.Module):
  """The 16x16 stride-16 conv as reshape + matmul.

  `proj.kernel` is (p*p*3, D) with rows in (kh, kw, c) order: torch's conv weight (D, 3, p, p)
  maps to it as weight.transpose(2, 3, 1, 0).reshape(p*p*3, D).
  """

  def __init__(self, patch_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    fan_in = 3 * patch_size * patch_size
    # Meta's PatchEmbed.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / math.sqrt(fan_in)
    uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
    self.proj = nnx.Linear(fan_in, dim, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=uniform, bias_init=uniform, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) -> tokens (B, H/p * W/p, D), row-major patch order."""
    b, height, width, channels = images.shape
    p = self.patch_size
    h, w = height // p, width // p
    x = images.reshape(b, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return self.proj(x.reshape(b, h * w, p * p * channels))


class QKVProjection(nnx.Module):
  """Fused q|k|v projection (rows head-major within each third); by default the k bias is
  masked to zero.

  Meta multiplies the bias by a [1, 0, 1] mask (LinearKMaskedBias); doing the same here keeps
  the k bias out of the output and its gradient at zero when the block is trained. ViTs with a
  plain qkv bias (HaMeR's ViTPose backbone) pass mask_k_bias=False.
  """

  def __init__(self, dim: int, *, use_bias: bool, dtype, rngs: nnx.Rngs, mask_k_bias: bool = True):
    self.kernel = nnx.Param(_weight_init(rngs.params(), (dim, 3 * dim), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((3 * dim,), jnp.float32)) if use_bias else None
    self.dim = dim
    self.dtype = dtype
    self.mask_k_bias = mask_k_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("btd,de->bte", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      bias = self.bias[...]
      if self.mask_k_bias:
        mask = np.concatenate([np.ones(self.dim), np.zeros(self.dim), np.ones(self.dim)])
        bias = bias * mask.astype(np.float32)
      y = y + bias.astype(self.dtype)
    return y


def rope_cos_sin(periods: jax.Array, h: int, w: int, num_prefix_tokens: int,
                 scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin (T, head_dim) float32 for [prefix tokens, h*w patches]; with `scale` (G,) they are
  (G, T, head_dim), group g's patch coordinates multiplied by scale[g].

  Patch (i, j) has y = 2(i+0.5)/h - 1, x = 2(j+0.5)/w - 1 (times the scale: Meta's train-time
  `rescale_coords`, both axes alike); angles = 2pi [y/periods, x/periods], tiled twice. Prefix
  tokens get cos 1, sin 0: rotating them is then exactly the identity.
  """
  periods = periods.astype(jnp.float32)
  ys = 2.0 * (jnp.arange(h, dtype=jnp.float32) + 0.5) / h - 1.0
  xs = 2.0 * (jnp.arange(w, dtype=jnp.float32) + 0.5) / w - 1.0
  coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
  if scale is not None:
    coords = coords * jnp.asarray(scale, jnp.float32)[:, None, None]  # (G, hw, 2)
  lead = coords.shape[:-2]
  angles = 2.0 * jnp.pi * coords[..., None] / periods  # (..., hw, 2, hd/4)
  angles = angles.reshape(lead + (h * w, -1))
  angles = jnp.concatenate([angles, angles], axis=-1)  # (..., hw, hd)
  prefix = lead + (num_prefix_tokens, angles.shape[-1])
  cos = jnp.concatenate([jnp.ones(prefix, jnp.float32), jnp.cos(angles)], axis=-2)
  sin = jnp.concatenate([jnp.zeros(prefix, jnp.float32), jnp.sin(angles)], axis=-2)
  return cos, sin


def draw_rope_scale(rng: jax.Array, shape: tuple[int, ...], max_scale: float) -> jax.Array:
  """Meta's train-time RoPE rescale factors: exp(U(-ln max_scale, ln max_scale)) float32, i.e.
  log-uniform on [1/max_scale, max_scale] (released models: max_scale 2)."""
  log_max = math.log(max_scale)
  return jnp.exp(jax.random.uniform(rng, shape, jnp.float32, -log_max, log_max))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x*cos + rotate_half(x)*sin in float32, rotate_half = [-x2, x1] halves; cos and sin
  broadcast against x's trailing (T, hd) or are given as (T, 1, hd) for x (..., T, N, hd)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection; RoPE on q and k when cos and sin
  are given (DINOv3), none when they are None (ViTs with absolute position embeddings).

  `config` needs dim, num_heads and qkv_bias (a DinoV3Config, or another ViT's config).
  """

  def __init__(self, config: DinoV3Config, *, dtype, attention_implementation: str | None,
               rngs: nnx.Rngs, mask_k_bias: bool = True, impl: str | None = "auto"):
    self.num_heads = config.num_heads
    self.impl = kernels.resolve_dinov3_impl(impl)
    self.qkv = QKVProjection(config.dim, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs,
                             mask_k_bias=mask_k_bias)
    self.proj = _linear(config.dim, config.dim, use_bias=True, dtype=dtype, rngs=rngs)
    self.attention_implementation = attention_implementation

  def __call__(self, x: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    n = self.num_heads
    qkv = self.qkv(x).reshape(b, t, 3, n, d // n)
    if cos is None:  # no RoPE (HaMeR's ViTPose blocks)
      rope = lambda a: a
    elif cos.ndim == 2:  # one table for every row
      rope = lambda a: apply_rope(a, cos[:, None], sin[:, None])
    else:  # a table per group (G, T, hd): batch row r belongs to group r % G
      g = cos.shape[0]
      rope = lambda a: apply_rope(a.reshape((b // g, g) + a.shape[1:]), cos[:, :, None],
                                  sin[:, :, None]).reshape(a.shape)
    if self.attention_implementation is not None:  # e.g. "cudnn": a fused kernel on GPUs
      out = jax.nn.dot_product_attention(rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2],
                                         implementation=self.attention_implementation)
    else:
      attend = attention if self.impl == "custom_vjp" else attention_autodiff
      out = attend(rope(qkv[:, :, 0] * jnp.asarray((d // n) ** -0.5, qkv.dtype)),
                   rope(qkv[:, :, 1]), qkv[:, :, 2])
    return self.proj(out.reshape(b, t, d))


def _heads(x):
  """(B, T, N, hd) <-> (B, N, T, hd)."""
  return x.transpose(0, 2, 1, 3)


def _attention_forward(q, k, v):
  q, k, v = _heads(q), _heads(k), _heads(v)
  logits = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - row_max)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = _heads((out / total).astype(v.dtype))
  return out, row_max + jnp.log(total)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v for q, k, v (B, T, N, hd) (q already scaled) -> (B, T, N, hd).

  Computed heads-major, so both matmuls are plain batched matmuls; the softmax is normalised
  after the value matmul (dividing (T, hd) instead of (T, T)); logits, exponentials and sums
  are float32 for bf16 inputs too. Taking q, k, v token-major lets XLA:CPU apply RoPE while
  writing each of them once (heads-major RoPE outside wrote x and rotate_half(x) separately:
  inference ~4% slower). The backward keeps q, k, v (the same buffers), the output and the
  log-sum-exp and recomputes the (T, T) weights, as flash attention does, instead of keeping
  them for every trained block.
  """
  return _attention_forward(q, k, v)[0]


def _attention_fwd(q, k, v):
  out, log_sum_exp = _attention_forward(q, k, v)
  return out, (q, k, v, out, log_sum_exp)


def _attention_bwd(residuals, ct):
  q, k, v, out, log_sum_exp = residuals
  q = _after(q, ct)
  q, k, v = _heads(q), _heads(k), _heads(v)
  f32 = jnp.float32
  weights = jnp.exp(jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=f32)
                    - log_sum_exp)
  ct_heads = _heads(ct).astype(v.dtype)
  dv = jnp.einsum("bnqk,bnqd->bnkd", weights.astype(v.dtype), ct_heads,
                  preferred_element_type=f32)
  d_weights = jnp.einsum("bnqd,bnkd->bnqk", ct_heads, v, preferred_element_type=f32)
  # softmax backward: dlogits = w * (dw - sum_k w dw), and sum_k w dw = sum_d ct * out.
  row_dot = jnp.sum(ct.astype(f32) * out.astype(f32), axis=-1).transpose(0, 2, 1)[..., None]
  d_logits = (weights * (d_weights - row_dot)).astype(q.dtype)
  dq = jnp.einsum("bnqk,bnkd->bnqd", d_logits, k, preferred_element_type=f32)
  dk = jnp.einsum("bnqk,bnqd->bnkd", d_logits, q, preferred_element_type=f32)
  return _heads(dq.astype(q.dtype)), _heads(dk.astype(k.dtype)), _heads(dv.astype(v.dtype))


attention.defvjp(_attention_fwd, _attention_bwd)


def attention_autodiff(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`attention` differentiated by JAX (the "autodiff" implementation): the backward keeps the
  (T, T) weights instead of recomputing them."""
  return _attention_forward(q, k, v)[0]


class Mlp(nnx.Module):
  """fc2(gelu(fc1 x)); `impl` (dd_jax.kernels.DINOV3_IMPLS) picks gelu_dense's backward."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, impl: str | None = "auto"):
    self.fc1 = _linear(dim, hidden, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, use_bias=True, dtype=dtype, rngs=rngs)
    self.impl = kernels.resolve_dinov3_impl(impl)

  def __call__(self, x: jax.Array) -> jax.Array:
    fc2 = self.fc2
    fn = gelu_dense if self.impl == "custom_vjp" else gelu_dense_autodiff
    return fn(self.fc1(x), fc2.kernel[...], fc2.bias[...], fc2.dtype or x.dtype)


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1 + jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


def gelu(x: jax.Array) -> jax.Array:
  """torch.nn.GELU(): x/2 (1 + erf(x/sqrt2)), computed as torch computes it. jax.nn.gelu
  (approximate=False) goes through erfc, which XLA:CPU evaluates ~2.5x slower."""
  return x * _normal_cdf(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gelu_dense(h: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """gelu(h) @ kernel + bias computed in `dtype`; the backward keeps only h and recomputes
  gelu(h): one (tokens, hidden) activation per trained block."""
  return _dense(gelu(h.astype(dtype)), kernel, bias, dtype)


def _dense(x, kernel, bias, dtype):
  return jnp.dot(x, kernel.astype(dtype)) + bias.astype(dtype)


def _gelu_dense_fwd(h, kernel, bias, dtype):
  return gelu_dense(h, kernel, bias, dtype), (h, kernel)


def _gelu_dense_bwd(dtype, residuals, ct):
  h, kernel = residuals
  h = _after(h, ct)
  x = h.astype(dtype)
  ct = ct.astype(dtype)
  features = x.shape[-1]
  ct_rows = ct.reshape(-1, ct.shape[-1])
  d_kernel = jnp.dot(gelu(x).reshape(-1, features).T, ct_rows,
                     preferred_element_type=jnp.float32)
  d_bias = jnp.sum(ct_rows.astype(jnp.float32), axis=0)
  # d/dx [x Phi(x)] = Phi(x) + x phi(x)
  x32 = x.astype(jnp.float32)
  slope = _normal_cdf(x32) + x32 * jnp.exp(-0.5 * jnp.square(x32)) * np.float32(
      1 / math.sqrt(2 * math.pi))
  # After d_kernel, so that gelu(x) is freed before the (tokens, hidden) d(gelu) exists.
  ct = _after(ct, d_kernel)
  dh = jnp.dot(ct, kernel.astype(dtype).T, preferred_element_type=jnp.float32) * slope
  return dh.astype(h.dtype), d_kernel.astype(kernel.dtype), d_bias.astype(kernel.dtype)


gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


def gelu_dense_autodiff(h: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """`gelu_dense` differentiated by JAX (the "autodiff" implementation): the backward keeps
  gelu(h) and its slope instead of recomputing them from h."""
  return _dense(gelu(h.astype(dtype)), kernel, bias, dtype)


class SwiGLU(nnx.Module):
  """w3(silu(w1 x) * w2 x): w1 gate, w2 up, w3 down (Meta's names)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.w1 = _linear(dim, hidden, use_bias=True, dtype=dtype, rngs=rngs)
    self.w2 = _linear(dim, hidden, use_bias=True, dtype=dtype, rngs=rngs)
    self.w3 = _linear(hidden, dim, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


class Block(nnx.Module):
  """Pre-norm block: x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x). x stays float32.

  `config` needs dim, num_heads, qkv_bias, ffn, ffn_hidden and ln_eps. Other ViTs built from
  the same parts: layer_scale=False drops ls1 / ls2 (x += attn(...), x += ffn(...)),
  mask_k_bias=False keeps the whole qkv bias, and cos = sin = None skips RoPE.
  """

  def __init__(self, config: DinoV3Config, *, dtype, attention_implementation: str | None,
               rngs: nnx.Rngs, layer_scale: bool = True, mask_k_bias: bool = True,
               impl: str | None = "auto"):
    impl = kernels.resolve_dinov3_impl(impl)
    self.norm1 = LayerNorm(config.dim, config.ln_eps, out_dtype=dtype)
    self.attn = Attention(config, dtype=dtype, attention_implementation=attention_implementation,
                          rngs=rngs, mask_k_bias=mask_k_bias, impl=impl)
    self.ls1 = LayerScale(config.dim) if layer_scale else None
    self.norm2 = LayerNorm(config.dim, config.ln_eps, out_dtype=dtype)
    if config.ffn == "mlp":
      self.mlp = Mlp(config.dim, config.ffn_hidden, dtype=dtype, rngs=rngs, impl=impl)
    else:
      self.mlp = SwiGLU(config.dim, config.ffn_hidden, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(config.dim) if layer_scale else None

  def __call__(self, x: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
    x = x + self._scaled(self.ls1, self.attn(self.norm1(x), cos, sin))
    return x + self._scaled(self.ls2, self.mlp(self.norm2(x)))

  @staticmethod
  def _scaled(layer_scale: LayerScale | None, y: jax.Array) -> jax.Array:
    return y.astype(jnp.float32) if layer_scale is None else layer_scale(y)


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------


class DinoV3(nnx.Module):
  """DINOv3 ViT. Params are float32; `dtype` is the compute dtype of the matmuls.

  LayerNorm statistics, RoPE, softmax and the residual stream are float32 whatever `dtype` is.
  `attention_implementation`: None = dd_jax's own heads-major attention (the fastest on CPU),
  or a jax.nn.dot_product_attention implementation ('xla', 'cudnn'). `impl`: how the blocks'
  backward passes are built, "auto" (by backend and CPU flags) or one of
  dd_jax.kernels.DINOV3_IMPLS; the environment variable DD_JAX_DINOV3_IMPL overrides it.
  """

  def __init__(self, config: DinoV3Config, *, dtype=jnp.float32,
               attention_implementation: str | None = None, rngs: nnx.Rngs,
               impl: str | None = "auto"):
    self.config = config
    self.dtype = dtype
    d = config.dim
    self.patch_embed = PatchEmbed(config.patch_size, d, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
    self.storage_tokens = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, config.num_storage_tokens, d), jnp.float32))
    self.rope_periods = RopePeriods(
        jnp.asarray(default_rope_periods(config.head_dim, config.rope_base)))
    self.blocks = nnx.List([
        Block(config, dtype=dtype, attention_implementation=attention_implementation, rngs=rngs,
              impl=impl)
        for _ in range(config.depth)])
    self.norm = LayerNorm(d, config.ln_eps, out_dtype=jnp.float32)

  def __call__(self, images: jax.Array, *, rope_scale: jax.Array | None = None,
               return_extras: bool = False) -> jax.Array | dict[str, Any]:
    """images (B, H, W, 3) NHWC, H and W multiples of the patch size.

    rope_scale: None (eval mode), or (depth, G) train-mode RoPE rescale factors: block i
    multiplies the patch coordinates of batch rows r with r % G == g by rope_scale[i, g] (Meta
    draws a factor per block and forward; G > 1 runs several forwards as one batch).

    Returns the final-normed patch features (B, H/p, W/p, D) float32; with return_extras a dict
    {"patch": that, "cls": (B, D), "storage": (B, S, D) (both final-normed), "blocks": a list of
    every block's raw output (B, 1+S+hw, D) float32, before the final norm (apply `self.norm`
    for DINOv3's get_intermediate_layers(norm=True))}.
    """
    b, height, width, channels = images.shape
    p = self.config.patch_size
    if height % p or width % p or channels != 3:
      raise ValueError(f"DinoV3 input of shape {images.shape}: expected (B, H, W, 3) with H and W "
                       f"multiples of the patch size {p}")
    h, w = height // p, width // p
    patches = self.patch_embed(images).astype(jnp.float32)
    d = self.config.dim
    prefix = jnp.concatenate([self.cls_token[...], self.storage_tokens[...]], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(prefix, (b, prefix.shape[1], d)), patches], axis=1)
    n = self.config.num_prefix_tokens
    periods = self.rope_periods[...]
    if rope_scale is None:
      tables = [rope_cos_sin(periods, h, w, n)] * len(self.blocks)
    else:
      rope_scale = jnp.asarray(rope_scale, jnp.float32)
      if rope_scale.ndim != 2 or rope_scale.shape[0] != len(self.blocks) or b % rope_scale.shape[1]:
        raise ValueError(f"rope_scale of shape {rope_scale.shape}: expected (depth "
                         f"{len(self.blocks)}, groups) with the batch {b} a multiple of groups")
      tables = [rope_cos_sin(periods, h, w, n, scale) for scale in rope_scale]
    block_outputs = []
    for block, (cos, sin) in zip(self.blocks, tables):
      x = block(x, cos, sin)
      if return_extras:
        block_outputs.append(x)
    x = self.norm(x)
    patch = x[:, n:].reshape(b, h, w, d)
    if not return_extras:
      return patch
    return {"patch": patch, "cls": x[:, 0], "storage": x[:, 1:n], "blocks": block_outputs}


def config_differences(found: DinoV3Config, wanted: DinoV3Config, *, found_as: str) -> list[str]:
  """["depth: {found_as} 2, config 3", ...] for every field where `found` differs from `wanted`."""
  return [f"{f.name}: {found_as} {getattr(found, f.name)!r}, config {getattr(wanted, f.name)!r}"
          for f in dataclasses.fields(wanted) if getattr(found, f.name) != getattr(wanted, f.name)]
