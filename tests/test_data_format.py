"""EgoDorsal metadata readers, split selection, validation, parsers and image transforms."""

import json
import os
import shutil
import time

import cv2
import numpy as np
import pytest

from dd_jax.data import egodorsal, pipeline, splits, store, transforms, validation
from dd_jax.data.egodorsal import DatasetFormatError
from dd_jax.synthetic import dataset as synthetic
from dd_jax.synthetic import render
from dd_jax.viz import draw

from tiny import pose_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(tiny_dataset, tmp_path):
  dst = tmp_path / "set"
  shutil.copytree(tiny_dataset, dst)
  return str(dst)


def _edit_json(path, fn):
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


# ------------------------------------------------------------------ readers and selection


def test_index_and_splits_match_generator(tiny_dataset):
  index = egodorsal.load_index(tiny_dataset)
  assert sorted(index.bases) == [1, 2, 3] and all(len(b) == 2 for b in index.bases.values())
  assert len(index.trials) == 6
  trial = index.trials[1]
  assert trial.K.shape == (3, 3) and trial.d.shape == (5,) and trial.world2cam.shape == (4, 4)
  with open(os.path.join(tiny_dataset, "trials.json")) as f:
    raw = json.load(f)["trials"][0]
  np.testing.assert_array_equal(trial.K, np.asarray(raw["K"]))
  assert trial.motion_type == raw["motion_type"]
  everything = egodorsal.select_frames(index, "all")
  assert [f.frame_id for f in everything] == list(range(24))
  expected = synthetic.participant_splits(3)
  for split in ("train", "val", "test"):
    frames = egodorsal.select_frames(index, split)
    assert {f.p_id for f in frames} == set(expected[split])
    assert all(os.path.isabs(f.img_path) and f.img_path.startswith(tiny_dataset) for f in frames)
  # A participant list overrides the split; sample_ratio keeps every int(1/r)-th frame.
  sel = egodorsal.select_frames(index, "val", participants=[1, 3])
  assert {f.p_id for f in sel} == {1, 3} and len(sel) == 16
  assert [f.frame_id for f in egodorsal.select_frames(index, "all", sample_ratio=0.25)] == \
      list(range(0, 24, 4))
  assert len(egodorsal.select_frames(index, "all", sample_ratio=0.3)) == 8  # int(1/0.3) = 3


def test_leave_one_out_roles(tiny_dataset):
  config = pose_data_config(tiny_dataset, leave_one_out=True, val_participants=(2,), test_participants=(3,))
  index = egodorsal.load_index(tiny_dataset)
  assert splits.resolve_split(config, "train", index) == ("all", (1,))
  assert splits.resolve_split(config, "val", index) == ("all", (2,))
  assert splits.resolve_split(config, "test", index) == ("all", (3,))
  config.all_participant_ids = (1, 2)
  assert splits.resolve_split(config, "train", index) == ("all", (1,))
  _, frames = pipeline.select(config, "train")
  assert {f.p_id for f in frames} == {1}
  bad = pose_data_config(tiny_dataset, leave_one_out=True, val_participants=(2,), test_participants=(2, 9))
  with pytest.raises(DatasetFormatError) as e:
    validation.validate_dataset(bad)
  assert "[9]" in str(e.value) and "both" in str(e.value)


def test_distortion_lengths():
  assert egodorsal.opencv_distortion(np.zeros((1, 5))).shape == (5,)
  d15 = np.zeros(15)
  d15[:5] = 0.1
  assert egodorsal.opencv_distortion(d15).shape == (5,)  # trailing zeros dropped
  d15[14] = 1.0
  assert egodorsal.opencv_distortion(d15) is None


# ------------------------------------------------------------------ validation


