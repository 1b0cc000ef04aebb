"""HaMeR (Pavlakos et al., CVPR 2024) in Flax NNX: a ViTPose-H backbone and a MANO transformer
decoder head, computing what geopavlakos/hamer computes in eval mode (docs/hamer.md).

Input: the 256x256 crop HaMeR's preprocessing makes (dd_jax.priors.preprocess), NHWC,
ImageNet-normalised; the backbone sees its central 192 columns. Output: MANO rotation matrices
(global orientation + 15 joints), betas and the weak-perspective crop camera (s, tx, ty). The
3D keypoints come from dd_jax's MANO (`keypoints_3d`). Built from the DINOv3 blocks (LayerNorm,
attention, GELU MLP) with HaMeR's differences as parameters: LayerNorm eps 1e-6 in the backbone
and 1e-5 in the head, a plain (unmasked) qkv bias, no LayerScale, no RoPE.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dd_jax import geometry
from dd_jax.mano import model as mano_model
from dd_jax.models import dinov3

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

NUM_HAND_JOINTS = 15
NUM_BETAS = 10
ROTATION_6D = 6


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """HaMeR's ViTPose backbone. Field names follow DinoV3Config where they mean the same."""
  dim: int = 1280
  depth: int = 32
  num_heads: int = 16
  ffn_hidden: int = 5120
  qkv_bias: bool = True
  patch_size: int = 16
  patch_padding: int = 2  # the conv's zero padding: 4 + 2 * (ratio // 2 - 1) with ratio 1
  image_height: int = 256
  image_width: int = 192
  ln_eps: float = 1e-6
  ffn: str = "mlp"  # exact-erf GELU MLP (what dinov3.Block builds for "mlp")

  @property
  def grid(self) -> tuple[int, int]:
    """(h, w) of the patch grid: floor((n + 2 pad - patch) / patch) + 1 per axis (16 x 12)."""
    p, pad = self.patch_size, self.patch_padding
    return ((self.image_height + 2 * pad - p) // p + 1, (self.image_width + 2 * pad - p) // p + 1)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The MANO transformer-decoder head (HaMeR's hamer_vit_transformer experiment)."""
  dim: int = 1024
  depth: int = 6
  heads: int = 8
  dim_head: int = 64
  mlp_dim: int = 1024
  ln_eps: float = 1e-5  # torch's default LayerNorm, unlike the backbone's 1e-6


@dataclasses.dataclass(frozen=True)
class HamerConfig:
  backbone: ViTConfig = ViTConfig()
  head: HeadConfig = HeadConfig()
  image_size: int = 256  # the square crop; the backbone takes its central image_width columns
  focal_length: float = 5000.0  # HaMeR's crop camera (EXTRA.FOCAL_LENGTH), pixels of image_size

  def __post_init__(self):
    b, h = self.backbone, self.head
    problems = []
    if b.dim % b.num_heads:
      problems.append(f"backbone dim {b.dim} is not divisible by num_heads {b.num_heads}")
    if b.image_height != self.image_size or (self.image_size - b.image_width) % 2:
      problems.append(f"the backbone input {b.image_height}x{b.image_width} must be the central "
                      f"columns of the {self.image_size}x{self.image_size} crop")
    if min(b.dim, b.depth, h.dim, h.depth, h.heads, h.dim_head, h.mlp_dim) <= 0:
      problems.append("sizes must be positive")
    if problems:
      raise ValueError("invalid HamerConfig: " + "; ".join(problems))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "HamerConfig":
    fields = dict(fields)
    return cls(backbone=ViTConfig(**fields.pop("backbone", {})),
               head=HeadConfig(**fields.pop("head", {})), **fields)


VARIANTS = {"hamer_vith": HamerConfig()}  # the released hamer.ckpt


def get_config(variant: str = "hamer_vith", **custom: Any) -> HamerConfig:
  """A named variant, or 'custom': HamerConfig with backbone={...} / head={...} field overrides
  of the released sizes (tests use e.g. backbone=dict(dim=64, depth=2, ...))."""
  if variant != "custom":
    if variant not in VARIANTS:
      raise ValueError(f"unknown HaMeR variant {variant!r}; known: {sorted(VARIANTS)} or 'custom'")
    if custom:
      raise ValueError("overrides only apply to variant 'custom'")
    return VARIANTS[variant]
  base = VARIANTS["hamer_vith"].to_dict()
  for part in ("backbone", "head"):
    base[part].update(custom.pop(part, {}))
  base.update(custom)
  try:
    return HamerConfig.from_dict(base)
  except TypeError as e:
    raise ValueError(f"custom HaMeR config: {e}") from None


def variant_name(config: HamerConfig) -> str:
  return next((name for name, known in VARIANTS.items() if known == config), "custom")


# ---------------------------------------------------------------------------------------------
# Backbone: ViTPose-H
# ---------------------------------------------------------------------------------------------


class ViT(nnx.Module):
  """ViTPose's ViT: padded patch embedding, absolute positions without a class token, pre-norm
  blocks, final LayerNorm. (B, H, W, 3) -> (B, h, w, D) float32."""

  def __init__(self, config: ViTConfig, *, dtype, attention_implementation: str | None,
               rngs: nnx.Rngs):
    self.config = config
    self.patch_embed = dinov3.PatchEmbed(config.patch_size, config.dim, dtype=dtype, rngs=rngs)
    h, w = config.grid
    # Slot 0 is ViTPose's class-token slot: no class token is used, the slot is added to every
    # patch (vit.py forward_features).
    self.pos_embed = nnx.Param(
        0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, 1 + h * w, config.dim)))
    self.blocks = nnx.List([
        dinov3.Block(config, dtype=dtype, attention_implementation=attention_implementation,
                     rngs=rngs, layer_scale=False, mask_k_bias=False)
        for _ in range(config.depth)])
    self.last_norm = dinov3.LayerNorm(config.dim, config.ln_eps, out_dtype=jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    b, height, width, _ = images.shape
    if (height, width) != (c.image_height, c.image_width):
      raise ValueError(f"HaMeR ViT input {images.shape}: expected (B, {c.image_height}, "
                       f"{c.image_width}, 3)")
    # The conv's zero padding, for a stride equal to the kernel: the patch grid starts `pad`
    # pixels before the image and the last `pad` rows / columns are never seen.
    pad, (h, w), p = c.patch_padding, c.grid, c.patch_size
    padded = jnp.pad(images, ((0, 0), (pad, 0), (pad, 0), (0, 0)))
    padded = jnp.pad(padded, ((0, 0), (0, max(0, h * p - padded.shape[1])),
                              (0, max(0, w * p - padded.shape[2])), (0, 0)))[:, :h * p, :w * p]
    x = self.patch_embed(padded).astype(jnp.float32)
    pos = self.pos_embed[...]
    x = x + pos[:, 1:] + pos[:, :1]
    for block in self.blocks:
      x = block(x, None, None)
    return self.last_norm(x).reshape(b, h, w, c.dim)


# ---------------------------------------------------------------------------------------------
# Head: MANO transformer decoder
# ---------------------------------------------------------------------------------------------


def _linear(in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def _heads_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(dh)) v per head: q (B, Tq, H*dh), k, v (B, Tk, H*dh) -> (B, Tq, H*dh),
  heads taken as `(h d)` chunks (einops 'b n (h d) -> b h n d')."""
  b, tq, inner = q.shape
  dh = inner // heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, dh)
  out = dinov3.attention(split(q * jnp.asarray(dh ** -0.5, q.dtype)), split(k), split(v))
  return out.reshape(b, tq, inner)


class SelfAttention(nnx.Module):
  """PreNorm(Attention): to_qkv (no bias) chunked q | k | v, to_out with bias."""

  def __init__(self, config: HeadConfig, *, dtype, rngs: nnx.Rngs):
    inner = config.heads * config.dim_head
    self.heads = config.heads
    self.norm = dinov3.LayerNorm(config.dim, config.ln_eps, out_dtype=dtype)
    self.to_qkv = _linear(config.dim, 3 * inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_out = _linear(inner, config.dim, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = jnp.split(self.to_qkv(self.norm(x)), 3, axis=-1)
    return self.to_out(_heads_attention(q, k, v, self.heads))


class CrossAttention(nnx.Module):
  """PreNorm(CrossAttention): to_q on the token, to_kv on the context chunked k | v (no bias)."""

  def __init__(self, config: HeadConfig, context_dim: int, *, dtype, rngs: nnx.Rngs):
    inner = config.heads * config.dim_head
    self.heads = config.heads
    self.norm = dinov3.LayerNorm(config.dim, config.ln_eps, out_dtype=dtype)
    self.to_q = _linear(config.dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_kv = _linear(context_dim, 2 * inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.to_out = _linear(inner, config.dim, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    k, v = jnp.split(self.to_kv(context), 2, axis=-1)
    return self.to_out(_heads_attention(self.to_q(self.norm(x)), k, v, self.heads))


class FeedForward(nnx.Module):
  """PreNorm(FeedForward): Linear -> exact GELU -> Linear (dinov3.Mlp)."""

  def __init__(self, config: HeadConfig, *, dtype, rngs: nnx.Rngs):
    self.norm = dinov3.LayerNorm(config.dim, config.ln_eps, out_dtype=dtype)
    self.mlp = dinov3.Mlp(config.dim, config.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(self.norm(x))


class DecoderBlock(nnx.Module):
  """x += SA(LN x); x += CA(LN x, context); x += FF(LN x). The residual stream is float32."""

  def __init__(self, config: HeadConfig, context_dim: int, *, dtype, rngs: nnx.Rngs):
    self.self_attn = SelfAttention(config, dtype=dtype, rngs=rngs)
    self.cross_attn = CrossAttention(config, context_dim, dtype=dtype, rngs=rngs)
    self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + self.self_attn(x).astype(jnp.float32)
    x = x + self.cross_attn(x, context).astype(jnp.float32)
    return x + self.feed_forward(x).astype(jnp.float32)


class MeanParams(nnx.Variable):
  """HaMeR's mean MANO parameters (mano_mean_params.npz, stored in the checkpoint): buffers the
  read-outs add to, never trained."""


class ManoHead(nnx.Module):
  """One zero query token (its embedding is the bias of a Linear(1, dim)) + a learned position,
  a cross-attention decoder over the backbone tokens, and linear read-outs added to the mean
  parameters (one IEF iteration, as released). No final norm."""

  def __init__(self, config: HeadConfig, context_dim: int, *, dtype, rngs: nnx.Rngs):
    npose = ROTATION_6D * (NUM_HAND_JOINTS + 1)
    self.token_embedding = _linear(1, config.dim, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.pos_embedding = nnx.Param(jax.random.normal(rngs.params(), (1, 1, config.dim)))
    self.blocks = nnx.List([DecoderBlock(config, context_dim, dtype=dtype, rngs=rngs)
                            for _ in range(config.depth)])
    self.decpose = _linear(config.dim, npose, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.decshape = _linear(config.dim, NUM_BETAS, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.deccam = _linear(config.dim, 3, use_bias=True, dtype=jnp.float32, rngs=rngs)
    self.init_hand_pose = MeanParams(jnp.zeros((1, npose), jnp.float32))
    self.init_betas = MeanParams(jnp.zeros((1, NUM_BETAS), jnp.float32))
    self.init_cam = MeanParams(jnp.zeros((1, 3), jnp.float32))

  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    """features (B, h, w, C) -> rotations (B, 16, 3, 3), betas (B, 10), pred_cam (B, 3)."""
    b = features.shape[0]
    context = features.reshape(b, -1, features.shape[-1])  # 'b c h w -> b (h w) c'
    token = self.token_embedding(jnp.zeros((b, 1, 1), jnp.float32)) + self.pos_embedding[...]
    for block in self.blocks:
      token = block(token, context)
    token = token[:, 0]
    pose_6d = self.decpose(token) + self.init_hand_pose[...]
    rotations = geometry.rotation_6d_to_matrix(pose_6d.reshape(b, NUM_HAND_JOINTS + 1, 6))
    return {"rotations": rotations, "betas": self.decshape(token) + self.init_betas[...],
            "pred_cam": self.deccam(token) + self.init_cam[...]}


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class Hamer(nnx.Module):
  """HaMeR's backbone + MANO head. Params are float32; `dtype` is the matmul compute dtype
  (LayerNorm statistics, softmax and the residual streams stay float32)."""

  def __init__(self, config: HamerConfig, *, dtype=jnp.float32,
               attention_implementation: str | None = None, rngs: nnx.Rngs):
    self.config = config
    self.backbone = ViT(config.backbone, dtype=dtype,
                        attention_implementation=attention_implementation, rngs=rngs)
    self.mano_head = ManoHead(config.head, config.backbone.dim, dtype=dtype, rngs=rngs)

  def __call__(self, crops: jax.Array) -> dict[str, jax.Array]:
    """crops (B, S, S, 3) normalised (S = config.image_size) -> {global_orient (B, 1, 3, 3),
    hand_pose (B, 15, 3, 3), betas (B, 10), pred_cam (B, 3) as (s, tx, ty)}."""
    s = self.config.image_size
    if crops.shape[1:] != (s, s, 3):
      raise ValueError(f"HaMeR input {crops.shape}: expected (B, {s}, {s}, 3) crops")
    margin = (s - self.config.backbone.image_width) // 2
    out = self.mano_head(self.backbone(crops[:, :, margin:s - margin]))
    rotations = out.pop("rotations")
    return dict(out, global_orient=rotations[:, :1], hand_pose=rotations[:, 1:])


def keypoints_3d(mano: mano_model.ManoModel, outputs: dict[str, jax.Array]) -> jax.Array:
  """HaMeR's pred_keypoints_3d (B, 21, 3): MANO (rotation matrices, no hands_mean) joints and
  smplx's tip vertices in OpenPose order, model frame (metres, no translation)."""
  if tuple(mano.tip_ids) != mano_model.SMPLX_TIP_IDS:
    mano = mano.with_tip_ids(mano_model.SMPLX_TIP_IDS)
  return mano_model.mano_forward(mano, outputs["betas"].astype(jnp.float32),
                                 outputs["hand_pose"].astype(jnp.float32),
                                 global_orient=outputs["global_orient"].astype(jnp.float32)
                                 ).keypoints


def crop_camera(outputs: dict[str, jax.Array], keypoints: jax.Array, config: HamerConfig
                ) -> tuple[jax.Array, jax.Array]:
  """HaMeR's crop camera: pred_cam_t (B, 3) = (tx, ty, 2 f / (S s + 1e-9)) and the keypoints
  projected with focal f / S (crop coordinates in [-0.5, 0.5]) (B, 21, 2)."""
  cam = outputs["pred_cam"]
  f = config.focal_length
  cam_t = jnp.stack([cam[:, 1], cam[:, 2], 2 * f / (config.image_size * cam[:, 0] + 1e-9)], -1)
  p = keypoints + cam_t[:, None]
  return cam_t, (f / config.image_size) * p[..., :2] / p[..., 2:]
