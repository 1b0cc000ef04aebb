"""Orbax checkpoints of a training run, and every way dd_jax reads checkpoints back.

A run's `checkpoints/<step>/` holds `state` ({"train": the train state, "frozen": the frozen
variables}), `data` (every process's Grain iterator position) and `meta` (epoch, early-stopping
counters, config). Mid-epoch saves carry no metrics and are kept only while they are the latest;
epoch-end saves carry the validation metrics and compete for "best".

Reading: `resolve` a run, its checkpoints/ folder or one step folder; `latest_step` /
`best_step` of a run (opened read-only); `restore_training` (resume, test) or `restore_params`
(parameters only). `find` + `load_params` put the parameters of a run's step OR of a converted
original DeltaDorsal checkpoint (tools/convert_deltadorsal.py) into a built network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from dd_jax import default_config, optim
from dd_jax.convert import lightning
from dd_jax.models import deltadorsal


def _state_item(train_state: Any, frozen: Any) -> dict[str, Any]:
  """The `state` item of a step: the one place its layout is spelled."""
  return {"train": train_state, "frozen": frozen}


# ------------------------------------------------------------------ writing (the trainer)


def make_manager(directory: str, best_metric: str, best_mode: str) -> ocp.CheckpointManager:
  """Keeps the latest checkpoint and the best by `best_metric` (`best_mode` 'min' or 'max')."""

  def metric(metrics: dict[str, Any]) -> float:
    return float(metrics[best_metric])

  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=1),
      checkpoint_managers.BestN(get_metric_fn=metric, reverse=(best_mode == "min"), n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode=best_mode, preservation_policy=policy,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, train_state, frozen, data_iterator,
         meta: dict, metrics: dict[str, float] | None = None) -> None:
  items = dict(state=ocp.args.StandardSave(_state_item(train_state, frozen)),
               meta=ocp.args.JsonSave(meta))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


# ------------------------------------------------------------------ reading a run


def _open_read_only(directory: str, best_metric: str | None = None,
                    best_mode: str = "min") -> ocp.CheckpointManager:
  """A manager that only reads `directory`; given the metric, it also knows the best step."""
  best = {}
  if best_metric is not None:
    best = dict(best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode)
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, **best)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: str) -> int | None:
  manager = _open_read_only(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def best_step(directory: str, best_metric: str, best_mode: str) -> int | None:
  """The step whose validation `best_metric` is best (None when no save carries metrics)."""
  manager = _open_read_only(directory, best_metric, best_mode)
  try:
    return manager.best_step()
  finally:
    manager.close()


def read_meta(directory: str, step: int) -> dict:
  manager = _open_read_only(directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()


def restore_training(directory: str, step: int, abstract_train_state, abstract_frozen,
                     data_iterator=None) -> tuple[Any, Any, dict]:
  """(train state, frozen, meta) of a step, placed as the abstract trees' shardings say; moves
  `data_iterator` (when given) to the saved position."""
  items = dict(state=ocp.args.StandardRestore(_state_item(abstract(abstract_train_state),
                                                          abstract(abstract_frozen))),
               meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  manager = _open_read_only(directory)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()
  state = restored["state"]
  return state["train"], state["frozen"], restored["meta"]


def restore_params(directory: str, step: int, abstract_params, abstract_frozen, *,
                   ema: bool = False) -> tuple[Any, Any]:
  """(trainable params, frozen) of a step; no optimizer state or iterator position is read.

  ema: read the trainable parameters' EMA instead (kept, and validated, when the run had
  optimizer.ema_decay > 0).
  """
  key = "ema" if ema else "params"
  target = _state_item({key: abstract(abstract_params)}, abstract(abstract_frozen))
  state_dir = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return restored["train"][key], restored["frozen"]


def resolve(path: str) -> tuple[str, int | None]:
  """A run directory, its checkpoints/ folder or one step folder -> (checkpoints dir, step).

  step is None when the folder holds several steps: the caller takes the latest or best one.
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


def resume_point(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager
                 ) -> tuple[str, int] | None:
  """What a run restores: config.ckpt_path (its latest step when training, its best when only
  testing) or, when training, the latest checkpoint of its own `manager`; None: start afresh."""
  if config.ckpt_path:
    directory, step = resolve(config.ckpt_path)
    if step is None:
      step = (latest_step(directory) if config.train
              else best_step(directory, config.best_metric, config.best_mode))
    return directory, step
  if config.train and manager.latest_step() is not None:
    return str(manager.directory), manager.latest_step()
  return None