def test_validation_passes_and_is_fast_on_many_frames(tiny_dataset, tmp_path):
  assert "24 frames" in validation.validate_dataset(pose_data_config(tiny_dataset), splits=["all"])
  # 170k frames referencing existing files: JSON + directory listings only.
  root = _copy(tiny_dataset, tmp_path)
  with open(os.path.join(root, "frames.json")) as f:
    data = json.load(f)
  base = data["frames"]
  data["frames"] = [dict(base[i % len(base)], frame_id=i) for i in range(170_000)]
  with open(os.path.join(root, "frames.json"), "w") as f:
    json.dump(data, f)
  start = time.perf_counter()
  summary = validation.validate_dataset(pose_data_config(root), splits=["all"])
  assert "170000 frames" in summary
  assert time.perf_counter() - start < 20.0


def test_validation_lists_every_problem(tiny_dataset, tmp_path):
  root = _copy(tiny_dataset, tmp_path)
  os.remove(os.path.join(root, "trials", "PARTICIPANT_001", "TRIAL_001", "hamer", "frame_00001.npy"))
  os.remove(os.path.join(root, "trials", "PARTICIPANT_002", "TRIAL_003", "cropped_images",
                         "frame_00002.jpg"))
  os.remove(os.path.join(root, "bases", "PARTICIPANT_003", "hamer", "base_001.npy"))

  def break_frames(data):
    data["frames"][5]["trial_id"] = 999
    del data["frames"][6]["ann_path"]
    data["frames"][7]["cropped_base_idx"] = 7
  _edit_json(os.path.join(root, "frames.json"), break_frames)
  _edit_json(os.path.join(root, "trials.json"),
             lambda d: d["trials"][1].update(motion_type="juggling"))
  with pytest.raises(DatasetFormatError) as e:
    validation.validate_dataset(pose_data_config(root), splits=["all"])
  message = str(e.value)
  assert "frame 1: hamer_path" in message and "frame_00001.npy not found" in message
  assert "cropped_img_path" in message and "frame_00002.jpg not found" in message
  assert "frame 5: unknown trial 999" in message
  assert "frame 6" in message and "missing ann_path" in message
  assert "cropped_base_idx 7" in message
  frames_of_p3 = [f for f in egodorsal.select_frames(egodorsal.load_index(tiny_dataset), "all")
                  if f.p_id == 3 and f.cropped_base_idx == 1]
  if frames_of_p3:
    assert "base_001.npy not found" in message
  assert len(e.value.problems) >= 5
  # The pose task does not care about motion types; the force task names the trial.
  with pytest.raises(DatasetFormatError) as e:
    validation.validate_dataset(pose_data_config(root), task="force", splits=["all"])
  assert "trial 2 (participant 1): unknown motion type 'juggling'" in str(e.value)


def test_paths_from_the_json_stay_inside_their_roots(tiny_dataset, tmp_path):
  root = _copy(tiny_dataset, tmp_path)
  with open(os.path.join(root, "frames.json")) as f:
    ids = [fr["frame_id"] for fr in json.load(f)["frames"]]

  def escape(data):
    data["frames"][0]["cropped_img_path"] = "../../../../../../../../etc/passwd"
    data["frames"][1]["hamer_path"] = "/etc/hostname"
    data["frames"][2]["cropped_base_idx"] = "1"  # a wrong type, not a missing field
  _edit_json(os.path.join(root, "frames.json"), escape)
  _edit_json(os.path.join(root, "bases.json"),
             lambda d: d["participants"][0]["bases"][0].update(img_path="../../outside.jpg"))
  with pytest.raises(DatasetFormatError) as e:
    validation.validate_dataset(pose_data_config(root, precropped=False), splits=["all"])
  message = str(e.value)
  print(message)
  trials = os.path.join(root, "trials")
  assert (f"frames.json frame {ids[0]}: cropped_img_path '../../../../../../../../etc/passwd' "
          f"resolves to /etc/passwd, outside {trials}") in message
  assert f"frames.json frame {ids[1]}: hamer_path '/etc/hostname' resolves to /etc/hostname" \
      in message
  assert f"frames.json frame {ids[2]}: 'cropped_base_idx' should be int, got str '1'" in message
  assert "missing" not in message
  assert "bases.json participant 1 bases[0]: img_path '../../outside.jpg' resolves to" in message
  # Without validation the readers refuse them just the same: nothing outside is read.
  with pytest.raises(DatasetFormatError, match="img_path '../../outside.jpg' resolves to"):
    pipeline.make_eval_loader(pose_data_config(root, validate=False), "pose", "all")
  shutil.copy(os.path.join(tiny_dataset, "bases.json"), os.path.join(root, "bases.json"))
  with pytest.raises(DatasetFormatError, match="resolves to /etc/passwd"):
    pipeline.make_eval_loader(pose_data_config(root, validate=False), "pose", "all")


