"""Orbax checkpoints of a training run: the latest (to resume) and the best (by the val metric).

Each step directory holds `state` (parameters, optimizer, scheduler, RNG, counters), `data`
(every process's Grain iterator position) and `meta` (epoch, config, metrics). Mid-epoch saves
carry no metrics and are kept only while they are the latest; epoch-end saves carry the
validation metrics and compete for "best".
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def make_manager(directory: str, best_metric: str, best_mode: str, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest checkpoint and the best by `best_metric` (`best_mode` 'min' or 'max')."""

  def metric(metrics: dict[str, Any]) -> float:
    return float(metrics[best_metric])

  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=1),
      checkpoint_managers.BestN(get_metric_fn=metric, reverse=(best_mode == "min"), n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode=best_mode, preservation_policy=policy, create=not read_only,
      read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict,
         metrics: dict[str, float] | None = None) -> None:
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
  """Restores (state, meta) into `abstract_state`'s shapes and shardings; moves the iterator."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"]


def resolve(path: str) -> tuple[str, int | None]:
  """A run directory, its checkpoints/ folder or one step folder -> (checkpoints dir, step).

  step is None when the folder holds several steps: the caller takes the best one.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(os.path.basename(path))
  if not ocp.utils.checkpoint_steps(path):
    raise FileNotFoundError(f"{path} holds no dd_jax checkpoint (no step folders)")
  return path, None


def abstract(tree):
  """ShapeDtypeStructs with shardings: what StandardRestore needs to place arrays directly."""
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
