"""HaMeR's demo preprocessing and cameras in dd_jax.priors against the reference written from
HaMeR's demo (tests/reference/hamer.py: ViTDetDataset with cv2 + scipy's Gaussian, demo.py's
cam_crop_to_full), and the prior file through the EgoDorsal readers."""

import os

import cv2
import jax
import numpy as np
import pytest

from dd_jax import parallel
from dd_jax.convert import hamer as convert_hamer
from dd_jax.data import align, store
from dd_jax.mano import io as mano_io
from dd_jax.models import hamer
from dd_jax.priors import predictor as predictor_lib
from dd_jax.priors import preprocess, writer

from reference import hamer as ref

HEIGHT, WIDTH = 480, 640
BOXES = {  # (box, is_right)
    "wide box, blurred": ([100.3, 150.6, 400.1, 330.9], 1),  # side 800: anti-alias blur
    "wide box, blurred, left": ([100.3, 150.6, 400.1, 330.9], 0),
    "tall box, left": ([300.2, 200.7, 361.5, 290.2], 0),  # side 180: no blur, uint8 crop
    "tall box, right": ([300.2, 200.7, 361.5, 290.2], 1),
    "off the edge, left": ([-30.5, 400.0, 120.25, 530.0], 0),
    "off the edge, blurred, left": ([-100.5, 300.0, 250.25, 520.0], 0),
}