def test_symlinks_out_of_the_root_are_refused_unless_allowed(tiny_dataset, tmp_path):
  root = _copy(tiny_dataset, tmp_path)
  with open(os.path.join(root, "frames.json")) as f:
    frame = json.load(f)["frames"][3]
  crop = os.path.join(root, "trials", frame["cropped_img_path"])
  outside = str(tmp_path / "elsewhere.jpg")
  shutil.move(crop, outside)
  os.symlink(outside, crop)
  with pytest.raises(DatasetFormatError) as e:
    validation.validate_dataset(pose_data_config(root), splits=["all"])
  assert (f"frame {frame['frame_id']}: cropped_img_path {crop} resolves to {outside} through a "
          "symlink, outside the dataset root") in str(e.value)
  assert "data.allow_symlinks_outside_root=True" in str(e.value)
  index = egodorsal.load_index(root)
  (selected,) = [f for f in egodorsal.select_frames(index, "all") if f.frame_id == frame["frame_id"]]
  with pytest.raises(store.FrameLoadError, match="through a symlink"):
    store.FolderStore(index).frame_image(selected, "cropped_img")
  allowed = pose_data_config(root, allow_symlinks_outside_root=True)
  assert "24 frames" in validation.validate_dataset(allowed, splits=["all"])
  data, path = store.FolderStore(index, allow_symlinks_outside_root=True).frame_image(
      selected, "cropped_img")
  assert path == crop and data[:2] == b"\xff\xd8"


def test_metadata_errors_are_collected(tmp_path):
  (tmp_path / "bases.json").write_text(json.dumps({"participants": [{"p_id": 1, "bases": []}]}))
  (tmp_path / "trials.json").write_text(json.dumps({"trials": [
      {"trial_id": 1, "p_id": 1, "motion_type": "x", "K": [[1, 0], [0, 1]], "d": [0] * 5,
       "world2cam": np.eye(4).tolist()},
      {"trial_id": 2, "p_id": 4, "motion_type": "x", "K": np.eye(3).tolist(), "d": [0] * 5,
       "world2cam": np.eye(4).tolist()}]}))
  with pytest.raises(DatasetFormatError) as e:
    egodorsal.load_index(str(tmp_path))
  text = str(e.value)
  assert "participant 1 has no usable base" in text
  assert "trial 1: 'K' should be a finite array of shape (3, 3)" in text
  assert "trial 2: participant 4 has no entry in bases.json" in text


# ------------------------------------------------------------------ .npy parsing


def test_matrix_to_axis_angle_matches_rodrigues():
  rng = np.random.default_rng(0)
  aa = rng.normal(size=(200, 3))
  aa *= (rng.uniform(0, np.pi, 200) / np.linalg.norm(aa, axis=1))[:, None]
  aa[:3] = [[0, 0, 0], [1e-9, 0, 0], [0, np.pi - 1e-7, 0]]
  R = np.stack([cv2.Rodrigues(a)[0] for a in aa])
  back = store.matrix_to_axis_angle(R)
  R_back = np.stack([cv2.Rodrigues(a)[0] for a in back])
  np.testing.assert_allclose(R_back, R, atol=1e-6)
  np.testing.assert_allclose(back[3:], aa[3:], atol=1e-6)