def abstract(tree):
  """ShapeDtypeStructs with shardings: what a restore needs to place arrays directly."""
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ------------------------------------------------------------------ parameters from any source


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Where a network's parameters come from: one step of a dd_jax run, or a converted original
  DeltaDorsal checkpoint (deltadorsal.json + params/)."""
  path: str  # the step folder, or the converted folder
  config: ml_collections.ConfigDict  # the settings the network was made with
  directory: str | None = None  # a run's checkpoints/ folder (None: converted)
  step: int | None = None

  @property
  def converted(self) -> bool:
    return self.directory is None


def find(path: str, *, step: int | None = None,
         config: ml_collections.ConfigDict | None = None) -> Checkpoint:
  """A dd_jax run folder / its checkpoints/ / one step folder (the run's best step when several;
  `step` picks one), or a converted original checkpoint.

  config: only for converted checkpoints, whose own file stores the model settings only
    (default: configs/pose.py or force.py with those settings).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.isfile(os.path.join(path, lightning.META_FILE)):
    return Checkpoint(path, _converted_config(path, config))
  if config is not None:
    raise ValueError(f"{path}: a dd_jax run stores its own config; config= is only for "
                     "converted original checkpoints")
  try:
    directory, found_step = resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{path}: neither a dd_jax run or checkpoint folder (checkpoints/<step>/state) nor a "
        f"converted DeltaDorsal checkpoint ({lightning.META_FILE}); {e}") from None
  step = found_step if step is None else step
  if step is None:  # a run: its best checkpoint, as the trainer's test phase takes
    latest = latest_step(directory)
    run_config = _run_config(directory, latest)
    best = best_step(directory, run_config.best_metric, run_config.best_mode)
    step = latest if best is None else best
  if not os.path.isdir(os.path.join(directory, str(step), "state")):
    raise FileNotFoundError(f"{os.path.join(directory, str(step), 'state')}: no such checkpoint "
                            f"step (steps: {ocp.utils.checkpoint_steps(directory)})")
  return Checkpoint(os.path.join(directory, str(step)), _run_config(directory, step),
                    directory, step)


def _run_config(directory: str, step: int) -> ml_collections.ConfigDict:
  meta = read_meta(directory, step)
  if "config" not in meta:
    raise ValueError(f"{directory}/{step}: the checkpoint's meta holds no 'config'")
  return ml_collections.ConfigDict(json.loads(meta["config"]))


def _converted_config(path: str, config: ml_collections.ConfigDict | None
                      ) -> ml_collections.ConfigDict:
  meta = lightning.read_checkpoint_meta(path)
  task = meta.get("task")
  if config is None:
    if task not in ("pose", "force"):
      raise ValueError(f"{path}/{lightning.META_FILE}: task {task!r}, expected 'pose' or 'force'")
    config = default_config.pose_config() if task == "pose" else default_config.force_config()
    config.model = ml_collections.ConfigDict(meta["model"])
    return config
  if config.task != task:
    raise ValueError(f"{path}: a converted {task} checkpoint, but config.task is {config.task!r}")
  return ml_collections.ConfigDict(config.to_dict())


def load_params(checkpoint: Checkpoint, model: nnx.Module) -> None:
  """Overwrites the parameters of a built network (dtypes and shardings kept) with the
  checkpoint's; its other variables (RoPE periods) too where the checkpoint holds them. A run
  that kept an EMA of its weights gives the EMA: the weights it validated and tested.

  A converted original has no weights for an `attn` pool (the original draws a new one on every
  call): that layer keeps what `model` holds.
  """
  if checkpoint.converted:
    lightning.apply_deltadorsal_checkpoint(model, checkpoint.path)  # every parameter checked
    return
  # The run's own split: its trainable part sits under "train", the rest under "frozen".
  depth = deltadorsal.backbone_config_from(checkpoint.config).depth
  is_trainable = optim.trainable_filter(
      depth, checkpoint.config.model.backbone.n_unfrozen_blocks)
  _, trainable, frozen = nnx.split(model, is_trainable, ...)
  # Configs saved before optimizer.ema_decay existed have no such field.
  ema = bool(checkpoint.config.optimizer.get("ema_decay"))
  trainable, frozen = restore_params(checkpoint.directory, checkpoint.step, trainable, frozen,
                                     ema=ema)
  nnx.update(model, trainable, frozen)
