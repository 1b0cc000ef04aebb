"""Samples from the synthetic set: round trip, online alignment, ArrayRecord packing, bad content."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from dd_jax import safe_pickle
from dd_jax.data import align, array_record, egodorsal, pipeline, samples, store, validation
from dd_jax.data.egodorsal import ALIGN_KEYPOINTS, MOTION_FINGERS, MOTION_LABELS

from tiny import pose_data_config

SIZE = 32


@pytest.fixture(scope="module")
def packed(tiny_dataset, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("packed"))
  summary = array_record.pack(tiny_dataset, out)
  assert summary["frames"] == 24 and summary["bases"] == 6 and summary["frames_with_errors"] == 0
  return out


def _reader(config, task, split="all"):
  return pipeline._reader(config, task, split)  # pylint: disable=protected-access


def _raw(tiny_dataset):
  with open(os.path.join(tiny_dataset, "frames.json")) as f:
    frames = json.load(f)["frames"]
  with open(os.path.join(tiny_dataset, "trials.json")) as f:
    trials = {t["trial_id"]: t for t in json.load(f)["trials"]}
  return frames, trials


def _rgb(path):
  return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------ round trip


def test_pose_samples_match_generator_files(tiny_dataset):
  frames, trials = _raw(tiny_dataset)
  reader = _reader(pose_data_config(tiny_dataset), "pose")
  for number, raw in enumerate(frames):
    sample = reader.read(number, None)
    ann = safe_pickle.load_npy(os.path.join(tiny_dataset, "trials", raw["ann_path"]))
    hamer = safe_pickle.load_npy(os.path.join(tiny_dataset, "trials", raw["hamer_path"]))
    p_id = trials[raw["trial_id"]]["p_id"]
    base = safe_pickle.load_npy(os.path.join(
        tiny_dataset, "bases", f"PARTICIPANT_{p_id:03d}", "hamer", f"base_{raw['cropped_base_idx']:03d}.npy"))
    assert int(sample["frame_id"]) == raw["frame_id"] and int(sample["p_id"]) == p_id
    assert bool(sample["valid"])
    np.testing.assert_array_equal(sample["gt_pose"], ann["hand_pose"].reshape(45))
    np.testing.assert_array_equal(sample["hamer_shape"], base["betas"][0])
    # HaMeR rotation matrices -> axis-angle, checked against OpenCV's Rodrigues.
    R = np.stack([cv2.Rodrigues(a.astype(np.float64))[0] for a in sample["hamer_pose"].reshape(15, 3)])
    np.testing.assert_allclose(R, hamer["hand_pose"][0], atol=2e-6)
    np.testing.assert_array_equal(sample["img"], _rgb(os.path.join(tiny_dataset, "trials", raw["cropped_img_path"])))
    np.testing.assert_array_equal(sample["base_img"],
                                  _rgb(os.path.join(tiny_dataset, "trials", raw["cropped_base_path"])))


def test_force_samples_labels(tiny_dataset):
  frames, trials = _raw(tiny_dataset)
  reader = _reader(pose_data_config(tiny_dataset, fsr_thresh=0.2), "force")
  seen = set()
  for number, raw in enumerate(frames):
    sample = reader.read(number, None)
    motion = trials[raw["trial_id"]]["motion_type"]
    fsr = raw["fsr_reading"]
    expected = 0 if fsr < 0.2 else MOTION_LABELS[motion]
    assert int(sample["tap_label"]) == expected == int(raw["tap_label"])
    np.testing.assert_allclose(sample["force"], fsr * np.asarray(MOTION_FINGERS[motion]), rtol=1e-6)
    assert sample["fsr"] == np.float32(fsr) and "gt_pose" not in sample
    assert sample["hamer_pose"].shape == (45,) and sample["hamer_shape"].shape == (10,)
    seen.add(motion)
  assert len(seen) == 6  # 3 participants x 2 trials cycle through the six motion types


def test_online_mode_reproduces_precropped(tiny_dataset):
  frames, _ = _raw(tiny_dataset)
  online = _reader(pose_data_config(tiny_dataset, precropped=False, random_base=False), "pose")
  pre = _reader(pose_data_config(tiny_dataset), "pose")
  compared = 0
  for number, raw in enumerate(frames):
    if raw["cropped_base_idx"] != 0:
      continue
    a, b = online.read(number, None), pre.read(number, None)
    for key in ("img", "base_img"):
      assert a[key].shape == b[key].shape
      # The precropped files are the online crops after one more JPEG round trip.
      assert np.abs(a[key].astype(int) - b[key].astype(int)).mean() < 2.0
    for key in ("gt_pose", "hamer_pose", "hamer_shape"):
      np.testing.assert_array_equal(a[key], b[key])
    compared += 1
  assert compared >= 4
  # random_base: the base is drawn from the element's rng, reproducibly.
  rnd = _reader(pose_data_config(tiny_dataset, precropped=False, random_base=True), "pose")
  s1 = rnd.read(0, np.random.default_rng(1))
  s2 = rnd.read(0, np.random.default_rng(1))
  np.testing.assert_array_equal(s1["base_img"], s2["base_img"])


def test_online_alignment_recovers_known_homography(tiny_dataset):
  """Base keypoints mapped by the recovered homography land on the frame's true keypoints."""
  frames, trials = _raw(tiny_dataset)
  index = egodorsal.load_index(tiny_dataset)
  folder = store.FolderStore(index)
  selected = egodorsal.select_frames(index, "all")
  worst = 0.0
  for frame, raw in zip(selected, frames):
    trial = trials[raw["trial_id"]]
    K, w2c = np.asarray(trial["K"]), np.asarray(trial["world2cam"])
    ann = safe_pickle.load_npy(frame.ann_path)
    # Truth, independently of HaMeR's camera convention: world keypoints -> camera -> K.
    cam = ann["keypoints_3d"].astype(np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    truth = cv2.projectPoints(cam, np.zeros(3), np.zeros(3), K, None)[0].reshape(21, 2)
    for base_idx in range(2):
      base = folder.base_prior(frame.p_id, base_idx, frame.frame_id)
      base_px = cv2.projectPoints(base.keypoints_3d + base.cam_t, np.zeros(3), np.zeros(3), K,
                                  None)[0].reshape(21, 2)
      prior = folder.frame_prior(frame)
      alignment = align.compute_alignment(K, 256, 192, prior.keypoints_3d, prior.cam_t,
                                          base.keypoints_3d, base.cam_t)
      mapped = cv2.perspectiveTransform(base_px[None, list(ALIGN_KEYPOINTS)], alignment.homography)[0]
      worst = max(worst, float(np.abs(mapped - truth[list(ALIGN_KEYPOINTS)]).max()))
  assert worst < 1.0, worst
  # The raw frames really are distorted: the annotated raw keypoints differ from the pinhole ones.
  assert np.abs(ann["keypoints_2d"] - truth).max() > 0.5


# ------------------------------------------------------------------ ArrayRecord


@pytest.mark.parametrize("task,precropped", [("pose", True), ("pose", False), ("force", True)])
def test_array_record_gives_the_same_samples(tiny_dataset, packed, task, precropped):
  folder = _reader(pose_data_config(tiny_dataset, precropped=precropped, random_base=False), task)
  config = pose_data_config(packed, format="array_record", precropped=precropped, random_base=False)
  assert "24 frames" in validation.validate_dataset(config, task, splits=["all"])
  packed_reader = _reader(config, task)
  assert len(packed_reader) == len(folder) == 24
  for number in range(0, 24, 5):
    a, b = folder.read(number, None), packed_reader.read(number, None)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_array_record_pipeline_batches(tiny_dataset, packed):
  for root, fmt in ((tiny_dataset, "folder"), (packed, "array_record")):
    config = pose_data_config(root, format=fmt, out_img_size=SIZE)
    batches = list(pipeline.make_eval_loader(config, "pose", "test"))
    if fmt == "folder":
      reference = batches
  for a, b in zip(reference, batches):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------ bad content


def _broken(tiny_dataset, tmp_path):
  root = str(tmp_path / "broken")
  shutil.copytree(tiny_dataset, root)
  return root


def test_content_errors_name_frame_and_file(tiny_dataset, tmp_path):
  root = _broken(tiny_dataset, tmp_path)
  frames, _ = _raw(root)
  t = lambda rel: os.path.join(root, "trials", rel)
  os.remove(t(frames[0]["cropped_img_path"]))  # missing image
  with open(t(frames[1]["cropped_base_path"]), "wb") as f:
    f.write(b"this is not a jpeg")  # corrupt image
  data = open(t(frames[2]["cropped_img_path"]), "rb").read()
  with open(t(frames[2]["cropped_img_path"]), "wb") as f:
    f.write(data[: len(data) // 2])  # truncated JPEG
  ann = safe_pickle.load_npy(t(frames[3]["ann_path"]))
  ann["pose"] = np.zeros((1, 14, 3), np.float32)
  np.save(t(frames[3]["ann_path"]), ann, allow_pickle=True)  # wrong shape

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > /tmp/dd_jax_pwned",))
  np.save(t(frames[4]["hamer_path"]), np.array({"hand_pose": Evil()}, dtype=object),
          allow_pickle=True)  # malicious pickle
  reader = _reader(pose_data_config(root), "pose")
  expected = {0: (frames[0]["cropped_img_path"], "file not found"),
              1: (frames[1]["cropped_base_path"], "not a decodable image"),
              2: (frames[2]["cropped_img_path"], "truncated JPEG"),
              3: (frames[3]["ann_path"], "'pose' should hold 15 axis-angles"),
              4: (frames[4]["hamer_path"], "refused to unpickle")}
  messages = {}
  for number, (rel, reason) in expected.items():
    with pytest.raises(store.FrameLoadError) as e:
      reader.read(number, None)
    assert e.value.frame_id == number and e.value.path == t(rel)
    assert f"frame {number}: {t(rel)}" in str(e.value) and reason in str(e.value)
    messages[number] = str(e.value)
  assert not os.path.exists("/tmp/dd_jax_pwned")
  # skip_bad_frames: a masked sample that carries the error.
  skipping = _reader(pose_data_config(root, skip_bad_frames=True), "pose")
  sample = skipping.read(1, None)
  assert not sample["valid"] and int(sample["frame_id"]) == 1
  assert "not a decodable image" in samples.decode_error(sample["load_error"])
  # Packing keeps the same errors (reported at load, or by validation).
  out = str(tmp_path / "packed")
  assert array_record.pack(root, out)["frames_with_errors"] == 3  # missing file, ann, pickle
  packed_reader = _reader(pose_data_config(out, format="array_record"), "pose")
  for number in expected:  # the same message (the packed copy of the JSON names its own root)
    with pytest.raises(store.FrameLoadError) as e:
      packed_reader.read(number, None)
    assert str(e.value).replace(out, root) == messages[number]
  with pytest.raises(egodorsal.DatasetFormatError, match="frame 0: .*file not found"):
    validation.validate_dataset(pose_data_config(out, format="array_record"), splits=["all"])


def test_unknown_trial_and_motion_type(tiny_dataset, tmp_path):
  root = _broken(tiny_dataset, tmp_path)
  path = os.path.join(root, "trials.json")
  with open(path) as f:
    data = json.load(f)
  data["trials"][0]["motion_type"] = "free_motion"
  with open(path, "w") as f:
    json.dump(data, f)
  reader = _reader(pose_data_config(root), "force")
  with pytest.raises(samples.MotionTypeError, match="trial 1 .*unknown motion type 'free_motion'"):
    reader.read(0, None)
  assert reader.read(4, None)["valid"]  # other trials are fine
  _reader(pose_data_config(root), "pose").read(0, None)  # pose ignores the motion type
  path = os.path.join(root, "frames.json")
  with open(path) as f:
    data = json.load(f)
  data["frames"][3]["trial_id"] = 77
  with open(path, "w") as f:
    json.dump(data, f)
  with pytest.raises(egodorsal.DatasetFormatError, match="frame 3: unknown trial 77"):
    pipeline.make_eval_loader(pose_data_config(root), "pose", "all")


def test_load_npy_reads_arrays_and_dicts_like_np_load(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"c": rng.normal(size=(3, 4)).astype(np.float32),
            "f": np.asfortranarray(rng.normal(size=(2, 5))),
            "i": np.arange(7, dtype=np.int16), "scalar": np.float64(2.5)}
  for name, value in arrays.items():
    np.save(tmp_path / f"{name}.npy", value)
    got = safe_pickle.load_npy(tmp_path / f"{name}.npy")
    want = np.load(tmp_path / f"{name}.npy")
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want)
  value = {"pose": arrays["c"], "nested": [arrays["i"], (1, "a")]}
  np.save(tmp_path / "dict.npy", value, allow_pickle=True)
  got = safe_pickle.load_npy(tmp_path / "dict.npy")
  np.testing.assert_array_equal(got["pose"], arrays["c"])
  assert got["nested"][1] == (1, "a")
  data = (tmp_path / "c.npy").read_bytes()
  (tmp_path / "short.npy").write_bytes(data[:-8])
  with pytest.raises(ValueError, match=r"short\.npy: truncated"):
    safe_pickle.load_npy(tmp_path / "short.npy")


def test_prior_keypoints_2d_follow_the_crop_and_resize(tiny_dataset):
  """prior_kp2d: HaMeR's full-frame keypoints_2d in network-input pixels, in both modes."""
  frames, _ = _raw(tiny_dataset)
  finalize = samples.Finalize(SIZE)
  placed = {}
  for precropped in (True, False):
    reader = _reader(pose_data_config(tiny_dataset, precropped=precropped), "pose")
    for number, raw in enumerate(frames[:6]):
      sample = reader.read(number, None)
      height, width = sample["img"].shape[:2]
      hamer = safe_pickle.load_npy(os.path.join(tiny_dataset, "trials", raw["hamer_path"]))
      full = hamer["keypoints_2d"].reshape(21, 2).astype(np.float64)
      # The crop rule applied independently to the file's keypoints gives the crop origin.
      x0, x1, y0, y1 = align.crop_box(full[list(egodorsal.CROP_KEYPOINTS)], 256, 192)
      assert (x1 - x0, y1 - y0) == (width, height)
      np.testing.assert_allclose(sample["prior_kp2d"], full - (x0, y0), atol=1e-3)
      out = finalize.map(sample)["prior_kp2d"]
      want = (full - (x0, y0) + 0.5) * (SIZE / width, SIZE / height) - 0.5
      np.testing.assert_allclose(out, want, atol=1e-3)
      placed.setdefault(number, []).append(out)
  assert all(np.allclose(a, b, atol=1e-3) for a, b in placed.values())
  assert np.isnan(reader.placeholder(-1)["prior_kp2d"]).all()


def test_val_panel_draws_the_prior_on_its_2d_keypoints():
  from dd_jax.viz import pictures  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  prior = rng.normal(0, 0.04, (21, 3))
  camera = np.array([[400.0, 30.0, -20.0, 20.0], [-25.0, 380.0, 15.0, 18.0]])
  kp2d = np.concatenate([prior, np.ones((21, 1))], 1) @ camera.T  # 32-pixel network input
  far = prior + 1.0  # ground truth and prediction drawn off the panel
  img = np.zeros((SIZE, SIZE, 3), np.float32)
  panel = pictures.pose_panel(img, img, far, far, prior, kp2d)
  overlay = panel[:, 2 * pictures.PANEL_SIZE:].astype(int)
  scale = pictures.PANEL_SIZE / SIZE
  for x, y in (kp2d + 0.5) * scale - 0.5:
    xi, yi = int(round(x)), int(round(y))
    if 0 <= xi < pictures.PANEL_SIZE and 0 <= yi < pictures.PANEL_SIZE:
      assert np.abs(overlay[yi, xi] - pictures.PRIOR_COLOR).max() < 60, (x, y)
  # Without keypoints the canonical view is used: the hands are still drawn.
  panel = pictures.pose_panel(img, img, prior, prior, prior, np.full((21, 2), np.nan))
  assert panel[:, 2 * pictures.PANEL_SIZE:].any()


@pytest.mark.parametrize("params", [[], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
                                    [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]],
                         ids=["baseline", "progressive", "restart_markers"])
def test_jpeg_trailers_decode_and_cut_streams_are_refused(params):
  rng = np.random.default_rng(0)
  image = cv2.GaussianBlur((rng.random((64, 80, 3)) * 255).astype(np.uint8), (5, 5), 0)
  ok, encoded = cv2.imencode(".jpg", image, params)
  assert ok
  data = encoded.tobytes()
  want = store.decode_image(data, "photo.jpg", 7)
  # Phones append trailers (depth maps, motion photos) after the end-of-image marker.
  trailer = b"MotionPhoto\xff\xd8" + bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
  np.testing.assert_array_equal(store.decode_image(data + trailer, "photo.jpg", 7), want)
  assert store.jpeg_end(data + trailer) == len(data)
  for cut in (data[:-2], data[:len(data) // 2], data[:len(data) // 2] + trailer[:11]):
    with pytest.raises(store.FrameLoadError, match=r"frame 7: photo\.jpg: truncated JPEG"):
      store.decode_image(cut, "photo.jpg", 7)
