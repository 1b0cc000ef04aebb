"""What trains and how: the trainable-parameter filter, AdamW with clipping, reduce-on-plateau.

Only the trainable subset is differentiated and given optimizer state (frozen backbone blocks cost
neither a backward pass nor Adam moments). The learning-rate scale of reduce-on-plateau lives in
its own small state, stepped once per validation as the original's per-epoch scheduler is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from optax import contrib as optax_contrib


def trainable_filter(depth: int, n_unfrozen_blocks: int) -> Callable[[tuple, Any], bool]:
  """nnx filter: head and change-encoder Params, the backbone's last N blocks (and final norm).

  Patch embedding, class and storage tokens always stay frozen; N = 0 freezes the backbone.
  """
  if not 0 <= n_unfrozen_blocks <= depth:
    raise ValueError(f"model.backbone.n_unfrozen_blocks={n_unfrozen_blocks} must be in [0, {depth}]")
  first_trainable = depth - n_unfrozen_blocks

  def is_trainable(path: tuple, value: Any) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    if not path or path[0] != "backbone":
      return True
    if n_unfrozen_blocks == 0:
      return False
    if path[1] == "blocks":
      return int(path[2]) >= first_trainable
    return path[1] == "norm"

  return is_trainable


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW with decay on every parameter (torch.optim.AdamW's)."""
  o = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """torch ReduceLROnPlateau(mode='min', factor, patience, threshold=1e-4 rel) as an lr scale."""
  return optax_contrib.reduce_on_plateau(
      factor=config.optimizer.plateau_factor, patience=config.optimizer.plateau_patience,
      rtol=1e-4, atol=0.0)


def plateau_init(config: ml_collections.ConfigDict):
  return make_plateau(config).init(jnp.zeros(()))


def plateau_step(config: ml_collections.ConfigDict, state, monitored_value: float):
  """One scheduler step with the epoch's validation loss; returns the new state."""
  _, state = make_plateau(config).update(jnp.zeros(()), state, value=jnp.asarray(monitored_value))
  return state

