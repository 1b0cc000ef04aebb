"""Orbax checkpoints of a training run, and every way dd_jax reads checkpoints back.

A run's `checkpoints/<step>/` holds `state` ({"train": the train state, "frozen": the frozen
variables}), `data` (every process's Grain iterator position) and `meta` (epoch, early-stopping
counters, config). Mid-epoch saves carry no metrics and are kept only while they are the latest;
epoch-end saves carry the validation metrics and compete for "best".

Reading: `resolve` a run, its checkpoints/ folder or one step folder; `latest_step` /
`best_step` of a run (opened read-only); `restore_training` (resume, test) or `restore_params`
(parameters only). `find` + `load_params` put the parameters of a run's step, of a converted
original DeltaDorsal checkpoint (tools/convert_deltadorsal.py) or of a converted DINOv3 backbone
(tools/convert_dinov3.py) into a built network. The trainer starts from `resume_point` +
`restore` (its own latest step, or config.ckpt_path) or `initial_state` (config.init_from).
A step folder that is not a dd_jax checkpoint is a CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from dd_jax import default_config, optim
from dd_jax import params as params_lib
from dd_jax.convert import lightning
from dd_jax.logs import log
from dd_jax.models import deltadorsal, dinov3_weights


def _state_item(train_state: Any, frozen: Any) -> dict[str, Any]:
  """The `state` item of a step: the one place its layout is spelled."""
  return {"train": train_state, "frozen": frozen}


# ------------------------------------------------------------------ writing (the trainer)


class CheckpointWriteError(OSError):
  """The run cannot write its checkpoints; the message names the folder."""


def check_writable(directory: str) -> None:
  """Creates `directory` if needed and writes and removes a probe file in it, so that a run that
  could not save fails at start-up naming the folder (not after an epoch, nor hung in Orbax's
  writer threads)."""
  probe = os.path.join(directory, f".write_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointWriteError(
        f"{directory}: checkpoints cannot be written there ({e.strerror or e}). Make the folder "
        "writable, free space, or give another --workdir; nothing was changed in it.") from e


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


class CheckpointError(ValueError):
  """A checkpoint that cannot be read as what it should be; the message names its folder."""


def _check_step(directory: str, step: int) -> str:
  """The step folder, if it holds a dd_jax checkpoint (state/ and meta/); else CheckpointError."""
  folder = os.path.join(os.path.abspath(directory), str(step))
  missing = [item for item in ("state", "meta") if not os.path.isdir(os.path.join(folder, item))]
  if missing:
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
    raise CheckpointError(f"{folder}: not a dd_jax checkpoint step (no {' or '.join(missing)}/; "
                          f"found {found}). Move it out of {directory} or pick another step.")
  return folder


def _restore(directory: str, step: int, restore: Callable[[ocp.CheckpointManager], Any]) -> Any:
  """restore(a read-only manager of `directory`) of a checked step; Orbax's errors about a
  damaged step become a CheckpointError naming the folder."""
  folder = _check_step(directory, step)
  manager = _open_read_only(directory)
  try:
    return restore(manager)
  except (KeyError, FileNotFoundError, ValueError) as e:
    raise CheckpointError(f"{folder}: unreadable dd_jax checkpoint ({type(e).__name__}: {e})"
                          ) from e
  finally:
    manager.close()


def read_meta(directory: str, step: int) -> dict:
  return _restore(directory, step, lambda manager: manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore_training(directory: str, step: int, abstract_train_state, abstract_frozen,
                     data_iterator=None) -> tuple[Any, Any, dict]:
  """(train state, frozen, meta) of a step, placed as the abstract trees' shardings say; moves
  `data_iterator` (when given) to the saved position."""
  items = dict(state=ocp.args.StandardRestore(_state_item(abstract(abstract_train_state),
                                                          abstract(abstract_frozen))),
               meta=ocp.args.JsonRestore())
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = _restore(directory, step,
                      lambda manager: manager.restore(step, args=ocp.args.Composite(**items)))
  state = restored["state"]
  return state["train"], state["frozen"], restored["meta"]


def _state_dir(directory: str, step: int) -> str:
  return os.path.join(_check_step(directory, step), "state")


def restore_params(directory: str, step: int, abstract_params, abstract_frozen, *,
                   ema: bool = False) -> tuple[Any, Any]:
  """(trainable params, frozen) of a step; no optimizer state or iterator position is read.

  ema: read the trainable parameters' EMA instead (kept, and validated, when the run had
  optimizer.ema_decay > 0).
  """
  key = "ema" if ema else "params"
  target = _state_item({key: abstract(abstract_params)}, abstract(abstract_frozen))
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(_state_dir(directory, step), args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return restored["train"][key], restored["frozen"]


def param_shapes(directory: str, step: int) -> dict[str, tuple]:
  """{"head.mlp1.kernel": shape, ...} of every variable a step holds (trainable and frozen),
  read from Orbax's metadata."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(_state_dir(directory, step)).item_metadata.tree
  variables = dict(params_lib.flatten_params(tree["train"]["params"]))
  variables.update(params_lib.flatten_params(tree["frozen"]))
  # Each nnx variable is saved as {"value": array}.
  return {params_lib.path_str(path[:-1] if path[-1] == "value" else path): tuple(meta.shape)
          for path, meta in variables.items()}