def photo(seed=0, height=HEIGHT, width=WIDTH):
  """A BGR uint8 image with photo-like content: smooth shading, edges, noise."""
  rng = np.random.default_rng(seed)
  low = cv2.resize(rng.uniform(30, 220, (6, 8, 3)).astype(np.float32), (width, height),
                   interpolation=cv2.INTER_CUBIC)
  mid = cv2.resize(rng.normal(0, 25, (height // 8, width // 8, 3)).astype(np.float32),
                   (width, height), interpolation=cv2.INTER_NEAREST)
  return np.clip(low + mid + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(BOXES))
def test_crop_equals_hamers_pixel_for_pixel(name):
  box, right = BOXES[name]
  bgr = photo()
  want = ref.vitdet_item(bgr, box, right, rescale_factor=2.0)
  crop_box = preprocess.crop_box(box, bool(right), 2.0)
  np.testing.assert_array_equal(crop_box.center, want["box_center"])
  assert crop_box.size == want["box_size"]
  got = preprocess.hamer_input(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), crop_box)
  err = np.abs(got - want["img"].transpose(1, 2, 0)).max()
  print(f"{name}: side {crop_box.size:.1f}, max abs err {err:.1e}")
  assert err <= 1e-5
  assert got.std() > 0.3  # an image, not a blank crop


def test_left_hand_crop_is_the_mirrored_right_crop():
  """Flipping the image and the box gives the same left-hand crop as a right hand's (sanity of
  the flip, independent of the reference)."""
  bgr = photo(1)
  box = np.array([200.4, 120.2, 300.9, 260.3])
  left = preprocess.hamer_input(bgr, preprocess.crop_box(box, False))
  mirrored_box = [WIDTH - 1 - box[2], box[1], WIDTH - 1 - box[0], box[3]]
  right = preprocess.hamer_input(np.ascontiguousarray(bgr[:, ::-1]),
                                 preprocess.crop_box(mirrored_box, True))
  np.testing.assert_allclose(left, right, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch HaMeR, dd_jax predictor on one device) with the same random weights."""
  folder = tmp_path_factory.mktemp("hamer_priors")
  model = ref.tiny_model(str(folder / "mano"), seed=3)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  config = hamer.get_config("custom", **ref.TINY_CUSTOM)
  params = convert_hamer.state_dict_to_params(state, config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))
  net = predictor_lib.build_model(config, params, mesh)
  mano = mano_io.load_mano(os.path.join(folder / "mano", "MANO_RIGHT.pkl"))
  return model, predictor_lib.HamerPredictor(net, mano, mesh)


def _priors(tiny, bgr, names, fx):
  model, predictor = tiny
  boxes = [BOXES[n][0] for n in names]
  rights = [BOXES[n][1] for n in names]
  batch, out, full, focal = ref.demo_outputs(model, bgr, boxes, rights)
  rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  crop_boxes = [preprocess.crop_box(b, bool(r)) for b, r in zip(boxes, rights)]
  got = predictor.predict(np.stack([preprocess.hamer_input(rgb, b) for b in crop_boxes]))
  n = len(crop_boxes)
  priors = writer.prior_dicts(got, crop_boxes, ["boxes_json"] * n, [WIDTH] * n, [HEIGHT] * n,
                              [fx] * n)
  return batch, out, full, focal, priors


def test_demo_cameras_and_keypoints_match_hamers(tiny):
  names = ["wide box, blurred", "wide box, blurred, left", "tall box, left"]
  batch, out, full, focal, priors = _priors(tiny, photo(2), names, fx=600.0)
  for i, prior in enumerate(priors):
    right = bool(batch["right"][i])
    np.testing.assert_allclose(prior["cam_t_full"][0], full[i].numpy(), rtol=1e-3)
    np.testing.assert_allclose(prior["focal_length_full"], float(focal), rtol=1e-6)
    np.testing.assert_allclose(prior["pred_cam"][0], out["pred_cam"][i].numpy(), rtol=1e-3)
    # HaMeR's 2D keypoints taken back through the inverse of its crop's affine transform.
    item = ref.vitdet_item(photo(2), BOXES[names[i]][0], BOXES[names[i]][1])
    cx = item["box_center"][0] if right else WIDTH - item["box_center"][0] - 1
    trans = preprocess.affine_matrix(np.float32(cx), item["box_center"][1],
                                     np.float32(item["box_size"]), 256)
    crop_px = (out["pred_keypoints_2d"][i].numpy().astype(np.float64) + 0.5) * 256
    full_px = np.c_[crop_px, np.ones(21)] @ cv2.invertAffineTransform(trans).T
    if not right:
      full_px[:, 0] = WIDTH - 1 - full_px[:, 0]
    np.testing.assert_allclose(prior["hamer_keypoints_2d"][0], full_px, atol=2e-3)
    # keypoints_3d is HaMeR's, x mirrored back for a left hand (as demo.py draws vertices).
    kp = out["pred_keypoints_3d"][i].numpy() * ([1, 1, 1] if right else [-1, 1, 1])
    np.testing.assert_allclose(prior["keypoints_3d"][0], kp, atol=1e-5)


@pytest.mark.parametrize("fx", [600.0, 20000.0])
def test_cam_t_round_trip_through_the_readers(tiny, tmp_path, fx):
  names = ["wide box, blurred", "wide box, blurred, left", "tall box, right"]
  *_, priors = _priors(tiny, photo(3), names, fx=fx)
  K = np.array([[fx, 0, WIDTH / 2], [0, fx, HEIGHT / 2], [0, 0, 1]])
  for i, prior in enumerate(priors):
    path = str(tmp_path / f"hamer_{i}.npy")
    writer.write_prior(path, prior)
    assert sorted(os.listdir(tmp_path)) == sorted(f"hamer_{j}.npy" for j in range(i + 1))
    read = store.parse_prior(store.load_npy_dict(path, i), path, i)
    # The readers' convention, written out: focal K[0,0]/256*max(w,h), centred principal point.
    focal = K[0, 0] / 256 * max(WIDTH, HEIGHT)
    p = read.keypoints_3d + read.cam_t
    projected = focal * p[:, :2] / p[:, 2:] + [WIDTH / 2, HEIGHT / 2]
    err = np.abs(projected - prior["keypoints_2d"][0]).max()
    np.testing.assert_allclose(align.project_hamer(read.keypoints_3d, read.cam_t,
                                                   align.hamer_focal(K, WIDTH, HEIGHT), WIDTH,
                                                   HEIGHT), projected, atol=1e-6)
    print(f"fx {fx}: round trip {err:.1e} px, fit to HaMeR's 2D keypoints "
          f"{prior['cam_t_fit_rms_px']:.2f} px RMS")
    assert err <= 0.5
    if fx >= 20000:  # near-orthographic, like HaMeR's own crop camera: the fit is exact
      assert prior["cam_t_fit_rms_px"] < 0.5
    np.testing.assert_allclose(read.hand_pose, store.matrix_to_axis_angle(
        prior["hand_pose"][0]).reshape(45), atol=1e-6)
