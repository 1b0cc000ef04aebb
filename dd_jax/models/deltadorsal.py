"""DeltaDorsal networks (SPEC.md §2): change encoder, residual pose head, force head and the
pose / force networks that put them behind the shared DINOv3 backbone. NHWC throughout.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dd_jax.models import dinov3
from dd_jax.models.dinov3 import gelu

POOLS = ("avg", "attn")


# ---------------------------------------------------------------------------------------------
# PyTorch-default layers: training from scratch must start where the original starts.
# ---------------------------------------------------------------------------------------------

def torch_default_kernel_init() -> nnx.Initializer:
  """kaiming_uniform(a=sqrt(5)) of torch Linear/Conv == U(+-1/sqrt(fan_in)).

  gain sqrt(2/(1+5)) times sqrt(3/fan_in) is 1/sqrt(fan_in); variance_scaling's uniform bound
  sqrt(3*scale/fan_in) equals it for scale 1/3 (fan_in of a conv kernel counts kh*kw*in).
  """
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> nnx.Initializer:
  """torch's bias init: U(+-1/sqrt(fan_in)) with the layer's fan_in (not the bias's shape)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  kwargs.setdefault("kernel_init", torch_default_kernel_init())
  kwargs.setdefault("bias_init", torch_default_bias_init(in_features))
  return nnx.Linear(in_features, out_features, rngs=rngs, **kwargs)


def torch_conv(in_features: int, out_features: int, kernel: int, *, rngs: nnx.Rngs,
               **kwargs) -> nnx.Conv:
  """Conv with torch's `padding=kernel//2` (explicit: 'SAME' differs for even kernels)."""
  pad = kernel // 2
  return nnx.Conv(in_features, out_features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                  kernel_init=torch_default_kernel_init(),
                  bias_init=torch_default_bias_init(in_features * kernel * kernel),
                  rngs=rngs, **kwargs)


def cosine_similarity(a: jax.Array, b: jax.Array, *, axis: int = -1,
                      eps: float = 1e-6) -> jax.Array:
  """torch.nn.functional.cosine_similarity as torch 2.x computes it.

  Each norm is clamped to eps on its own and each input is divided by its norm before the
  product is summed (not x.y / max(|x||y|, eps) as older releases and the docs suggest):
  cos = sum((a / max(|a|, eps)) * (b / max(|b|, eps))).
  """
  a_norm = jnp.maximum(jnp.linalg.norm(a, axis=axis, keepdims=True), eps)
  b_norm = jnp.maximum(jnp.linalg.norm(b, axis=axis, keepdims=True), eps)
  return jnp.sum((a / a_norm) * (b / b_norm), axis=axis)


# ---------------------------------------------------------------------------------------------
# Change encoder and pooling
# ---------------------------------------------------------------------------------------------

class ChangeEncoder(nnx.Module):
  """Compares current and base features: [Ft-F0, cos(Ft,F0) (, Ft, F0)] -> 2x (conv3x3, GELU).

  Lightning keys backbone.change.conv.0 / conv.2 are conv1 / conv2 here.
  """

  def __init__(self, in_dim: int, out_dim: int = 256, *, use_delta: bool = True,
               use_orig_feat: bool = True, rngs: nnx.Rngs):
    self.use_delta = use_delta
    # The original ignores use_orig_feat without deltas (the base image is then unused).
    self.use_orig_feat = use_orig_feat and use_delta
    self.in_dim = in_dim
    in_channels = in_dim
    if use_delta:
      in_channels += 1
    if self.use_orig_feat:
      in_channels += 2 * in_dim
    self.in_channels = in_channels
    self.conv1 = torch_conv(in_channels, out_dim, 3, rngs=rngs)
    self.conv2 = torch_conv(out_dim, out_dim, 3, rngs=rngs)

  def __call__(self, ft: jax.Array, f0: jax.Array | None) -> jax.Array:
    """ft, f0: (B, h, w, D) current / base features (f0 unused without use_delta) -> (B,h,w,out)."""
    if self.use_delta:
      cos = cosine_similarity(ft, f0, axis=-1, eps=1e-6)[..., None]
      parts = [ft - f0, cos] + ([ft, f0] if self.use_orig_feat else [])
      x = jnp.concatenate(parts, axis=-1)
    else:
      x = ft
    return gelu(self.conv2(gelu(self.conv1(x))))


class AttentionPool(nnx.Module):
  """softmax over positions of tanh(1x1 conv(X)), then the weighted sum of X.

  The original builds a fresh randomly initialised conv on every call (a defect, SPEC §2.3);
  here the conv is a learned layer with torch's default initialisation.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.score = torch_conv(dim, 1, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, h, w, C) -> (B, C)."""
    b, h, w, c = x.shape
    logits = jnp.tanh(self.score(x)).reshape(b, h * w)
    weights = jax.nn.softmax(logits, axis=-1).reshape(b, h, w, 1)
    return jnp.sum(x * weights, axis=(1, 2))


def _check_pool(pool: str) -> None:
  if pool not in POOLS:
    raise ValueError(f"model.head.pool must be one of {POOLS}, got {pool!r}")


class _NeckAndPool(nnx.Module):
  """Shared by both heads: conv3x3 + GELU neck, then avg or attention pooling."""

  def _init_neck(self, z_dim: int, pool: str, rngs: nnx.Rngs) -> None:
    _check_pool(pool)
    self.pool = pool
    self.neck = torch_conv(z_dim, z_dim, 3, rngs=rngs)
    self.attn_pool = AttentionPool(z_dim, rngs=rngs) if pool == "attn" else None

  def _neck_and_pool(self, x: jax.Array) -> jax.Array:
    x = gelu(self.neck(x))
    if self.attn_pool is not None:
      return self.attn_pool(x)
    return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

class ResidualPoseHead(_NeckAndPool):
  """Pose head (SPEC §2.3). Lightning head.{film.0, neck.0, mlp.0, mlp.2, mlp.4} are
  film, neck, mlp1, mlp2, mlp3 here (attn_pool has no counterpart in the original files)."""

  def __init__(self, z_dim: int = 256, out_dim: int = 45, prior_dim: int = 45,
               hidden: int = 512, *, use_prior: bool = False, use_film: bool = False,
               gated: bool = False, pool: str = "avg", rngs: nnx.Rngs):
    self.z_dim = z_dim
    self.out_dim = out_dim
    self.prior_dim = prior_dim
    self.use_prior = use_prior
    # FiLM is conditioned on the prior: the original leaves it inactive without one.
    self.use_film = use_film and use_prior
    self.gated = gated
    self.film = torch_linear(prior_dim, 2 * z_dim, rngs=rngs) if self.use_film else None
    self._init_neck(z_dim, pool, rngs)
    mlp_in = z_dim + (prior_dim if use_prior else 0)
    self.mlp1 = torch_linear(mlp_in, hidden, rngs=rngs)
    self.mlp2 = torch_linear(hidden, hidden, rngs=rngs)
    # Zero last layer: training starts from theta = prior (or 0). Gate bias -2 keeps the
    # residual small at first when there is a prior; +2 opens the gate when there is none.
    gate_bias = -2.0 if use_prior else 2.0

    def last_bias_init(key, shape, dtype=jnp.float32):
      del key
      bias = jnp.zeros(shape, dtype)
      return bias.at[out_dim:].set(gate_bias) if gated else bias

    self.mlp3 = nnx.Linear(hidden, out_dim * (2 if gated else 1),
                           kernel_init=nnx.initializers.zeros, bias_init=last_bias_init,
                           rngs=rngs)

  def __call__(self, x: jax.Array, prior: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, h, w, z), prior (B, prior_dim) -> theta, delta, gate, each (B, out_dim).

    delta is the residual (with prior) or the raw output (without); gate is all ones when the
    head is not gated.
    """
    if self.use_prior and prior is None:
      raise ValueError("ResidualPoseHead(use_prior=True) needs the prior pose")
    if self.film is not None:
      gamma_beta = self.film(prior)
      gamma, beta = gamma_beta[:, :self.z_dim], gamma_beta[:, self.z_dim:]
      x = gamma[:, None, None, :] * x + beta[:, None, None, :]
    g = self._neck_and_pool(x)
    if self.use_prior:
      g = jnp.concatenate([g, prior.astype(g.dtype)], axis=-1)
    out = self.mlp3(gelu(self.mlp2(gelu(self.mlp1(g)))))
    if self.gated:
      raw, gate_logits = out[:, :self.out_dim], out[:, self.out_dim:]
      gate = jax.nn.sigmoid(gate_logits)
      theta = gate * raw
    else:
      raw, gate = out, jnp.ones_like(out)
      theta = out
    if self.use_prior:
      theta = prior + theta
    return theta, raw, gate


class ForceHead(_NeckAndPool):
  """Force head (SPEC §2.4). Lightning head.{neck.0, trunk.0, trunk.2, head} are
  neck, trunk1, trunk2, out here."""

  def __init__(self, z_dim: int = 256, out_dim: int = 1, n_classes: int = 7, hidden: int = 512,
               *, pool: str = "avg", rngs: nnx.Rngs):
    self.out_dim = out_dim
    self.n_classes = n_classes
    self._init_neck(z_dim, pool, rngs)
    self.trunk1 = torch_linear(z_dim, hidden, rngs=rngs)
    self.trunk2 = torch_linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, n_classes * out_dim,
                          kernel_init=nnx.initializers.xavier_uniform(),
                          bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, h, w, z) -> logits (B, out_dim, n_classes)."""
    h = gelu(self.trunk2(gelu(self.trunk1(self._neck_and_pool(x)))))
    return self.out(h).reshape(x.shape[0], self.out_dim, self.n_classes)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

class _DeltaDorsalNet(nnx.Module):
  """DINOv3 backbone + change encoder; subclasses add the head."""

  def _init_trunk(self, backbone_config: dinov3.DinoV3Config, backbone_dtype: Any,
                  change_dim: int, use_delta: bool, use_orig_feat: bool,
                  rngs: nnx.Rngs, backbone_impl: str | None = "auto") -> None:
    self.backbone = dinov3.DinoV3(backbone_config, dtype=backbone_dtype, rngs=rngs,
                                  impl=backbone_impl)
    self.change = ChangeEncoder(backbone_config.dim, change_dim, use_delta=use_delta,
                                use_orig_feat=use_orig_feat, rngs=rngs)

  def features(self, img: jax.Array, base_img: jax.Array,
               rope_scale: jax.Array | None = None) -> jax.Array:
    """img, base_img (B, S, S, 3) NHWC -> change features (B, S/16, S/16, change_dim).

    Both images go through the backbone as one batch. Without use_delta the original still
    encodes the base image and then ignores it; here it is skipped (same output, half the cost).
    rope_scale: None (eval), or the train-mode RoPE factors (depth, streams) of `draw_rope_scale`.
    """
    if self.change.use_delta:
      b = img.shape[0]
      # Interleaved (img0, base0, img1, base1, ...) rather than [img; base]: under a batch-
      # sharded mesh every device then keeps its own rows and no data moves between devices.
      # Row r is stream r % 2, so rope_scale[:, 0] rescales the images, [:, 1] the bases.
      pair = jnp.stack([img, base_img], axis=1).reshape((2 * b,) + img.shape[1:])
      feats = self.backbone(pair, rope_scale=rope_scale)
      feats = feats.reshape((b, 2) + feats.shape[1:])
      ft, f0 = feats[:, 0], feats[:, 1]
    else:
      ft, f0 = self.backbone(img, rope_scale=rope_scale), None
    return self.change(ft.astype(jnp.float32), None if f0 is None else f0.astype(jnp.float32))

  def draw_rope_scale(self, rng: jax.Array, max_scale: float) -> jax.Array | None:
    """Train-mode RoPE factors (depth, streams), streams = [image, base] (or [image] without
    use_delta); None when max_scale is 0 (off).

    The original fine-tunes with the backbone in train mode; through get_intermediate_layers
    Meta's RoPE draws one factor in every block (frozen ones included) for the whole batch, and
    the original encodes the image and the base in two calls: one independent factor per block
    and per stream, shared by the stream's rows (docs/model.md has the file and line evidence).
    """
    if not max_scale:
      return None
    streams = 2 if self.change.use_delta else 1
    return dinov3.draw_rope_scale(rng, (self.backbone.config.depth, streams), max_scale)


class PoseNet(_DeltaDorsalNet):
  """Pose network: theta (B, 45) axis-angle finger pose from current + base image (+ prior)."""

  def __init__(self, backbone_config: dinov3.DinoV3Config, *, backbone_dtype: Any = jnp.float32,
               change_dim: int = 256, use_delta: bool = True, use_orig_feat: bool = True,
               use_prior: bool = False, use_film: bool = False, gated: bool = False,
               pool: str = "avg", hidden: int = 512, out_dim: int = 45, prior_dim: int = 45,
               rngs: nnx.Rngs, backbone_impl: str | None = "auto"):
    self._init_trunk(backbone_config, backbone_dtype, change_dim, use_delta, use_orig_feat, rngs,
                     backbone_impl)
    self.head = ResidualPoseHead(change_dim, out_dim, prior_dim, hidden, use_prior=use_prior,
                                 use_film=use_film, gated=gated, pool=pool, rngs=rngs)

  def __call__(self, img: jax.Array, base_img: jax.Array, prior: jax.Array | None = None, *,
               rope_scale: jax.Array | None = None) -> dict[str, jax.Array]:
    """img, base_img (B,S,S,3), prior (B,45) -> {theta, delta, gate}, each (B,45).

    rope_scale: train mode (`draw_rope_scale`); None (eval) by default."""
    theta, delta, gate = self.head(self.features(img, base_img, rope_scale), prior)
    return {"theta": theta, "delta": delta, "gate": gate}


class ForceNet(_DeltaDorsalNet):
  """Force network: logits (B, out_dim, n_classes) from current + base image."""

  def __init__(self, backbone_config: dinov3.DinoV3Config, *, backbone_dtype: Any = jnp.float32,
               change_dim: int = 256, use_delta: bool = True, use_orig_feat: bool = False,
               n_classes: int = 7, out_dim: int = 1, hidden: int = 512, pool: str = "avg",
               rngs: nnx.Rngs, backbone_impl: str | None = "auto"):
    self._init_trunk(backbone_config, backbone_dtype, change_dim, use_delta, use_orig_feat, rngs,
                     backbone_impl)
    self.head = ForceHead(change_dim, out_dim, n_classes, hidden, pool=pool, rngs=rngs)

  def __call__(self, img: jax.Array, base_img: jax.Array, *,
               rope_scale: jax.Array | None = None) -> jax.Array:
    """img, base_img (B,S,S,3) -> logits (B, out_dim, n_classes); rope_scale as PoseNet's."""
    return self.head(self.features(img, base_img, rope_scale))


# ---------------------------------------------------------------------------------------------
# From the ml_collections config
# ---------------------------------------------------------------------------------------------

def backbone_config_from(config) -> dinov3.DinoV3Config:
  """config.model.backbone.{variant, custom} -> DinoV3Config."""
  custom = config.model.backbone.get("custom", None)
  custom = dict(custom.to_dict() if hasattr(custom, "to_dict") else (custom or {}))
  if config.model.backbone.variant == "custom":
    return dinov3.get_config("custom", **custom)
  return dinov3.get_config(config.model.backbone.variant, **custom)


def build_model(config, *, rngs: nnx.Rngs) -> PoseNet | ForceNet:
  """PoseNet (config.task == "pose") or ForceNet ("force") from configs/pose.py / force.py.

  Reads model.backbone.{variant, custom, dtype, impl}, model.change.{out_dim, use_delta,
  use_orig_feat} and model.head.*. Backbone weights are NOT loaded here (the trainer does it).
  """
  backbone_config = backbone_config_from(config)
  backbone_dtype = jnp.dtype(config.model.backbone.get("dtype", "float32"))
  change = config.model.change
  head = config.model.head
  common = dict(backbone_dtype=backbone_dtype, change_dim=change.out_dim,
                use_delta=change.use_delta, use_orig_feat=change.use_orig_feat,
                hidden=head.hidden, pool=head.pool, rngs=rngs,
                backbone_impl=config.model.backbone.get("impl", "auto"))
  if config.task == "pose":
    return PoseNet(backbone_config, use_prior=head.use_prior, use_film=head.use_film,
                   gated=head.gated, **common)
  if config.task == "force":
    return ForceNet(backbone_config, n_classes=head.n_classes, out_dim=head.out_dim, **common)
  raise ValueError(f"config.task must be 'pose' or 'force', got {config.task!r}")