def resolve(path: str) -> tuple[str, int | None]:
  """A run directory, its checkpoints/ folder or one step folder -> (checkpoints dir, step).

  step is None when the folder holds several steps: the caller takes the latest or best one.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.basename(path).isdigit() and not ocp.utils.checkpoint_steps(path):
    _check_step(os.path.dirname(path), int(os.path.basename(path)))  # a step folder, or junk
    return os.path.dirname(path), int(os.path.basename(path))
  if not ocp.utils.checkpoint_steps(path):
    raise FileNotFoundError(f"{path} holds no dd_jax checkpoint (no step folders)")
  return path, None


def resume_point(config: ml_collections.ConfigDict, manager: ocp.CheckpointManager
                 ) -> Checkpoint | None:
  """What a run restores: config.ckpt_path (a run: its latest step when training, its best when
  only testing; a converted original checkpoint: testing only) or, when training, the latest
  checkpoint of its own `manager`; None: start afresh (or from config.init_from)."""
  if config.ckpt_path:
    if _kind(config.ckpt_path) != RUN:
      if config.train:
        raise CheckpointError(
            f"config.ckpt_path={config.ckpt_path}: a converted checkpoint has no training state "
            f"to resume; fine-tune from it with --config.init_from={config.ckpt_path}, or test "
            "it with --config.train=False")
      return find(config.ckpt_path, config=config)
    directory, step = resolve(config.ckpt_path)
    if step is None:
      step = (latest_step(directory) if config.train
              else best_step(directory, config.best_metric, config.best_mode))
    return find(directory, step=step)
  if config.train and manager.latest_step() is not None:
    return find(str(manager.directory), step=manager.latest_step())
  return None


def abstract(tree):
  """ShapeDtypeStructs with shardings: what a restore needs to place arrays directly."""
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ------------------------------------------------------------------ parameters from any source

RUN, DELTADORSAL, DINOV3 = "run", "deltadorsal", "dinov3"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Where a network's parameters come from: one step of a dd_jax run, a converted original
  DeltaDorsal checkpoint (deltadorsal.json + params/), or a converted DINOv3 backbone
  (dinov3.json + params/: model.backbone only)."""
  path: str  # the step folder, or the converted folder
  kind: str  # RUN, DELTADORSAL or DINOV3
  config: ml_collections.ConfigDict | None  # the network's settings (None: a backbone alone)
  directory: str | None = None  # a run's checkpoints/ folder
  step: int | None = None

  @property
  def converted(self) -> bool:
    return self.kind != RUN


def _kind(path: str) -> str:
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(os.path.join(path, lightning.META_FILE)):
    return DELTADORSAL
  if os.path.isfile(os.path.join(path, dinov3_weights.CONFIG_FILE)):
    return DINOV3
  return RUN


