"""What trains and how: one labelling of the parameters into optimizer groups, from which both
the trainable/frozen split and the optimizer follow.

`param_group` maps every parameter path to a group: `frozen`, `backbone_block_{i}`,
`backbone_norm`, `change` or `head`, plus a `{group}/no_decay` twin for norms, biases and
LayerScale when optimizer.weight_decay_exclude is on. Frozen parameters are split off before
differentiation: they cost no backward pass and carry no optimizer state. The trainable ones go
through global-norm clipping, then AdamW per group (`optax.multi_transform`) with the group's lr
(optimizer.lr x layer decay or head_lr_mult) and weight decay. Every group's update is then
multiplied by the lr schedule at the step and by the reduce-on-plateau scale, which is stepped
once per validation as the original's per-epoch scheduler is. The defaults (one lr, decay on
every parameter, constant lr with reduce-on-plateau, no EMA) are the original's (SPEC.md §2.6).
docs/training.md describes the groups and recipes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from optax import contrib as optax_contrib

from dd_jax.models import deltadorsal

FROZEN = "frozen"
NO_DECAY = "/no_decay"  # suffix of a group's twin without weight decay
SCHEDULES = ("plateau", "cosine", "linear")
# Leaf names of the parameters weight_decay_exclude spares: biases, LayerNorm scales and
# LayerScale gammas (the class and storage tokens never train).
_NO_DECAY_LEAVES = ("bias", "scale", "gamma")
_ALWAYS_FROZEN = ("patch_embed", "cls_token", "storage_tokens")


# ------------------------------------------------------------------ the labelling


def param_group(path: tuple, *, depth: int, n_unfrozen_blocks: int,
                weight_decay_exclude: bool = False) -> str:
  """The optimizer group of the parameter at nnx `path` (e.g. ('backbone', 'blocks', 3, ...)).

  The backbone's last `n_unfrozen_blocks` blocks (and, when > 0, its final norm) train; its
  patch embedding and tokens never do. A path outside the known modules is an error, never a
  silent default.
  """
  top = path[0] if path else None
  part = path[1] if len(path) > 1 else None
  if top in ("change", "head"):
    group = top
  elif top == "backbone" and part in _ALWAYS_FROZEN:
    group = FROZEN
  elif top == "backbone" and part == "blocks" and len(path) > 2:
    group = f"backbone_block_{path[2]}" if int(path[2]) >= depth - n_unfrozen_blocks else FROZEN
  elif top == "backbone" and part == "norm":
    group = "backbone_norm" if n_unfrozen_blocks else FROZEN
  else:
    raise ValueError(f"parameter {path_name(path)} belongs to no optimizer group (known: "
                     f"backbone/{{{','.join(_ALWAYS_FROZEN)},blocks,norm}}, change, head); "
                     "give it one in dd_jax/optim.py:param_group")
  if group != FROZEN and weight_decay_exclude and str(path[-1]) in _NO_DECAY_LEAVES:
    group += NO_DECAY
  return group


def config_group(config: ml_collections.ConfigDict) -> Callable[[tuple], str]:
  """path -> group with the config's backbone depth, unfrozen blocks and decay exclusion."""
  depth = deltadorsal.backbone_config_from(config).depth
  n_unfrozen = config.model.backbone.n_unfrozen_blocks
  _check_unfrozen(depth, n_unfrozen)
  exclude = config.optimizer.weight_decay_exclude
  return lambda path: param_group(path, depth=depth, n_unfrozen_blocks=n_unfrozen,
                                  weight_decay_exclude=exclude)


