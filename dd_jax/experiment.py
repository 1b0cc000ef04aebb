"""train_and_evaluate: the whole DeltaDorsal run, phase by phase, on any mesh.

Phases: run folder and mesh -> data (the synthetic set when the config asks for it), task,
model, trainable split and optimizer -> restore -> epochs of sharded train steps with
validation, checkpoints and early stopping -> test. The same code runs on one CPU, 8 devices or
many hosts (jax.distributed). `python -m dd_jax.train` and `python -m dd_jax.evaluate` call it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dd_jax import (
  checkpointing,
  default_config,
  evaluation,
  logs,
  optim,
  parallel,
  run_lock,
  train_state,
)
from dd_jax import params as params_lib
from dd_jax.data import pipeline, validation
from dd_jax.logs import log
from dd_jax.synthetic import dataset as synthetic_dataset


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Trains (config.train) and tests (config.test); returns the final val/test metrics.

  mesh: defaults to every device of every process.
  """
  workdir = os.path.abspath(workdir)
  default_config.check(config)
  with run_lock.hold(workdir, enabled=jax.process_index() == 0):  # one run per folder
    return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        mesh: jax.sharding.Mesh | None) -> dict[str, float]:
  # ---------------------------------------------------------------- run folder and mesh
  if config.train:  # a run that could not save stops now, not after an epoch
    checkpointing.check_writable(os.path.join(workdir, "checkpoints"))
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_sizes(mesh, config.data.batch_size, config.data.eval_batch_size,
                             config.optimizer.accumulate_steps)
  writer = logs.MetricWriter(workdir, config)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  log.info("config:\n%s", config)
  log.info("mesh: %d devices over %d processes (%s)", jax.device_count(), jax.process_count(),
           jax.devices()[0].platform)

  # ---------------------------------------------------------------- where the run starts
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), config.best_metric,
                                       config.best_mode)
  source = checkpointing.resume_point(config, manager)
  if source is not None and source.converted:  # testing a converted original: its network
    config = source.config

  # ---------------------------------------------------------------- data, model, optimizer
  prepare_data(config.data, config.task)
  if config.task == "force" and not config.loss.class_counts:
    config.loss.class_counts = pipeline.class_counts(config.data, config.data.train_split,
                                                     config.model.head.n_classes)
    log.info("loss.class_counts from the train split: %s", config.loss.class_counts)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_loader = (pipeline.make_train_loader(config.data, config.task, seed=config.seed, **proc)
                  if config.train else None)
  if config.train and config.optimizer.schedule != "plateau" and not config.optimizer.decay_steps:
    config.optimizer.decay_steps = config.max_epochs * train_loader.steps_per_epoch
    log.info("optimizer.decay_steps = max_epochs x steps per epoch = %d",
             config.optimizer.decay_steps)
  setup = train_state.build(config, mesh)
  task, state, frozen = setup.task, setup.state, setup.frozen
  all_params = nnx.state(setup.model(), nnx.Param)
  n_total = params_lib.count_params(all_params)
  groups = optim.group_table(config, all_params)
  log.info("parameters: %s total; optimizer groups:\n%s", f"{n_total:,}", groups)
  writer.text("config",
              f"```\n{config}\n```\n\nparameters: {n_total:,} total\n\n```\n{groups}\n```")

  # ---------------------------------------------------------------- restore
  train_iter = iter(train_loader) if train_loader is not None else None
  epoch, progress = 0, {"best": None, "stale_epochs": 0}
  if source is not None:
    state, frozen, meta = checkpointing.restore(source, setup, train_iter)
    epoch = meta["epoch"]
    progress = {k: meta.get(k, v) for k, v in progress.items()}
    log.info("restored %s (epoch %d, step %d)", source.path, epoch, int(state["step"]))
  elif config.train and config.init_from:
    state, frozen = checkpointing.initial_state(config.init_from, setup)
    log.info("initialised from %s: parameters loaded, fresh optimizer", config.init_from)
  if config.train:  # records of steps this state does not include came from a run that died
    writer.forget_after(int(state["step"]))

  try:
    # ---------------------------------------------------------------- train
    results: dict[str, float] = {}
    if config.train:
      loop = _Loop(config, setup, writer, manager, train_iter, train_loader.steps_per_epoch, proc)
      epoch, best_val = _train_epochs(loop, state, frozen, epoch, progress)
      results.update(best_val)
      state = None  # donated away; the test restores the best checkpoint
      manager.wait_until_finished()

    # ---------------------------------------------------------------- test
    if config.test:
      if config.train:  # test the best epoch, as the original does
        restored, frozen, meta = checkpointing.restore_training(
            str(manager.directory), manager.best_step(), setup.abstract_state, frozen)
        params, epoch = optim.evaluated_params(restored), meta["epoch"]
      elif source is None:
        raise ValueError("config.test without config.train needs config.ckpt_path (a run folder "
                         "or one of its checkpoint steps)")
      else:
        params = optim.evaluated_params(state)
      test_loader = pipeline.make_eval_loader(config.data, config.task, config.data.test_split,
                                              **proc)
      tested = evaluation.evaluate(setup.eval_step, (params, frozen, task.consts), test_loader,
                                   mesh, task.finalize, keep_outputs=True)
      metrics = {f"test/{k}": v for k, v in tested.metrics.items()}
      results.update(metrics)
      writer.scalars(int(epoch), metrics)
      if jax.process_index() == 0:
        write_test_outputs(workdir, epoch, task.test_record(tested.outputs), metrics)
        for name, picture in task.summary_pictures(tested.drawn):
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


