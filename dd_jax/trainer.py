"""train_and_evaluate: the whole DeltaDorsal run, phase by phase, on any mesh.

Phases: run folder and mesh -> MANO, task and data -> model, trainable split and optimizer ->
restore -> epochs of sharded train steps with validation, checkpoints and early stopping ->
test. The same code runs on one CPU, 8 devices or many hosts (jax.distributed).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dd_jax import checkpointing, evaluation, logs, optim, parallel, train_state
from dd_jax import params as params_lib
from dd_jax.logs import log
from dd_jax.data import pipeline, validation
from dd_jax.synthetic import dataset as synthetic_dataset


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# Fault injection for the resume tests: the process SIGKILLs itself right after this train step.
_SIGKILL_AT_STEP = int(os.environ.get("DD_JAX_SIGKILL_AT_STEP", "0"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Trains (config.train) and tests (config.test); returns the final val/test metrics.

  mesh: defaults to every device of every process.
  """
  # ---------------------------------------------------------------- run folder and mesh
  workdir = os.path.abspath(workdir)
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_sizes(mesh, config.data.batch_size, config.data.eval_batch_size)
  writer = logs.MetricWriter(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  log.info("config:\n%s", config)
  log.info("mesh: %d devices over %d processes (%s)", jax.device_count(), jax.process_count(),
               jax.devices()[0].platform)

  # ---------------------------------------------------------------- data, model, optimizer
  prepare_data(config.data, config.task)
  if config.task == "force" and not config.loss.class_counts:
    config.loss.class_counts = pipeline.class_counts(config.data, config.data.train_split,
                                                     config.model.head.n_classes)
    log.info("loss.class_counts from the train split: %s", config.loss.class_counts)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  built = train_state.build(config, mesh)
  task, state, frozen = built.task, built.state, built.frozen
  n_trainable = params_lib.count_params(state["params"])
  n_total = params_lib.count_params(nnx.state(built.model(), nnx.Param))
  log.info("parameters: %s total, %s trainable", f"{n_total:,}", f"{n_trainable:,}")
  writer.text("config", f"```\n{config}\n```\n\nparameters: {n_total:,} total, {n_trainable:,} trainable")

  # ---------------------------------------------------------------- restore
  ckpt_dir = os.path.join(workdir, "checkpoints")
  manager = checkpointing.make_manager(ckpt_dir, config.best_metric, config.best_mode)
  train_loader = pipeline.make_train_loader(config.data, config.task, seed=config.seed, **proc) \
      if config.train else None
  train_iter = iter(train_loader) if train_loader is not None else None
  epoch, progress = 0, {"best": None, "stale_epochs": 0}
  source = _checkpoint_to_restore(config, manager)
  if source is not None:
    state, frozen, meta = _restore(source, state, frozen, train_iter if config.train else None)
    epoch = meta["epoch"]
    progress = {k: meta.get(k, v) for k, v in progress.items()}
    log.info("restored %s (epoch %d, step %d)", source, epoch, int(state["step"]))

  try:
    # ---------------------------------------------------------------- train
    results: dict[str, float] = {}
    if config.train:
      epoch = _train_epochs(config, mesh, task, built.train_step, built.eval_step, state, frozen,
                            train_iter, train_loader.steps_per_epoch, manager, writer, epoch,
                            progress, results, proc)
      state = None  # donated away; the test restores the best checkpoint
      manager.wait_until_finished()

    # ---------------------------------------------------------------- test
    if config.test:
      if config.train:  # test the best epoch, as the original does
        best_step = manager.best_step()
        restored, frozen, meta = _restore((ckpt_dir, best_step), built.abstract_state, frozen, None)
        params, epoch = restored["params"], meta["epoch"]
      elif source is None:
        raise ValueError("config.test without config.train needs config.ckpt_path (a run folder "
                         "or one of its checkpoint steps)")
      else:
        params = state["params"]
      test_loader = pipeline.make_eval_loader(config.data, config.task, config.data.test_split, **proc)
      metrics, outputs = evaluation.evaluate(built.eval_step, (params, frozen, task.consts), test_loader, mesh,
                                             task.finalize, keep_outputs=True)
      metrics = {f"test/{k}": v for k, v in metrics.items()}
      results.update(metrics)
      writer.scalars(int(epoch), metrics)
      if jax.process_index() == 0:
        write_test_outputs(workdir, epoch, task.test_record(outputs), metrics)
        for name, picture in task.summary_pictures(outputs):
          writer.image(int(epoch), f"test/{name}", picture)
      log.info("test: %s", _fmt(metrics))
  finally:  # a save in flight holds good state: let it finish, whatever stopped the run
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if results:
    log.info("results (%s):\n%s", workdir, task.summary(results))
  return results


# ------------------------------------------------------------------ pieces of the run


def prepare_data(data_config: ml_collections.ConfigDict, task: str) -> None:
  """Generates the synthetic set when the config asks for one (the demo) and it is not there
  yet, then checks every file the run will read (data.validate)."""
  synthetic = data_config.synthetic
  if synthetic.enabled:
    synthetic_dataset.ensure_synthetic_dataset(
        data_config.data_dir, participants=synthetic.participants, trials=synthetic.trials,
        frames=synthetic.frames, image_size=synthetic.image_size, seed=synthetic.seed)
  if data_config.validate:
    logging.info("%s", validation.validate_dataset(data_config, task))


def _checkpoint_to_restore(config, manager):
  """Explicit ckpt_path wins; otherwise a run resumes from its own latest checkpoint."""
  if config.ckpt_path:
    directory, step = checkpointing.resolve(config.ckpt_path)
    if step is None:
      other = checkpointing.make_manager(directory, config.best_metric, config.best_mode,
                                         read_only=True)
      step = other.latest_step() if config.train else other.best_step()
      other.close()
    return directory, step
  if config.train and manager.latest_step() is not None:
    return str(manager.directory), manager.latest_step()
  return None


def _restore(source, state, frozen, train_iter):
  directory, step = source
  manager = checkpointing.make_manager(directory, "unused", "min", read_only=True)
  abstract = {"train": checkpointing.abstract(state), "frozen": checkpointing.abstract(frozen)}
  restored, meta = checkpointing.restore(manager, step, abstract, train_iter)
  manager.close()
  return restored["train"], restored["frozen"], meta


def _train_epochs(config, mesh, task, train_step, eval_step, state, frozen, train_iter,
                  steps_per_epoch, manager, writer, start_epoch, progress, results, proc) -> int:
  """Runs the remaining epochs; returns the number of the last epoch trained."""
  consts = task.consts
  best_sign = -1.0 if config.best_mode == "min" else 1.0
  step = int(state["step"])
  skip = step - start_epoch * steps_per_epoch  # resumed mid-epoch: steps already done
  compiled_step = None  # compiled on the first batch: every train batch has its shapes
  for epoch in range(start_epoch, config.max_epochs):
    console = logs.Progress(steps_per_epoch, epoch, config.max_epochs)
    window: list[dict[str, jax.Array]] = []
    for i in range(skip, steps_per_epoch):
      batch = parallel.global_batch(mesh, next(train_iter))
      if compiled_step is None:
        compiled_step = train_state.compile_step(train_step, state, frozen, batch, consts)
      state, metrics = compiled_step(state, frozen, batch, consts)
      window.append(metrics)
      step += 1
      last = i + 1 == steps_per_epoch
      if step % config.log_every_steps == 0 or last:
        means = _check_and_mean(window, step, epoch)
        window = []
        means["lr"] = config.optimizer.lr * float(state["plateau"].scale)
        writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
        console.update(i + 1, {"loss": means["loss"]})
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and not last:
        _check_and_mean(window, step, epoch)
        checkpointing.save(manager, step, {"train": state, "frozen": frozen}, train_iter,
                           dict(progress, epoch=epoch, config=config.to_json_best_effort()))
      if step == _SIGKILL_AT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    skip = 0

    # Validation, scheduler, best checkpoint, early stopping.
    val_loader = pipeline.make_eval_loader(config.data, config.task, config.data.val_split, **proc)
    hook = lambda local, host, e=epoch: _val_pictures(task, writer, step, local, host)
    val, _ = evaluation.evaluate(eval_step, (state["params"], frozen, task.consts), val_loader, mesh,
                                 task.finalize, first_batch_hook=hook)
    val = {f"val/{k}": v for k, v in val.items()}
    for name, picture in task.summary_pictures(None):
      writer.image(step, f"val/{name}", picture)
    state = dict(state, plateau=optim.plateau_step(config, state["plateau"], val["val/loss"]))
    score = val[config.best_metric]
    improved = progress["best"] is None or best_sign * (score - progress["best"]) > 0
    progress = {"best": score if improved else progress["best"],
                "stale_epochs": 0 if improved else progress["stale_epochs"] + 1}
    writer.scalars(step, {**val, "epoch": epoch + 1})
    if improved:  # the closing summary reports the epoch that is tested: the best
      results.update(val)
    log.info("epoch %d: %s (best %s %.4f)", epoch + 1, _fmt(val), config.best_metric,
             progress["best"])
    checkpointing.save(manager, step, {"train": state, "frozen": frozen}, train_iter,
                       dict(progress, epoch=epoch + 1, config=config.to_json_best_effort()),
                       metrics={k: float(v) for k, v in val.items()})
    if (config.early_stopping_patience and epoch + 1 >= config.min_epochs
        and progress["stale_epochs"] >= config.early_stopping_patience):
      log.info("early stopping: %s did not improve for %d epochs", config.best_metric,
               progress["stale_epochs"])
      return epoch + 1
  return config.max_epochs


def _check_and_mean(window, step, epoch) -> dict[str, float]:
  if not window:
    return {}
  host = jax.device_get(window)
  losses = np.array([m["loss"] for m in host], np.float64)
  if not np.all(np.isfinite(losses)):
    bad = step - len(losses) + int(np.argmin(np.isfinite(losses))) + 1
    raise NonFiniteLossError(
        f"training loss became {losses[~np.isfinite(losses)][0]} at step {bad} (epoch {epoch + 1}); "
        "stopping. The parameters were not updated with it, and the last saved checkpoint is intact: "
        "lower optimizer.lr, check the input data, or resume from the checkpoint.")
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _val_pictures(task, writer, step, local_batch, host_outputs):
  for name, picture in task.pictures(local_batch, host_outputs):
    writer.image(step, f"val/{name}", picture)


def write_test_outputs(workdir: str, epoch: int, record: dict[str, Any], metrics: dict) -> str:
  """test_outputs_epoch{N}.npy (a pickled dict, as the original writes) and the metrics JSON."""
  path = os.path.join(workdir, f"test_outputs_epoch{int(epoch)}.npy")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, record, allow_pickle=True)
  os.replace(tmp, path)
  with open(os.path.join(workdir, f"test_metrics_epoch{int(epoch)}.json"), "w", encoding="utf-8") as f:
    json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)
  return path


def _fmt(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))