def trainable_filter(depth: int, n_unfrozen_blocks: int) -> Callable[[tuple, Any], bool]:
  """nnx filter: the Params whose group is not `frozen`."""
  _check_unfrozen(depth, n_unfrozen_blocks)

  def is_trainable(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and param_group(
        path, depth=depth, n_unfrozen_blocks=n_unfrozen_blocks) != FROZEN

  return is_trainable


def group_labels(config: ml_collections.ConfigDict, params):
  """The tree of group names over `params` (an nnx.State, or nested dicts keyed like one)."""
  group = config_group(config)
  return jax.tree_util.tree_map_with_path(
      lambda keys, _: group(tuple(_key(k) for k in keys)), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class Group:
  lr: float  # peak lr, before the schedule and the reduce-on-plateau scale
  weight_decay: float


def optimizer_groups(config: ml_collections.ConfigDict) -> dict[str, Group]:
  """Every group the config defines, in table order.

  Layer decay (BEiT's): block i of a depth-D backbone gets lr x layer_decay^(D - i), so the
  last block gets one factor and the final norm, change encoder and head none; head_lr_mult
  multiplies the head's lr alone.
  """
  _check_optimizer_config(config)
  o = config.optimizer
  depth = deltadorsal.backbone_config_from(config).depth
  n_unfrozen = config.model.backbone.n_unfrozen_blocks
  base = {FROZEN: Group(0.0, 0.0)}
  for i in range(depth - n_unfrozen, depth):
    base[f"backbone_block_{i}"] = Group(o.lr * o.layer_decay ** (depth - i), o.weight_decay)
  if n_unfrozen:
    base["backbone_norm"] = Group(o.lr, o.weight_decay)
  base["change"] = Group(o.lr, o.weight_decay)
  base["head"] = Group(o.lr * o.head_lr_mult, o.weight_decay)
  if not o.weight_decay_exclude:
    return base
  groups = {}
  for name, group in base.items():
    groups[name] = group
    if name != FROZEN:
      groups[name + NO_DECAY] = Group(group.lr, 0.0)
  return groups


def group_sizes(config: ml_collections.ConfigDict, params: nnx.State) -> dict[str, int]:
  """Number of scalars per group of `params` (all of a model's Params), in table order.

  A parameter labelled with a group the config does not define, or a group without any
  parameter (counting its no_decay twin), is a start-up error: a typo in the labelling must
  not silently freeze or mis-train anything.
  """
  groups = optimizer_groups(config)
  group = config_group(config)
  sizes = dict.fromkeys(groups, 0)
  unknown = []
  for path, value in nnx.to_flat_state(params):
    label = group(path)
    if label not in groups:
      unknown.append(f"{path_name(path)} -> {label!r}")
      continue
    sizes[label] += int(value.size)
  if unknown:
    raise ValueError(f"parameters labelled with a group the optimizer does not define: "
                     f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; groups: {list(groups)}")
  empty = [name for name in groups if not name.endswith(NO_DECAY)
           and sizes[name] + sizes.get(name + NO_DECAY, 0) == 0]
  if empty:
    raise ValueError(f"optimizer groups without any parameter: {empty} (dd_jax/optim.py:"
                     "param_group gives none of the model's parameters these names)")
  return sizes


# ------------------------------------------------------------------ the optimizer


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping over all trainable parameters, then AdamW per group.

  With the defaults every group has the same lr and decay: the original's single AdamW with
  decay on every parameter (torch.optim.AdamW's decoupled decay). `frozen` maps to
  set_to_zero: a frozen parameter handed to this optimizer gets no update and no state (the
  trainer never hands it one: it is not differentiated at all).
  """
  o = config.optimizer
  transforms = {
      name: optax.set_to_zero() if name == FROZEN
      else optax.adamw(group.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=group.weight_decay)
      for name, group in optimizer_groups(config).items()}
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.multi_transform(transforms, lambda params: group_labels(config, params)))


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Multiplier of every group's lr at a step (0 for the first update): linear warmup over
  warmup_steps, then constant (plateau) or a cosine / linear decay to 0 at decay_steps.

  The reduce-on-plateau scale multiplies on top of it, whatever the schedule.
  """
  o = config.optimizer
  warmup = [optax.linear_schedule(0.0, 1.0, o.warmup_steps)] if o.warmup_steps else []
  if o.schedule == "plateau":
    rest = optax.constant_schedule(1.0)
  elif o.decay_steps <= o.warmup_steps:
    raise ValueError(f"optimizer.schedule={o.schedule!r} needs optimizer.decay_steps "
                     f"({o.decay_steps}) > optimizer.warmup_steps ({o.warmup_steps}); the "
                     "trainer sets decay_steps=0 to max_epochs x steps per epoch")
  elif o.schedule == "cosine":
    rest = optax.cosine_decay_schedule(1.0, o.decay_steps - o.warmup_steps)
  else:
    rest = optax.linear_schedule(1.0, 0.0, o.decay_steps - o.warmup_steps)
  return optax.join_schedules(warmup + [rest], [o.warmup_steps]) if warmup else rest


def make_update(config: ml_collections.ConfigDict,
                tx: optax.GradientTransformation) -> Callable[[dict, Any], dict]:
  """(train state, gradients of its params) -> the train state after one optimizer update:
  new params and opt_state, and the EMA of the params when optimizer.ema_decay > 0."""
  ema_decay = config.optimizer.ema_decay

  def update(state: dict, grads) -> dict:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    # Built when traced: evaluating a cosine run needs no decay_steps.
    scale = state["plateau"].scale * lr_schedule(config)(state["step"])
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state)
    if ema_decay:
      new["ema"] = optax.incremental_update(params, state["ema"], 1.0 - ema_decay)
    return new

  return update


def ema_init(config: ml_collections.ConfigDict, params) -> dict:
  """The train state's `ema` entry (a copy of the params), when optimizer.ema_decay > 0."""
  if not config.optimizer.ema_decay:
    return {}
  # A copy, not the params' own buffers: the train step donates both.
  return {"ema": jax.tree.map(jnp.copy, params)}


def evaluated_params(state: dict):
  """What validation, testing and inference use: the EMA when the run keeps one."""
  return state["ema"] if "ema" in state else state["params"]


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


# ------------------------------------------------------------------ reporting and checks


def group_table(config: ml_collections.ConfigDict, params: nnx.State) -> str:
  """The start-up table: parameters, peak lr and weight decay per group, and the schedule."""
  o = config.optimizer
  groups, sizes = optimizer_groups(config), group_sizes(config, params)
  rows = [("group", "params", "lr", "weight decay")]
  for name, size in sizes.items():
    if size:
      g = groups[name]
      rows.append((name, f"{size:,}", "-" if name == FROZEN else f"{g.lr:.3g}",
                   "-" if name == FROZEN else f"{g.weight_decay:g}"))
  trainable = sum(size for name, size in sizes.items() if name != FROZEN)
  rows.append(("trainable", f"{trainable:,}", "", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
           .rstrip() for r in rows]
  schedule = {"plateau": "constant", "cosine": f"cosine to 0 at step {o.decay_steps}",
              "linear": f"linear to 0 at step {o.decay_steps}"}[o.schedule]
  warmup = f"linear warmup over {o.warmup_steps} steps, then " if o.warmup_steps else ""
  lines.append(f"lr schedule: {warmup}{schedule}; x{o.plateau_factor:g} after "
               f"{o.plateau_patience} validations without val/loss improvement "
               f"(reduce-on-plateau); EMA of the weights: {o.ema_decay or 'off'}")
  return "\n".join(lines)


def _check_optimizer_config(config: ml_collections.ConfigDict) -> None:
  o = config.optimizer
  checks = [(o.schedule in SCHEDULES, f"optimizer.schedule={o.schedule!r}: one of {SCHEDULES}"),
            (0.0 < o.layer_decay <= 1.0,
             f"optimizer.layer_decay={o.layer_decay}: in (0, 1] (1 = off)"),
            (o.head_lr_mult > 0.0, f"optimizer.head_lr_mult={o.head_lr_mult}: must be > 0"),
            (0.0 <= o.ema_decay < 1.0, f"optimizer.ema_decay={o.ema_decay}: in [0, 1) (0 = off)"),
            (o.warmup_steps >= 0 and o.decay_steps >= 0,
             f"optimizer.warmup_steps={o.warmup_steps}, decay_steps={o.decay_steps}: must be >= 0")]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


def _check_unfrozen(depth: int, n_unfrozen_blocks: int) -> None:
  if not 0 <= n_unfrozen_blocks <= depth:
    raise ValueError(
        f"model.backbone.n_unfrozen_blocks={n_unfrozen_blocks} must be in [0, {depth}]")


def _key(k) -> Any:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(k, attr):
      return getattr(k, attr)
  raise TypeError(f"unexpected pytree key {k!r}")


def path_name(path: tuple) -> str:
  return "/".join(str(p) for p in path)