@dataclasses.dataclass(frozen=True)
class _Loop:
  """What every epoch of a run uses."""
  config: ml_collections.ConfigDict
  setup: train_state.TrainSetup
  writer: logs.MetricWriter
  manager: Any  # orbax CheckpointManager
  train_iter: pipeline.BatchIterator
  steps_per_epoch: int
  proc: dict[str, int]  # process_index, process_count

  def save(self, step: int, state, frozen, meta: dict, metrics=None) -> None:
    checkpointing.save(self.manager, step, state, frozen, self.train_iter,
                       dict(meta, config=self.config.to_json_best_effort()), metrics=metrics)


def _train_epochs(loop: _Loop, state, frozen, start_epoch: int, progress: dict
                  ) -> tuple[int, dict[str, float]]:
  """Runs the remaining epochs -> (the last epoch trained, the best epoch's val metrics, empty
  when no epoch of this call improved on the restored best)."""
  config, setup, writer = loop.config, loop.setup, loop.writer
  task, mesh, consts = setup.task, setup.mesh, setup.task.consts
  best_sign = -1.0 if config.best_mode == "min" else 1.0
  best_val: dict[str, float] = {}
  step = int(state["step"])
  skip = step - start_epoch * loop.steps_per_epoch  # resumed mid-epoch: steps already done
  compiled_step = None  # compiled on the first batch: every train batch has its shapes
  lr_schedule = optim.lr_schedule(config)
  for epoch in range(start_epoch, config.max_epochs):
    console = logs.Progress(loop.steps_per_epoch, epoch, config.max_epochs)
    window: list[dict[str, jax.Array]] = []
    for i in range(skip, loop.steps_per_epoch):
      batch = parallel.global_batch(mesh, next(loop.train_iter))
      if compiled_step is None:
        compiled_step = train_state.compile_step(setup.train_step, state, frozen, batch, consts)
      state, metrics = compiled_step(state, frozen, batch, consts)
      window.append(metrics)
      step += 1
      last = i + 1 == loop.steps_per_epoch
      if step % config.log_every_steps == 0 or last:
        means = _check_and_mean(window, step, epoch, loop.manager)
        window = []
        # The base lr of the step's update: schedule x reduce-on-plateau scale.
        means["lr"] = (config.optimizer.lr * float(lr_schedule(step - 1))
                       * float(state["plateau"].scale))
        writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
        console.update(i + 1, {"loss": means["loss"]})
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and not last:
        _check_and_mean(window, step, epoch, loop.manager)
        loop.save(step, state, frozen, dict(progress, epoch=epoch))
    skip = 0

    # Validation, scheduler, best checkpoint, early stopping.
    val_loader = pipeline.make_eval_loader(config.data, config.task, config.data.val_split,
                                           **loop.proc)
    validated = evaluation.evaluate(setup.eval_step,
                                    (optim.evaluated_params(state), frozen, consts),
                                    val_loader, mesh, task.finalize, keep_first_batch=True)
    for name, picture in task.pictures(*validated.first_batch):
      writer.image(step, f"val/{name}", picture)
    for name, picture in task.summary_pictures(validated.drawn):
      writer.image(step, f"val/{name}", picture)
    val = {f"val/{k}": v for k, v in validated.metrics.items()}
    state = dict(state, plateau=optim.plateau_step(config, state["plateau"], val["val/loss"]))
    score = val[config.best_metric]
    improved = progress["best"] is None or best_sign * (score - progress["best"]) > 0
    progress = {"best": score if improved else progress["best"],
                "stale_epochs": 0 if improved else progress["stale_epochs"] + 1}
    writer.scalars(step, {**val, "epoch": epoch + 1})
    if improved:  # the closing summary reports the epoch that is tested: the best
      best_val = val
    log.info("epoch %d: %s (best %s %.4f)", epoch + 1, _fmt(val), config.best_metric,
             progress["best"])
    loop.save(step, state, frozen, dict(progress, epoch=epoch + 1),
              metrics={k: float(v) for k, v in val.items()})
    if (config.early_stopping_patience and epoch + 1 >= config.min_epochs
        and progress["stale_epochs"] >= config.early_stopping_patience):
      log.info("early stopping: %s did not improve for %d epochs", config.best_metric,
               progress["stale_epochs"])
      return epoch + 1, best_val
  return config.max_epochs, best_val


def _check_and_mean(window, step, epoch, manager) -> dict[str, float]:
  if not window:
    return {}
  host = jax.device_get(window)
  losses = np.array([m["loss"] for m in host], np.float64)
  if not np.all(np.isfinite(losses)):
    bad = step - len(losses) + int(np.argmin(np.isfinite(losses))) + 1
    saved = manager.latest_step()
    kept = (f"the last saved checkpoint (step {saved}) is intact: lower optimizer.lr, check the "
            "input data, or resume from it." if saved is not None else
            "no checkpoint was saved before it: lower optimizer.lr or check the input data, "
            "and start again.")
    raise NonFiniteLossError(
        f"training loss became {losses[~np.isfinite(losses)][0]} at step {bad} (epoch "
        f"{epoch + 1}); stopping. The parameters were not updated with it, and {kept}")
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def write_test_outputs(workdir: str, epoch: int, record: dict[str, Any], metrics: dict) -> str:
  """test_outputs_epoch{N}.npy (a pickled dict, as the original writes) and the metrics JSON."""
  path = os.path.join(workdir, f"test_outputs_epoch{int(epoch)}.npy")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, record, allow_pickle=True)
  os.replace(tmp, path)
  with open(os.path.join(workdir, f"test_metrics_epoch{int(epoch)}.json"), "w",
            encoding="utf-8") as f:
    json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)
  return path


def _fmt(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
