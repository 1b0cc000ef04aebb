"""End-to-end prediction from raw camera frames (inference.Pipeline, dd_jax.full_frames and
`python -m dd_jax.predict --frames`) on the synthetic set's rendered, distorted frames, with a
tiny random HaMeR (saved as HaMeR's .ckpt and converted) and a random tiny DeltaDorsal."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tiny_predict

from dd_jax import inference
from dd_jax.data import egodorsal, samples, store
from dd_jax.data import pipeline as data_pipeline
from dd_jax.full_frames import sequence, smoothing, sources, stages
from dd_jax.priors import writer

import tiny

pytest.importorskip("omegaconf")
SIZE = 32
# Keypoints whose place does not depend on the finger pose (wrist, thumb base, the four MCPs):
# any predicted pose puts them where the renderer drew the hand.
POSE_FREE = [0, 1, 5, 9, 13, 17]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("predict_frames_models"))
  return tiny_predict.hamer_folder(folder), tiny_predict.deltadorsal_folder(folder)


@pytest.fixture(scope="module")
def pipe(models):
  return inference.Pipeline.from_dirs(hamer=models[0], deltadorsal=models[1], image_size=SIZE)


def _rgb(path):
  return store.decode_image(store.read_file(path, None, "image"), path, None)


def _trial(tiny_dataset, trial_id=1):
  index = egodorsal.load_index(tiny_dataset)
  frames = [f for f in egodorsal.select_frames(index, "all") if f.trial_id == trial_id]
  trial = index.trials[trial_id]
  return index, frames, trial, index.bases[trial.p_id][0]


def test_full_frame_keypoints_land_where_the_hand_was_rendered(pipe, tiny_dataset):
  """With the set's own priors, the predicted hand's pose-free keypoints in raw (distorted)
  pixels are where the renderer put the hand (annotation keypoints_2d); all 21 agree with the
  placement recomputed in NumPy and distorted with OpenCV."""
  _, frames, trial, base_entry = _trial(tiny_dataset)
  base = pipe.base(_rgb(base_entry.img_path), K=trial.K, d=trial.d,
                   prior=store.load_npy_dict(base_entry.hamer_path, None))
  for frame in frames:
    prior = store.load_npy_dict(frame.hamer_path, None)
    out = pipe(_rgb(frame.img_path), base, K=trial.K, d=trial.d, prior=prior)
    truth = store.load_npy_dict(frame.ann_path, None)["keypoints_2d"].reshape(21, 2)
    assert out["keypoints_2d"].shape == (21, 2) and out["pose"].shape == (45,)
    assert out["betas"].shape == (10,) and out["keypoints_3d"].shape == (21, 3)
    np.testing.assert_allclose(out["keypoints_2d"][POSE_FREE], truth[POSE_FREE], atol=0.05)
    np.testing.assert_allclose(out["prior_keypoints_2d"][POSE_FREE], truth[POSE_FREE], atol=0.05)
    # NumPy: MANO's zero-orientation keypoints turned by HaMeR's orientation about the wrist,
    # the wrist on HaMeR's, pinhole with the readers' focal, then the lens (cv2.projectPoints).
    orient = prior["global_orient"].reshape(3, 3).astype(np.float64)
    hamer_wrist = (prior["keypoints_3d"].reshape(21, 3)[0] + prior["cam_t"].reshape(3))
    k = out["keypoints_3d"].astype(np.float64)
    cam = (k - k[0]) @ orient.T + hamer_wrist
    np.testing.assert_allclose(out["keypoints_cam"], cam, atol=1e-5)
    raw = cv2.projectPoints(cam, np.zeros(3), np.zeros(3), trial.K, trial.d)[0].reshape(21, 2)
    np.testing.assert_allclose(out["keypoints_2d"], raw, atol=1e-3)


def test_raw_frames_give_the_online_data_pipeline_inputs_and_outputs(pipe, tiny_dataset,
                                                                     tmp_path):
  """HaMeR priors made on the fly from raw distorted frames, then written where the set keeps
  them: the data pipeline's online mode reads the same network inputs, and the network gives
  the same outputs."""
  root = str(tmp_path / "set")
  shutil.copytree(tiny_dataset, root)
  index, frames, trial, base_entry = _trial(root)
  base = pipe.base(_rgb(base_entry.img_path), K=trial.K, d=trial.d)
  writer.write_prior(base_entry.hamer_path, base.prior.raw)
  results = {}
  for frame in frames:
    results[frame.frame_id] = pipe(_rgb(frame.img_path), base, K=trial.K, d=trial.d)
    writer.write_prior(frame.hamer_path, results[frame.frame_id]["prior"])
    assert results[frame.frame_id]["prior"]["box_source"] == "whole_image"
  reader = data_pipeline._reader(  # pylint: disable=protected-access
      tiny.pose_data_config(root, precropped=False, random_base=False), "pose", "all")
  finalize = samples.Finalize(SIZE)
  numbers = {f.frame_id: n for n, f in enumerate(egodorsal.select_frames(index, "all"))}
  for frame_id, out in results.items():
    sample = finalize.map(reader.read(numbers[frame_id], None))
    inputs = out["inputs"]
    np.testing.assert_allclose(inputs.img, sample["img"], atol=1e-5)
    np.testing.assert_allclose(inputs.base_img, sample["base_img"], atol=1e-5)
    np.testing.assert_allclose(inputs.prior_pose, sample["hamer_pose"], atol=1e-5)
    np.testing.assert_allclose(inputs.betas, sample["hamer_shape"], atol=1e-5)
    pose, _ = pipe.network.forward(sample["img"][None], sample["base_img"][None],
                                   sample["hamer_pose"][None])
    np.testing.assert_allclose(out["pose"], np.asarray(pose)[0], atol=1e-5)
    keypoints = pipe.network.keypoints(np.asarray(pose), sample["hamer_shape"][None])
    np.testing.assert_allclose(out["keypoints_3d"], np.asarray(keypoints)[0], atol=1e-5)


def _predict_cli(args, tmp_path):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dd_jax.predict", *args], cwd=tiny.ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_on_a_folder_of_raw_frames(pipe, models, tiny_dataset, tmp_path):
  _, frames, trial, base_entry = _trial(tiny_dataset)
  folder = tmp_path / "frames"
  folder.mkdir()
  for i, frame in enumerate(frames):
    shutil.copy(frame.img_path, folder / f"frame_{i}.jpg")
  (folder / "frame_9.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
  out = tmp_path / "out"
  result = _predict_cli([f"--checkpoint={models[1]}", f"--hamer_weights={models[0]}",
                         f"--frames={folder}", f"--base={base_entry.img_path}",
                         f"--trial={os.path.join(tiny_dataset, 'trials.json')}:1",
                         f"--image_size={SIZE}", "--notrack", "--save_mesh", f"--out={out}"],
                        tmp_path)
  assert result.returncode == 3, result.stderr[-3000:]  # 3: a frame failed, the others ran
  got = np.load(out / sequence.NPZ_FILE)
  n = len(frames) + 1
  assert list(got["frame"]) == [f"frame_{i}" for i in range(len(frames))] + ["frame_9"]
  assert got["valid"].tolist() == [True] * len(frames) + [False]
  assert "frame_9.jpg" in got["error"][-1] and "frame_9" in result.stdout
  for key, shape in (("pose", (45,)), ("betas", (10,)), ("keypoints_3d", (21, 3)),
                     ("keypoints_2d", (21, 2)), ("prior_keypoints_2d", (21, 2))):
    assert got[key].shape == (n,) + shape
    assert np.all(np.isfinite(got[key][:-1])) and np.all(np.isnan(got[key][-1]))
  lines = [json.loads(line) for line in open(out / sequence.JSONL_FILE, encoding="utf-8")]
  assert len(lines) == n and not lines[-1]["valid"] and len(lines[0]["pose"]) == 45
  # The command gives what the API gives for the same frame.
  base = pipe.base(_rgb(base_entry.img_path), K=trial.K, d=trial.d)
  api = pipe(_rgb(frames[1].img_path), base, K=trial.K, d=trial.d)
  np.testing.assert_allclose(got["pose"][1], api["pose"], atol=1e-5)
  np.testing.assert_allclose(got["keypoints_2d"][1], api["keypoints_2d"], atol=1e-3)
  # Overlays are the full raw frames; meshes are readable .obj files.
  overlay = cv2.imread(str(out / "overlays" / "frame_0.png"))
  assert overlay.shape == cv2.imread(frames[0].img_path).shape
  vertices, faces = _read_obj(out / "meshes" / "frame_1.obj")
  np.testing.assert_array_equal(faces, np.asarray(pipe.network.mano.faces))
  np.testing.assert_allclose(vertices, api["vertices_cam"], atol=1e-5)
  assert not (out / "meshes" / "frame_9.obj").exists()
  summary = json.load(open(out / sequence.SUMMARY_FILE, encoding="utf-8"))
  assert summary["predicted"] == len(frames) and summary["camera"].startswith("trial 1")


def _read_obj(path):
  vertices, faces = [], []
  for line in open(path, encoding="utf-8"):
    parts = line.split()
    if parts and parts[0] == "v":
      vertices.append([float(x) for x in parts[1:4]])
    elif parts and parts[0] == "f":
      faces.append([int(x.split("/")[0]) - 1 for x in parts[1:4]])
  return np.array(vertices), np.array(faces)


def _write_video(path, images, fps=10.0):
  height, width = images[0].shape[:2]
  video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
  assert video.isOpened()
  for rgb in images:
    video.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  video.release()


def test_video_gives_an_mp4_and_smoothing_lowers_jitter(pipe, tiny_dataset, tmp_path):
  """A 20-frame MP4 (cv2.VideoWriter, as users' files are) of one still frame with pixel noise:
  the overlay video has 20 frames, and the One-Euro filter lowers the frame-to-frame jitter."""
  _, frames, trial, base_entry = _trial(tiny_dataset)
  still = _rgb(frames[0].img_path).astype(np.float64)
  rng = np.random.default_rng(0)
  noisy = [np.clip(still + rng.normal(0, 12, still.shape), 0, 255).astype(np.uint8)
           for _ in range(20)]
  video = tmp_path / "clip.mp4"
  _write_video(video, noisy)
  runs = {}
  for name, filter_settings in (("raw", None), ("smooth", smoothing.OneEuroSettings(0.5, 0.0))):
    out = tmp_path / name
    settings = sequence.Settings(track=False, smoothing=filter_settings,
                                 overlay=name == "raw")
    summary = sequence.run(pipe, str(video), base_entry.img_path, str(out), K=trial.K,
                           d=trial.d, settings=settings, echo=lambda _: None)
    assert summary["frames"] == summary["predicted"] == 20, summary["failed"]
    runs[name] = np.load(out / sequence.NPZ_FILE)
  capture = cv2.VideoCapture(str(tmp_path / "raw" / sequence.VIDEO_FILE))
  count = 0
  while capture.read()[0]:
    count += 1
  assert count == 20 and not (tmp_path / "smooth" / sequence.VIDEO_FILE).exists()
  for key in ("pose", "keypoints_2d"):
    raw, smooth = (smoothing.jitter(runs[k][key]) for k in ("raw", "smooth"))
    assert smooth < 0.5 * raw, (key, raw, smooth)
  np.testing.assert_allclose(runs["raw"]["time_s"], np.arange(20) / 10.0, atol=1e-6)


def _one_euro_reference(values, times, min_cutoff, beta, d_cutoff):
  """The One-Euro filter written out per scalar, as in Casiez et al.'s pseudocode."""
  def alpha(cutoff, dt):
    r = 2 * np.pi * cutoff * dt
    return r / (r + 1)

  out = np.empty_like(values)
  for j in range(values.shape[1]):
    x_prev = dx_prev = t_prev = None
    for i in range(len(values)):
      x, t = values[i, j], times[i]
      if x_prev is None:
        x_hat, dx_hat = x, 0.0
      else:
        dt = t - t_prev
        dx = (x - x_prev) / dt
        dx_hat = alpha(d_cutoff, dt) * dx + (1 - alpha(d_cutoff, dt)) * dx_prev
        cutoff = min_cutoff + beta * abs(dx_hat)
        x_hat = alpha(cutoff, dt) * x + (1 - alpha(cutoff, dt)) * x_prev
      out[i, j] = x_hat
      x_prev, dx_prev, t_prev = x_hat, dx_hat, t
  return out


def test_one_euro_filter_matches_the_papers_pseudocode():
  rng = np.random.default_rng(0)
  times = np.cumsum(rng.uniform(0.02, 0.05, 60))
  values = np.cumsum(rng.normal(0, 0.3, (60, 5)), axis=0) + rng.normal(0, 0.1, (60, 5))
  settings = smoothing.OneEuroSettings(min_cutoff=0.8, beta=0.7, d_cutoff=1.3)
  filt = smoothing.OneEuroFilter(settings)
  got = np.stack([filt(v, t) for v, t in zip(values, times)])
  np.testing.assert_allclose(got, _one_euro_reference(values, times, 0.8, 0.7, 1.3), rtol=1e-12)
  with pytest.raises(ValueError, match="min_cutoff > 0"):
    smoothing.OneEuroSettings(min_cutoff=0)


def test_bad_frames_and_bases_are_reported_and_the_run_goes_on(pipe, tiny_dataset, tmp_path):
  _, frames, trial, base_entry = _trial(tiny_dataset)
  folder = tmp_path / "frames"
  folder.mkdir()
  shutil.copy(frames[0].img_path, folder / "a_good.jpg")
  shutil.copy(frames[1].img_path, folder / "d_good.jpg")
  (folder / "b_unreadable.png").write_bytes(b"not an image")
  grey = np.full((192, 256, 3), 127, np.uint8)
  cv2.imwrite(str(folder / "c_blank.png"), grey)
  cv2.imwrite(str(tmp_path / "blank_base.png"), grey)
  messages = []
  summary = sequence.run(pipe, str(folder), base_entry.img_path, str(tmp_path / "out"),
                         K=trial.K, d=trial.d, settings=sequence.Settings(track=False),
                         echo=messages.append)
  failed = dict(line.split(": ", 1) for line in summary["failed"])
  assert summary["predicted"] == 2 and sorted(failed) == ["b_unreadable", "c_blank"]
  assert "b_unreadable.png: not a decodable image" in failed["b_unreadable"]
  assert "no usable hand" in failed["c_blank"] and "blank" in failed["c_blank"]
  got = np.load(tmp_path / "out" / sequence.NPZ_FILE)
  assert got["valid"].tolist() == [True, False, False, True]
  # A base without a hand: every frame is marked with the reason; nothing stops.
  summary = sequence.run(pipe, str(folder), str(tmp_path / "blank_base.png"),
                         str(tmp_path / "out2"), K=trial.K, d=trial.d,
                         settings=sequence.Settings(track=False), echo=messages.append)
  assert summary["predicted"] == 0 and len(summary["failed"]) == 4
  failed = dict(line.split(": ", 1) for line in summary["failed"])
  assert "blank_base.png" in failed["a_good"] and "no usable hand" in failed["a_good"]
  assert failed["d_good"] == failed["a_good"] and "not a decodable" in failed["b_unreadable"]
  # A video OpenCV cannot open is named.
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
  with pytest.raises(sources.SourceError, match="broken.mp4: OpenCV cannot open"):
    sequence.run(pipe, str(tmp_path / "broken.mp4"), base_entry.img_path,
                 str(tmp_path / "out3"), echo=messages.append)
  # A frame whose hand is mostly outside the image fails alignment, by name.
  with pytest.raises(stages.PredictionError, match="too few keypoints"):
    shifted = dict(store.load_npy_dict(frames[0].hamer_path, None))
    shifted["cam_t"] = shifted["cam_t"] + np.array([[0.3, 0.0, 0.0]], np.float32)
    base = pipe.base(_rgb(base_entry.img_path), K=trial.K, d=trial.d)
    pipe(_rgb(frames[0].img_path), base, K=trial.K, d=trial.d, prior=shifted)


def test_force_model_from_raw_frames(models, tiny_dataset, tmp_path):
  force = inference.Pipeline.from_dirs(
      hamer=models[0], deltadorsal=tiny_predict.deltadorsal_folder(str(tmp_path), "force"),
      image_size=SIZE)
  _, frames, trial, base_entry = _trial(tiny_dataset)
  folder = tmp_path / "frames"
  folder.mkdir()
  for frame in frames[:2]:
    shutil.copy(frame.img_path, folder)
  summary = sequence.run(force, str(folder), base_entry.img_path, str(tmp_path / "out"),
                         K=trial.K, d=trial.d, settings=sequence.Settings(track=False),
                         echo=lambda _: None)
  assert summary["predicted"] == 2
  got = np.load(tmp_path / "out" / sequence.NPZ_FILE)
  assert got["probabilities"].shape == (2, 7) and got["label"].shape == (2,)
  np.testing.assert_array_equal(got["label"], np.argmax(got["probabilities"], -1))
  base = force.base(_rgb(base_entry.img_path), K=trial.K, d=trial.d)
  one = force(_rgb(frames[0].img_path), base, K=trial.K, d=trial.d)
  logits, _ = force.network.forward(one["inputs"].img[None], one["inputs"].base_img[None],
                                    one["inputs"].prior_pose[None])
  np.testing.assert_allclose(one["logits"], np.asarray(logits)[0, 0], atol=1e-5)
  np.testing.assert_allclose(got["probabilities"][0], one["probabilities"], atol=1e-6)
  line = json.loads(open(tmp_path / "out" / sequence.JSONL_FILE).readline())
  assert line["class_name"][0] in inference.FORCE_CLASS_NAMES