def test_prior_and_annotation_shapes():
  rng = np.random.default_rng(1)
  aa = rng.normal(0, 0.3, (15, 3))
  mats = np.stack([cv2.Rodrigues(a)[0] for a in aa])[None]
  prior = store.parse_prior({"hand_pose": mats, "betas": np.ones((1, 10)),
                             "keypoints_3d": np.zeros((1, 21, 3)), "cam_t": np.zeros((1, 3))},
                            "x.npy", 3)
  np.testing.assert_allclose(prior.hand_pose, aa.reshape(45), atol=1e-5)
  assert prior.betas.shape == (10,) and prior.keypoints_3d.shape == (21, 3)
  assert store.parse_prior({"hand_pose": aa[None]}, "x.npy", 3).keypoints_3d is None
  gt = store.parse_ground_truth({"pose": aa.reshape(1, 45)}, "a.npy", 3)
  np.testing.assert_allclose(gt, aa.reshape(45), atol=1e-7)
  np.testing.assert_allclose(store.parse_ground_truth({"hand_pose": mats}, "a.npy", 3),
                             aa.reshape(45), atol=1e-5)
  with pytest.raises(store.FrameLoadError, match=r"frame 3: a.npy: .*'pose' should hold 15"):
    store.parse_ground_truth({"pose": np.zeros((1, 14, 3))}, "a.npy", 3)
  with pytest.raises(store.FrameLoadError, match=r"'keypoints_3d' should have shape \(21, 3\)"):
    store.parse_prior({"hand_pose": aa, "keypoints_3d": np.zeros((20, 3))}, "x.npy", 3)
  with pytest.raises(store.FrameLoadError, match="neither 'pose' nor 'hand_pose'"):
    store.parse_ground_truth({"betas": np.zeros(10)}, "a.npy", 3)


# ------------------------------------------------------------------ image transforms


def _reference_color(image, b, c, brightness_first, gamma):
  x = image.astype(np.float64) / 255.0
  def bright(x):
    return np.clip(x * b, 0, 1)
  def contrast(x):
    mean = np.mean(x @ np.array([0.2989, 0.587, 0.114]))
    return np.clip(c * x + (1 - c) * mean, 0, 1)
  x = contrast(bright(x)) if brightness_first else bright(contrast(x))
  return x ** gamma


def test_color_lut_matches_direct_computation():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  for seed in range(4):
    lut = transforms.color_lut(image, transforms.draw_augment(np.random.default_rng(seed)))
    draw = np.random.default_rng(seed)
    b, c = draw.uniform(0.9, 1.1), draw.uniform(0.9, 1.1)
    first, gamma = draw.random() < 0.5, 1 + draw.uniform(-0.1, 0.1)
    got = np.stack([lut[ch][image[..., ch]] for ch in range(3)], -1)
    np.testing.assert_allclose(got, _reference_color(image, b, c, first, gamma), atol=1e-9)


