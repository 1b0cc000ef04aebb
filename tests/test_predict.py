"""Inference API and predict CLI: equal to the evaluator's test outputs; force; bad inputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax import experiment, inference, parallel, predict
from dd_jax.convert import lightning
from dd_jax.data import align, store, transforms
from dd_jax.data.egodorsal import CROP_KEYPOINTS
from dd_jax.models import deltadorsal, dinov3

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
  """A tiny pose run (with the HaMeR prior as input) trained and tested in-process."""
  workdir = str(tmp_path_factory.mktemp("predict_run"))
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = tiny.config("pose", tiny_dataset, max_epochs=1, checkpoint_every_steps=0)
  assert config.model.head.use_prior
  experiment.train_and_evaluate(config, workdir, mesh)
  record = np.load(os.path.join(workdir, "test_outputs_epoch1.npy"), allow_pickle=True).item()
  return workdir, record


def _test_frames(data_dir):
  """frame_id -> (cropped image, cropped base, frame HaMeR file, base HaMeR file)."""
  with open(os.path.join(data_dir, "test.json"), encoding="utf-8") as f:
    frames = json.load(f)
  with open(os.path.join(data_dir, "bases.json"), encoding="utf-8") as f:
    bases = {p["p_id"]: p["bases"] for p in json.load(f)["participants"]}
  with open(os.path.join(data_dir, "trials.json"), encoding="utf-8") as f:
    owner = {t["trial_id"]: t["p_id"] for t in json.load(f)["trials"]}
  root = os.path.join(data_dir, frames["frames_dir"])
  out = {}
  for fr in frames["frames"]:
    base = bases[owner[fr["trial_id"]]][fr["cropped_base_idx"]]
    out[fr["frame_id"]] = (os.path.join(root, fr["cropped_img_path"]),
                           os.path.join(root, fr["cropped_base_path"]),
                           os.path.join(root, fr["hamer_path"]),
                           os.path.join(data_dir, "bases", base["hamer_path"]))
  return out


def _expected(record, frame_id):
  i = int(np.flatnonzero(record["frame_id"] == frame_id)[0])
  return record["pose"][i], record["pred_kp_3d"][i]


def test_cli_one_pair_equals_the_evaluator(trained, tiny_dataset, tmp_path):
  workdir, record = trained
  frame_id = int(record["frame_id"][0])
  image, base, hamer, base_hamer = _test_frames(tiny_dataset)[frame_id]
  out = str(tmp_path / "out")
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "dd_jax.predict", f"--checkpoint={workdir}", f"--image={image}",
       f"--base={base}", f"--hamer={hamer}", f"--base_hamer={base_hamer}", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ms" in result.stdout and "frame(s): forward mean" in result.stdout
  name = os.path.splitext(os.path.basename(image))[0]
  with open(os.path.join(out, name + ".json"), encoding="utf-8") as f:
    got = json.load(f)
  pose, keypoints = _expected(record, frame_id)
  np.testing.assert_allclose(got["pose"], pose, atol=1e-5)
  np.testing.assert_allclose(got["keypoints"], keypoints, atol=1e-5)
  assert "base's HaMeR file" in got["shape_source"] and got["prior_pose_used"]
  assert got["overlay_placement"].startswith("prior keypoints_2d, precrop")
  assert os.path.getsize(os.path.join(out, name + ".png")) > 1000
  summary = json.load(open(os.path.join(out, predict.SUMMARY_FILE), encoding="utf-8"))
  assert summary["frames"] == 1 and summary["mean_ms"] > 0


def test_cli_refuses_a_forged_hamer_file_cleanly(trained, tiny_dataset, tmp_path):
  """issue 15: `--hamer forged.npy` (an object dtype whose state says "no objects") used to exit
  139; now the command names the file and exits 1, and a code payload runs nothing."""
  import hostile_files  # pylint: disable=import-outside-toplevel
  workdir, record = trained
  image, base, _, _ = _test_frames(tiny_dataset)[int(record["frame_id"][0])]
  forged = {"hand_pose": hostile_files.array((4,), hostile_files.dtype("O8", hostile_files.FORGED),
                                             b"A" * 32)}
  payload = {"hand_pose": hostile_files.payloads(str(tmp_path))["os_system"]}
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  for name, obj, reason in (("forged.npy", forged, "object array"),
                            ("payload.npy", payload, "refusing to load global 'os.system'")):
    hostile_files.write_npy_pickle(tmp_path / name, hostile_files.dumps(obj, 3))
    result = subprocess.run(
        [sys.executable, "-m", "dd_jax.predict", f"--checkpoint={workdir}", f"--image={image}",
         f"--base={base}", f"--hamer={tmp_path / name}", f"--out={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert name in result.stderr and reason in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(os.path.join(str(tmp_path), "os_system"))


def test_api_on_a_folder_and_a_batch_equal_the_evaluator(trained, tiny_dataset, tmp_path):
  workdir, record = trained
  frames = _test_frames(tiny_dataset)
  folder = os.path.dirname(frames[int(record["frame_id"][0])][0])  # one trial's cropped_images
  trial = os.path.dirname(folder)
  out = str(tmp_path / "out")
  summary = predict.run(workdir, folder, os.path.join(trial, "cropped_bases"), out,
                        hamer=os.path.join(trial, "hamer"), echo=lambda _: None)
  checked = 0
  for frame_id, (image, *_) in frames.items():
    if os.path.dirname(image) != folder:
      continue
    name = os.path.splitext(os.path.basename(image))[0]
    got = json.load(open(os.path.join(out, name + ".json"), encoding="utf-8"))
    pose, keypoints = _expected(record, frame_id)
    np.testing.assert_allclose(got["pose"], pose, atol=1e-5)
    np.testing.assert_allclose(got["keypoints"], keypoints, atol=1e-5)
    checked += 1
  assert checked == summary["frames"] >= 2

  # All test frames in one batch call; the network's residual matters (pose != prior).
  predictor = inference.load(workdir)
  assert inference.load(predictor.source).source == predictor.source  # a step folder works too
  ids = sorted(frames)
  priors = [inference.read_prior(frames[i][2]) for i in ids]
  batch = predictor.predict_batch([inference.read_image(frames[i][0]) for i in ids],
                                  [inference.read_image(frames[i][1]) for i in ids], priors)
  for k, frame_id in enumerate(ids):
    pose, keypoints = _expected(record, frame_id)
    np.testing.assert_allclose(batch["pose"][k], pose, atol=1e-5)
    np.testing.assert_allclose(batch["keypoints"][k], keypoints, atol=1e-5)
  assert np.abs(batch["pose"] - np.stack([p.hand_pose for p in priors])).max() > 1e-3

  with pytest.raises(inference.PriorRequiredError, match="use_prior"):
    predictor(inference.read_image(frames[ids[0]][0]), inference.read_image(frames[ids[0]][1]))
  with pytest.raises(inference.PriorRequiredError, match="--hamer"):
    predict.run(workdir, folder, os.path.join(trial, "cropped_bases"), str(tmp_path / "no"),
                echo=lambda _: None)


def _converted(tmp_path, task, **overrides):
  """A converted-format checkpoint of random weights, and the network holding them."""
  config = tiny.config(task, "/unused", **overrides)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(0))))
  backbone = deltadorsal.backbone_config_from(config)
  rng = np.random.default_rng(3)
  flat = []
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param):
      value = rng.normal(0.0, 0.2, var.shape)
    else:
      assert isinstance(var, dinov3.RopePeriods), path
      value = dinov3.default_rope_periods(backbone.head_dim, backbone.rope_base)
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  path = str(tmp_path / f"converted_{task}")
  lightning.save_deltadorsal_checkpoint(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                        config, source="random weights")
  return path, model


def test_force_api_returns_a_class_and_matches_the_network(tmp_path):
  path, model = _converted(tmp_path, "force")
  predictor = inference.load(path, image_size=32)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  base = rng.integers(0, 256, (41, 33, 3), dtype=np.uint8)
  one = predictor(image, base)
  assert 0 <= int(one["label"]) < 7 and one["probabilities"].shape == (7,)
  np.testing.assert_allclose(one["probabilities"].sum(), 1.0, rtol=1e-5)
  x, x0 = (transforms.to_model_input(a, 32)[None] for a in (image, base))
  reference = nnx.jit(lambda m, a, b: m(a, b))(model, x, x0)  # the network itself
  np.testing.assert_allclose(one["logits"], np.asarray(reference)[0, 0], atol=1e-5)
  assert int(one["label"]) == int(np.argmax(one["logits"]))
  again = predictor(base[:20], image)  # another image size: no new compilation
  assert predictor._network._cache_size() == 1
  assert again["probabilities"].shape == (7,)
  with pytest.raises(ValueError, match=r"image 0: expected a uint8 RGB array \(H, W, 3\)"):
    predictor(image.astype(np.float32), base)
  bf16 = inference.load(path, image_size=32, backbone_dtype="bfloat16")
  assert bf16.graphdef != predictor.graphdef  # the compute dtype is part of the network
  np.testing.assert_allclose(bf16(image, base)["logits"], one["logits"], atol=0.05)


def test_pose_without_prior_needs_no_hamer_file(tmp_path, tiny_dataset):
  path, _ = _converted(tmp_path, "pose", **{"model.head.use_prior": False})
  frames = _test_frames(tiny_dataset)
  image, base, _, _ = frames[sorted(frames)[0]]
  out = str(tmp_path / "out")
  predict.run(path, image, base, out, image_size=32, echo=lambda _: None)
  got = json.load(open(os.path.join(out, os.path.basename(image)[:-4] + ".json"),
                       encoding="utf-8"))
  assert len(got["pose"]) == 45 and np.shape(got["keypoints"]) == (21, 3)
  assert got["shape_source"].startswith("zeros") and got["betas"] == [0.0] * 10
  assert got["overlay_placement"].startswith("canonical view")
  assert "NOT the official MANO" in got["mano"]


def test_bad_inputs_name_the_file(tmp_path, tiny_dataset):
  frames = _test_frames(tiny_dataset)
  image, base, hamer, _ = frames[sorted(frames)[0]]
  missing = str(tmp_path / "nope.jpg")
  with pytest.raises(store.FrameLoadError, match="nope.jpg: file not found"):
    inference.read_image(missing)
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    predict.pair_files(missing, base)
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image at all" * 10)
  with pytest.raises(store.FrameLoadError, match="garbage.jpg: not a decodable image"):
    inference.read_image(str(garbage))

  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = str(tmp_path / "evil.npy")
  np.save(evil, np.array([Evil()], dtype=object), allow_pickle=True)
  with pytest.raises(store.FrameLoadError, match="evil.npy: refused to unpickle"):
    inference.read_prior(evil)
  assert not marker.exists()
  bad_shape = str(tmp_path / "bad_shape.npy")
  np.save(bad_shape, {"hand_pose": np.zeros(7), "betas": np.zeros((1, 10))}, allow_pickle=True)
  with pytest.raises(store.FrameLoadError, match="bad_shape.npy: 'hand_pose'"):
    inference.read_prior(bad_shape)

  empty = tmp_path / "empty_run"
  (empty / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="empty_run.*no dd_jax checkpoint"):
    inference.load(str(empty))


def test_pairing_rules(tmp_path):
  frames, bases, priors = (tmp_path / d for d in ("frames", "bases", "priors"))
  for d in (frames, bases, priors):
    d.mkdir()
  for stem in ("a", "b"):
    (frames / f"{stem}.jpg").write_bytes(b"x")
    (priors / f"{stem}.npy").write_bytes(b"x")
  (frames / "notes.txt").write_text("ignored")
  (bases / "a.png").write_bytes(b"x")
  shared = tmp_path / "base.jpg"
  shared.write_bytes(b"x")
  pairs = predict.pair_files(str(frames), str(shared), str(priors))
  assert [(p.name, os.path.basename(p.base), os.path.basename(p.hamer)) for p in pairs] == [
      ("a", "base.jpg", "a.npy"), ("b", "base.jpg", "b.npy")]
  with pytest.raises(FileNotFoundError, match=r"b.jpg: .*bases has no a base image named b"):
    predict.pair_files(str(frames), str(bases))
  with pytest.raises(ValueError, match="must be a folder"):
    predict.pair_files(str(frames), str(shared), str(priors / "a.npy"))


def test_prior_keypoints_are_placed_on_a_precrop_or_a_full_frame():
  rng = np.random.default_rng(1)
  keypoints = rng.uniform([300, 200], [420, 300], (21, 2))
  x0, x1, y0, y1 = align.crop_box(keypoints[list(CROP_KEYPOINTS)], 1000, 800)
  placed, how = align.place_prior_keypoints(keypoints, x1 - x0, y1 - y0)
  np.testing.assert_allclose(placed, keypoints - (x0, y0))
  assert "precrop" in how
  placed, how = align.place_prior_keypoints(keypoints, 1000, 800)
  np.testing.assert_allclose(placed, keypoints)
  assert "full frame" in how
  assert align.place_prior_keypoints(keypoints / 1000, 200, 150)[0] is None
  assert align.place_prior_keypoints(None, 200, 150)[0] is None
