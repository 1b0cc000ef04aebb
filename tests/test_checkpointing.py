"""Where a run starts (dd_jax.checkpointing): fine-tuning from a converted original with
config.init_from, testing a converted original directly (as dd_jax.inference sees it), and the
errors of starting points that do not fit. The converted checkpoint comes from the real writer:
the original's Lightning module fitted one step and saved by lightning.Trainer
(tests/original_modules.py), then converted as tools/convert_deltadorsal.py converts it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dd_jax import checkpointing, experiment, inference, parallel, train_state
from dd_jax import params as params_lib
from dd_jax.convert import lightning
from dd_jax.data import pipeline, store
from dd_jax.models import deltadorsal
from dd_jax.synthetic import hand as synthetic

import original_modules as om
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The original's pose module as tests/original_modules.py builds it: residual head on the HaMeR
# prior with FiLM, change encoder with the original features (the tiny demo config's network).
HEAD = dict(use_prior=True, use_film=True)


def matching_config(data_dir, **overrides):
  return tiny.config("pose", data_dir, **{"model.change.out_dim": om.CHANGE,
                                          "model.head.hidden": om.HIDDEN,
                                          "model.head.use_film": True, **overrides})


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_dataset):
  """A converted original pose checkpoint: (folder, its parameters by dotted name)."""
  root = tmp_path_factory.mktemp("original")
  synthetic.write_synthetic_mano(root / "MANO_RIGHT.pkl", layout="cleaned")
  om.pose_checkpoint(root / "pose.ckpt", root, **HEAD)
  config = matching_config(tiny_dataset)
  params, notes = lightning.convert_lightning(root / "pose.ckpt", config)
  folder = str(root / "converted")
  lightning.save_deltadorsal_checkpoint(folder, params, config, source="pose.ckpt", notes=notes)
  saved = lightning.load_deltadorsal_checkpoint(folder)
  return folder, {params_lib.path_str(k): v for k, v in params_lib.flatten_params(saved)}


def _flat(state):
  return {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def test_init_from_a_converted_original_then_three_steps_train_only_what_should(
    converted, tiny_dataset):
  folder, source = converted
  config = matching_config(tiny_dataset, init_from=folder,
                           **{"model.backbone.n_unfrozen_blocks": 1})
  setup = train_state.build(config, parallel.make_mesh(jax.devices()[:1]))
  state, frozen = checkpointing.initial_state(config.init_from, setup)

  trainable = _flat(state["params"])
  frozen_params = _flat(frozen)  # frozen Params and the RoPE periods
  assert any(k.startswith("backbone.blocks.1.") for k in trainable)  # the last block trains
  assert any(k.startswith("backbone.blocks.0.") for k in frozen_params)
  assert set(trainable) | set(frozen_params) == set(source)
  for name, value in {**trainable, **frozen_params}.items():  # loaded exactly, step 0
    np.testing.assert_array_equal(value, source[name], err_msg=name)
  assert int(state["step"]) == 0
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state["opt_state"])
             if np.asarray(m).ndim)  # fresh moments

  loader = iter(pipeline.make_train_loader(config.data, config.task, seed=config.seed))
  for _ in range(3):
    state, metrics = setup.train_step(state, frozen, parallel.global_batch(setup.mesh, next(loader)),
                                      setup.task.consts)
    assert np.isfinite(float(metrics["loss"]))
  assert int(state["step"]) == 3
  for name, value in _flat(frozen).items():
    np.testing.assert_array_equal(value, source[name], err_msg=name)  # bit-identical
  after = _flat(state["params"])
  still = [k for k in after if np.array_equal(after[k], source[k])]
  assert not still, f"trainable parameters that did not move: {still}"


def test_the_trainer_starts_from_init_from(converted, tiny_dataset, tmp_path):
  folder, source = converted
  config = matching_config(tiny_dataset, init_from=folder, max_epochs=1, checkpoint_every_steps=0,
                           test=False)
  workdir = str(tmp_path / "finetune")
  experiment.train_and_evaluate(config, workdir, parallel.make_mesh(jax.devices()[:1]))
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(9))
  checkpointing.load_params(checkpointing.find(workdir), model)
  saved = _flat(nnx.state(model))
  frozen = [k for k in saved if not k.startswith(("head.", "change.", "backbone.blocks.1.",
                                                  "backbone.norm."))]
  assert "backbone.blocks.0.attn.qkv.kernel" in frozen
  for name in frozen:
    np.testing.assert_array_equal(saved[name], source[name], err_msg=name)
  assert not np.array_equal(saved["head.mlp3.kernel"], source["head.mlp3.kernel"])


def test_init_from_that_does_not_fit_lists_every_mismatch_at_once(converted, tiny_dataset):
  folder, _ = converted
  config = matching_config(tiny_dataset, init_from=folder,
                           **{"model.backbone.custom.depth": 3, "model.head.hidden": 32,
                              "model.head.use_film": False})
  setup = train_state.build(config, parallel.make_mesh(jax.devices()[:1]))
  with pytest.raises(ValueError) as error:
    checkpointing.initial_state(config.init_from, setup)
  message = str(error.value)
  print(message)
  assert folder in message
  assert "missing: backbone.blocks.2." in message  # depth 3 against the file's 2
  assert "unexpected: head.film.bias, head.film.kernel" in message  # the file's FiLM
  assert "head.mlp2.kernel: shape (24, 24), model expects (32, 32)" in message
  force = tiny.config("force", tiny_dataset, init_from=folder)
  with pytest.raises(checkpointing.CheckpointError, match="a pose checkpoint; this run's task is "
                     "force"):
    checkpointing.initial_state(force.init_from, train_state.build(
        force, parallel.make_mesh(jax.devices()[:1])))


def test_evaluating_a_converted_original_equals_inference_on_the_same_frames(
    converted, tiny_dataset, tmp_path):
  folder, _ = converted
  workdir = str(tmp_path / "eval")
  # The user's command; its config's head.hidden (32) is not the checkpoint's (24): the
  # checkpoint's network settings are used.
  result = subprocess.run(
      [sys.executable, "-m", "dd_jax.evaluate", f"--config=tests/tiny_config.py:pose,{tiny_dataset}",
       f"--config.ckpt_path={folder}", f"--workdir={workdir}"],
      cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "model.head.hidden=24 (config: 32)" in result.stderr
  _, metrics = tiny.read_test_metrics(workdir)
  record = np.load(os.path.join(workdir, "test_outputs_epoch0.npy"), allow_pickle=True).item()

  predictor = inference.load(folder, config=tiny.config("pose", tiny_dataset))
  with open(os.path.join(tiny_dataset, "test.json"), encoding="utf-8") as f:
    test = json.load(f)
  with open(os.path.join(tiny_dataset, "bases.json"), encoding="utf-8") as f:
    bases = {p["p_id"]: p["bases"] for p in json.load(f)["participants"]}
  with open(os.path.join(tiny_dataset, "trials.json"), encoding="utf-8") as f:
    owner = {t["trial_id"]: t["p_id"] for t in json.load(f)["trials"]}
  frames_dir = os.path.join(tiny_dataset, test["frames_dir"])
  errors, ids = [], []
  for frame in test["frames"]:
    path = lambda key: os.path.join(frames_dir, frame[key])  # noqa: E731
    base = bases[owner[frame["trial_id"]]][frame["cropped_base_idx"]]
    betas = inference.read_prior(os.path.join(tiny_dataset, "bases", base["hamer_path"])).betas
    out = predictor(inference.read_image(path("cropped_img_path")),
                    inference.read_image(path("cropped_base_path")),
                    inference.read_prior(path("hamer_path")), betas=betas)
    gt_pose = store.parse_ground_truth(store.load_npy_dict(path("ann_path"), None), "", None)
    gt = np.asarray(predictor.keypoints(gt_pose[None], betas[None]))[0]
    errors.append(np.linalg.norm(out["keypoints"] - gt, axis=-1).mean() * 1000)
    ids.append(frame["frame_id"])
    i = int(np.flatnonzero(record["frame_id"] == frame["frame_id"])[0])
    np.testing.assert_allclose(out["keypoints"], record["pred_kp_3d"][i], atol=1e-5)
  assert sorted(ids) == sorted(record["frame_id"].tolist())
  print(f"test MPJPE: evaluate {metrics['test/mpjpe']:.4f} mm, inference {np.mean(errors):.4f} mm")
  assert metrics["test/mpjpe"] == pytest.approx(np.mean(errors), rel=1e-4)


def test_a_converted_checkpoint_cannot_be_resumed_and_junk_steps_are_named(
    converted, tiny_dataset, tmp_path):
  folder, _ = converted
  config = matching_config(tiny_dataset, ckpt_path=folder)
  one_device = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(checkpointing.CheckpointError, match="--config.init_from="):
    experiment.train_and_evaluate(config, str(tmp_path / "a"), one_device)
  workdir = tmp_path / "junk"
  (workdir / "checkpoints" / "7").mkdir(parents=True)
  (workdir / "checkpoints" / "7" / "notes.txt").write_text("not a checkpoint")
  config = matching_config(tiny_dataset)
  junk = str(workdir / "checkpoints" / "7")
  with pytest.raises(checkpointing.CheckpointError, match=f"{junk}: not a dd_jax checkpoint step"):
    experiment.train_and_evaluate(config, str(workdir), one_device)
  config = matching_config(tiny_dataset, train=False, ckpt_path=junk)
  with pytest.raises(checkpointing.CheckpointError, match=f"{junk}: not a dd_jax checkpoint step"):
    experiment.train_and_evaluate(config, str(tmp_path / "b"), one_device)