def test_augment_matches_reference_pipeline():
  """LUT colour + blur + normalisation against a direct float64 implementation (no noise)."""
  from scipy import ndimage
  image = np.random.default_rng(7).integers(0, 256, (30, 26, 3), dtype=np.uint8)
  cfg = transforms.AugmentConfig(noise_std=0.0)
  for seed in range(3):
    out = transforms.augment(image, np.random.default_rng(seed), cfg)
    draw = np.random.default_rng(seed)
    b, c = draw.uniform(0.9, 1.1), draw.uniform(0.9, 1.1)
    first, gamma = draw.random() < 0.5, 1 + draw.uniform(-0.1, 0.1)
    sigma = draw.uniform(0.1, 1.0)
    x = _reference_color(image, b, c, first, gamma)
    taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    for axis in (0, 1):
      x = ndimage.convolve1d(x, taps, axis=axis, mode="mirror")  # = OpenCV's REFLECT_101
    expected = (x - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_augment_noise_clip_and_determinism():
  cfg = transforms.AugmentConfig(brightness=0, contrast=0, gamma=0, blur_sigma=(0.1, 0.1))
  grey = np.full((64, 64, 3), 128, np.uint8)
  out = transforms.augment(grey, np.random.default_rng(5), cfg)
  assert out.dtype == np.float32 and out.shape == grey.shape
  back = out * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN  # [0, 1] units
  np.testing.assert_allclose(np.std(back - 128 / 255, axis=(0, 1)), 0.007, rtol=0.08)
  np.testing.assert_array_equal(out, transforms.augment(grey, np.random.default_rng(5), cfg))
  assert not np.array_equal(out, transforms.augment(grey, np.random.default_rng(6), cfg))
  white = transforms.augment(np.full((64, 64, 3), 255, np.uint8), np.random.default_rng(5), cfg)
  back = white * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN
  assert back.max() <= 1 + 1e-5 and 0.99 < back.mean() < 0.999  # clipped at 1


def test_normalisation_and_resize():
  image = np.zeros((100, 60, 3), np.uint8)
  image[..., 0] = 255
  out = transforms.to_model_input(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  expected = (np.array([1.0, 0, 0]) - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
  np.testing.assert_allclose(out[5, 5], expected, atol=1e-6)
  normalised = transforms.normalise(image.astype(np.float32) / 255)
  np.testing.assert_allclose(transforms.to_model_input(normalised, 32), out, atol=1e-5)
  np.testing.assert_array_equal(transforms.denormalise(out)[0, 0], [255, 0, 0])


# ------------------------------------------------------------------ rendering


def _reference_raster(vertices, faces, K, size):
  """Brute force: every pixel against every triangle (planar depth at the pixel)."""
  w, h = size
  uv, z = render.project(vertices, K)
  face = np.full((h, w), -1)
  depth = np.full((h, w), np.inf)
  for y in range(h):
    for x in range(w):
      for i, (a, b, c) in enumerate(faces):
        m = np.array([[uv[a, 0] - uv[c, 0], uv[b, 0] - uv[c, 0]],
                      [uv[a, 1] - uv[c, 1], uv[b, 1] - uv[c, 1]]])
        if abs(np.linalg.det(m)) < 1e-12:
          continue
        l0, l1 = np.linalg.solve(m, [x - uv[c, 0], y - uv[c, 1]])
        lam = np.array([l0, l1, 1 - l0 - l1])
        if np.all(lam >= -1e-9):
          d = 1.0 / np.sum(lam / z[[a, b, c]])
          if d < depth[y, x]:
            depth[y, x], face[y, x] = d, i
  return face, depth


def test_rasterizer_matches_brute_force():
  rng = np.random.default_rng(4)
  vertices = np.concatenate([rng.uniform(-0.5, 0.5, (12, 2)), rng.uniform(1.0, 3.0, (12, 1))], 1)
  faces = rng.integers(0, 12, (8, 3))
  faces = faces[[len(set(f)) == 3 for f in faces]]
  K = np.array([[20.0, 0, 12], [0, 20.0, 10], [0, 0, 1]])
  raster = render.rasterize(vertices, faces, K, (24, 20))
  face, depth = _reference_raster(vertices, faces, K, (24, 20))
  agree = raster.face == face
  assert agree.mean() > 0.99  # ties on shared edges may go either way
  both = (raster.face >= 0) & (face >= 0)
  np.testing.assert_allclose(raster.depth[both], depth[both], rtol=1e-5)
  mesh = draw.render_mesh(vertices, faces, K, (24, 20), background=np.full((20, 24, 3), 9, np.uint8))
  assert mesh.shape == (20, 24, 3) and (mesh[raster.face < 0] == 9).all()


def test_draw_hand_keypoints():
  image = np.zeros((64, 64, 3), np.uint8)
  points = np.stack([np.linspace(5, 58, 21), np.linspace(8, 50, 21)], 1)
  out = draw.draw_hand_keypoints(image, points, (0, 255, 0))
  assert image.max() == 0 and out[..., 1].max() == 255 and out[..., 0].max() == 0
  assert out[int(points[10, 1]), int(points[10, 0]), 1] > 0
  colored = draw.draw_hand_keypoints(image, points)
  assert len({tuple(c) for c in colored.reshape(-1, 3)}) > 5
  with pytest.raises(ValueError):
    draw.draw_hand_keypoints(image, points[:20])