def find(path: str, *, step: int | None = None,
         config: ml_collections.ConfigDict | None = None) -> Checkpoint:
  """A dd_jax run folder / its checkpoints/ / one step folder (the run's best step when several;
  `step` picks one), a converted original DeltaDorsal checkpoint, or a converted DINOv3 backbone.

  config: only for converted DeltaDorsal checkpoints, whose own file stores the model settings
    only: the checkpoint's network settings, everything else from `config` (default:
    configs/pose.py or force.py).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  kind = _kind(path)
  if kind == DELTADORSAL:
    return Checkpoint(path, kind, _converted_config(path, config))
  if config is not None:
    raise ValueError(f"{path}: a dd_jax run or a DINOv3 backbone; config= is only for converted "
                     "DeltaDorsal checkpoints")
  if kind == DINOV3:
    dinov3_weights.read_config(path)  # a readable format
    return Checkpoint(path, kind, None)
  try:
    directory, found_step = resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{path}: neither a dd_jax run or checkpoint folder (checkpoints/<step>/state), a "
        f"converted DeltaDorsal checkpoint ({lightning.META_FILE}) nor a converted DINOv3 "
        f"backbone ({dinov3_weights.CONFIG_FILE}); {e}") from None
  step = found_step if step is None else step
  if step is None:  # a run: its best checkpoint, as the trainer's test phase takes
    latest = latest_step(directory)
    run_config = _run_config(directory, latest)
    best = best_step(directory, run_config.best_metric, run_config.best_mode)
    step = latest if best is None else best
  if not os.path.isdir(os.path.join(directory, str(step))):
    raise FileNotFoundError(f"{os.path.join(directory, str(step))}: no such checkpoint step "
                            f"(steps: {ocp.utils.checkpoint_steps(directory)})")
  return Checkpoint(_check_step(directory, step), kind, _run_config(directory, step), directory,
                    step)


def _run_config(directory: str, step: int) -> ml_collections.ConfigDict:
  meta = read_meta(directory, step)
  if "config" not in meta:
    raise CheckpointError(f"{directory}/{step}: the checkpoint's meta holds no 'config'")
  return ml_collections.ConfigDict(json.loads(meta["config"]))


# Settings of how a network is run or trained, not of what it is: the caller's config keeps them
# when a converted checkpoint supplies the rest of config.model.
_RUN_SETTINGS = ("backbone.dtype", "backbone.frozen_dtype", "backbone.weights",
                 "backbone.n_unfrozen_blocks", "backbone.rope_rescale")


def _converted_config(path: str, config: ml_collections.ConfigDict | None
                      ) -> ml_collections.ConfigDict:
  """`config` with the network settings of a converted checkpoint (those of how it runs, e.g.
  backbone.dtype, stay the config's), or without `config` the task's default config with all of
  the checkpoint's model settings; a checkpoint of the other task is an error."""
  meta = lightning.read_checkpoint_meta(path)
  task = meta.get("task")
  if task not in ("pose", "force"):
    raise ValueError(f"{path}/{lightning.META_FILE}: task {task!r}, expected 'pose' or 'force'")
  given = config is not None
  if not given:
    config = default_config.pose_config() if task == "pose" else default_config.force_config()
  elif config.task != task:
    raise ValueError(f"{path}: a converted {task} checkpoint, but config.task is {config.task!r}")
  merged = ml_collections.ConfigDict(config.to_dict())
  merged.model = ml_collections.ConfigDict(meta["model"])
  stored = {params_lib.path_str(k): v for k, v in params_lib.flatten_params(meta["model"])}
  differences = []
  for key, value in params_lib.flatten_params(config.model.to_dict()):
    name = params_lib.path_str(key)
    if name in stored and not (given and name in _RUN_SETTINGS):
      if _plain(stored[name]) != _plain(value):
        differences.append(f"model.{name}={stored[name]!r} (config: {value!r})")
      continue
    node = merged.model
    for part in key[:-1]:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    with node.ignore_type():
      node[key[-1]] = value
  if given and differences:
    log.warning("%s: the network is the checkpoint's; these settings replace the config's: %s",
                path, ", ".join(differences))
  return merged


def _plain(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def load_params(checkpoint: Checkpoint, model: nnx.Module) -> None:
  """Overwrites the parameters of a built network (dtypes and shardings kept) with the
  checkpoint's; its other variables (RoPE periods) too where the checkpoint holds them. A run
  that kept an EMA of its weights gives the EMA: the weights it validated and tested. A
  DINOv3 backbone fills model.backbone only. What does not fit (missing, unexpected or
  mis-shaped arrays) is one error listing all of it.

  A converted original has no weights for an `attn` pool (the original draws a new one on every
  call): that layer keeps what `model` holds.
  """
  if checkpoint.kind == DELTADORSAL:
    lightning.apply_deltadorsal_checkpoint(model, checkpoint.path)  # every parameter checked
    return
  if checkpoint.kind == DINOV3:
    dinov3_weights.load_weights(model.backbone, checkpoint.path)
    return
  problems = params_lib.fit_problems(nnx.state(model),
                                     param_shapes(checkpoint.directory, checkpoint.step))
  if problems:
    raise CheckpointError(f"{checkpoint.path}: does not fit the {type(model).__name__}:\n  "
                          + "\n  ".join(problems))
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


# ------------------------------------------------------------------ starting states


def restore(checkpoint: Checkpoint, setup, data_iterator=None) -> tuple[Any, Any, dict]:
  """(train state, frozen, meta) to continue from: a run's step as saved (optimizer, counters,
  `data_iterator` position), or a converted original's parameters in a fresh state (testing)."""
  if checkpoint.kind == RUN:
    return restore_training(checkpoint.directory, checkpoint.step, setup.abstract_state,
                            setup.frozen, data_iterator)
  state, frozen = _fresh_state(checkpoint, setup)
  return state, frozen, {"epoch": 0}


def initial_state(path: str, setup) -> tuple[Any, Any]:
  """(train state, frozen) for fine-tuning from `path` (config.init_from): a dd_jax run (its
  best step) or step, a converted DeltaDorsal checkpoint, or a converted DINOv3 backbone (the
  rest keeps its fresh initialisation). The parameters are loaded and checked, the optimizer
  and schedule start afresh at step 0."""
  checkpoint = find(path)
  task = setup.config.task
  if checkpoint.config is not None and checkpoint.config.task != task:
    raise CheckpointError(f"config.init_from={path}: a {checkpoint.config.task} checkpoint; this "
                          f"run's task is {task}")
  return _fresh_state(checkpoint, setup)


def _fresh_state(checkpoint: Checkpoint, setup) -> tuple[Any, Any]:
  model = setup.model()
  load_params(checkpoint, model)
  _, trainable, frozen = nnx.split(model, setup.is_trainable, ...)
  return setup.init_state(trainable), frozen
