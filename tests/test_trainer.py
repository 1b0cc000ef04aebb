"""The trainer: freezing, device-count invariance, SIGKILL resume, NaN stop, smoke runs."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from dd_jax import checkpointing, experiment, inference, parallel, train_state
from dd_jax.data import pipeline

import tiny


def _batches(config, n):
  it = iter(pipeline.make_train_loader(config.data, config.task, seed=config.seed))
  return [next(it) for _ in range(n)]


def _flat(state):
  return {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def test_frozen_parameters_get_no_update_and_no_backward(tiny_dataset):
  config = tiny.config("pose", tiny_dataset, **{"model.backbone.n_unfrozen_blocks": 1})
  built = train_state.build(config, parallel.make_mesh(jax.devices()[:1]))
  trainable_names = set(_flat(built.state["params"]))
  assert any(n.startswith("backbone/blocks/1/") for n in trainable_names)
  assert any(n.startswith("backbone/norm/") for n in trainable_names)
  assert not any(n.startswith(("backbone/blocks/0/", "backbone/patch_embed", "backbone/cls_token",
                               "backbone/storage_tokens")) for n in trainable_names)
  # Optimizer moments exist only for the trainable subset.
  moments = sum(x.size for x in jax.tree.leaves(built.state["opt_state"]))
  n_trainable = sum(x.size for x in jax.tree.leaves(built.state["params"]))
  assert moments <= 2 * n_trainable + 16

  frozen_before, trainable_before = _flat(built.frozen), _flat(built.state["params"])
  state = built.state
  # Two steps: the head's zero-initialised last layer passes no gradient back in the first.
  for local in _batches(config, 2):
    batch = parallel.global_batch(built.mesh, local)
    state, _ = built.train_step(state, built.frozen, batch, built.task.consts)
  for name, value in _flat(built.frozen).items():
    np.testing.assert_array_equal(value, frozen_before[name], err_msg=name)
  after = _flat(state["params"])
  still = [n for n in after if np.array_equal(after[n], trainable_before[n])]
  assert not still, f"trainable parameters that did not move: {still}"

  # The compiled step of a fully frozen backbone costs well under a fully trainable one.
  def step_flops(n_unfrozen, depth=6):
    c = tiny.config("pose", tiny_dataset, **{"model.backbone.n_unfrozen_blocks": n_unfrozen,
                                             "model.backbone.custom.depth": depth})
    b = train_state.build(c, parallel.make_mesh(jax.devices()[:1]))
    compiled = b.train_step.lower(b.state, b.frozen, batch, b.task.consts).compile()
    return compiled.cost_analysis()["flops"]

  # A backward through the frozen blocks would make the two about equal. The ratio is under
  # 0.6 with the written-out backward passes (they recompute) and 0.603 with autodiff's
  # (DD_JAX_DINOV3_IMPL=autodiff).
  frozen_flops, full_flops = step_flops(0), step_flops(6)
  assert frozen_flops < 0.7 * full_flops, (frozen_flops, full_flops)


def test_three_steps_on_eight_devices_match_one(tiny_dataset):
  config = tiny.config("pose", tiny_dataset, **{"data.batch_size": 8})
  batches = _batches(config, 3)
  losses = {}
  for n in (1, 8):
    built = train_state.build(config, parallel.make_mesh(jax.devices()[:n]))
    state, out = built.state, []
    for local in batches:
      state, metrics = built.train_step(state, built.frozen, parallel.global_batch(built.mesh, local),
                                        built.task.consts)
      out.append(float(metrics["loss"]))
    losses[n] = out
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)
  assert losses[1][2] != losses[1][0]


# The fine-tuning recipe resumes too: the schedule's position, the EMA (what validation sees)
# and the plateau state all come back from the checkpoint.
RECIPE = ["--config.optimizer.schedule=cosine", "--config.optimizer.warmup_steps=1",
          "--config.optimizer.ema_decay=0.5", "--config.optimizer.layer_decay=0.5",
          "--config.optimizer.weight_decay_exclude=True"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], RECIPE], ids=["paper", "cosine_ema"])
def test_sigkill_mid_epoch_then_resume_repeats_the_uninterrupted_run(tiny_dataset, tmp_path,
                                                                     recipe):
  config_arg = [f"--config=tests/tiny_config.py:pose,{tiny_dataset}", "--config.max_epochs=2",
                "--config.test=False", "--config.checkpoint_every_steps=2"] + recipe
  reference = str(tmp_path / "uninterrupted")
  tiny.run_train(config_arg + [f"--workdir={reference}"])
  killed = str(tmp_path / "killed")
  result = tiny.run_train(config_arg + [f"--workdir={killed}"], {"DD_JAX_SIGKILL_AT_STEP": "3"},
                          check=False)
  assert result.returncode == -9, result.stderr[-2000:]
  first = tiny.train_losses(killed)
  # died mid-epoch 2 of 2 steps/epoch
  assert max(first) == 3 and max(first) < max(tiny.train_losses(reference))
  resumed_run = tiny.run_train(config_arg + [f"--workdir={killed}"])
  assert "(epoch 1, step 2)" in resumed_run.stderr, resumed_run.stderr[-2000:]  # it did resume
  with open(os.path.join(killed, "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == sorted(set(steps))  # step 3, redone after the resume, is recorded once
  for read in (tiny.train_losses, tiny.val_losses):
    expected, resumed = read(reference), read(killed)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
      np.testing.assert_allclose(resumed[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
  if recipe:
    lrs = tiny.train_losses(reference, "train/lr")  # warmup from 0, then cosine towards 0
    assert lrs[1] == 0.0 and lrs[2] == pytest.approx(1e-3) and lrs[2] > lrs[3] > lrs[4] > 0.0, lrs
    # The whole final train state (params, Adam moments, EMA, plateau) is the uninterrupted one:
    # the EMA shows in the val losses above only at the 1e-6 level.
    built = train_state.build(tiny.config("pose", tiny_dataset, **{
        "optimizer.ema_decay": 0.5, "optimizer.weight_decay_exclude": True}),
        parallel.make_mesh(jax.devices()[:1]))

    def restore(workdir, step):
      return checkpointing.restore_training(checkpointing.resolve(workdir)[0], step,
                                            built.abstract_state, built.frozen)[0]

    expected, resumed = restore(reference, 4), restore(killed, 4)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree.leaves(resumed)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9,
                                 err_msg=jax.tree_util.keystr(path))
    # Inference loads the weights that were validated: the EMA.
    predictor = inference.load(killed)
    best = restore(killed, checkpointing.resolve(predictor.source)[1])
    loaded, ema, params = (_flat(x) for x in (predictor.states[0], best["ema"], best["params"]))
    for name, value in ema.items():
      np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert not all(np.array_equal(ema[n], params[n]) for n in ema)


@pytest.mark.parametrize("nan_batch", [1, 2])
def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path, monkeypatch,
                                                         nan_batch):
  # The loader refuses non-finite annotations, so the NaN is slipped into a train batch.
  real_next = pipeline.BatchIterator.__next__
  served = {"train": 0}

  def poisoned_next(self):
    batch = real_next(self)
    if "train" in self.name:
      served["train"] += 1
      if served["train"] == nan_batch:
        batch["gt_pose"] = np.full_like(batch["gt_pose"], np.nan)
    return batch

  monkeypatch.setattr(pipeline.BatchIterator, "__next__", poisoned_next)
  config = tiny.config("pose", tiny_dataset, max_epochs=2, test=False)
  workdir = str(tmp_path / "run")
  with pytest.raises(experiment.NonFiniteLossError,
                     match=f"training loss became nan at step {nan_batch}") as e:
    experiment.train_and_evaluate(config, workdir, parallel.make_mesh(jax.devices()[:1]))
  if nan_batch == 1:  # nothing saved yet: the message must not promise a checkpoint
    assert "no checkpoint was saved before it" in str(e.value)
    assert not os.listdir(os.path.join(workdir, "checkpoints"))
    return
  ckpt_dir, _ = checkpointing.resolve(workdir)
  manager = checkpointing.make_manager(ckpt_dir, config.best_metric, config.best_mode)
  saved = manager.all_steps()
  manager.close()
  assert saved == [1]  # the step before the NaN, nothing after it
  assert "the last saved checkpoint (step 1) is intact" in str(e.value)
  built = train_state.build(config, parallel.make_mesh(jax.devices()[:1]))
  restored, _, meta = checkpointing.restore_training(ckpt_dir, 1, built.abstract_state, built.frozen)
  assert int(restored["step"]) == 1 and meta["epoch"] == 0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))


@pytest.mark.parametrize("task", ["pose", "force"])
def test_smoke_train_then_test_mode(tiny_dataset, tmp_path, task):
  workdir = str(tmp_path / task)
  results = experiment.train_and_evaluate(tiny.config(task, tiny_dataset, max_epochs=1), workdir,
                                       parallel.make_mesh(jax.devices()[:1]))
  metric = "test/mpjpe" if task == "pose" else "test/acc"
  assert np.isfinite(results[metric])
  record = np.load(os.path.join(workdir, "test_outputs_epoch1.npy"), allow_pickle=True).item()
  n_test = len(json.load(open(os.path.join(tiny_dataset, "test.json")))["frames"])
  assert len(record["frame_id"]) == n_test == len(set(record["frame_id"].tolist()))
  assert os.listdir(os.path.join(workdir, "pictures"))
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))

  again = experiment.train_and_evaluate(
      tiny.config(task, tiny_dataset, train=False, ckpt_path=workdir), str(tmp_path / "test_only"),
      parallel.make_mesh(jax.devices()[:1]))
  np.testing.assert_allclose(again[metric], results[metric], rtol=1e-5)
