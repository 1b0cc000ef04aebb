"""The stages between a raw camera frame (plus a base image of the same hand) and DeltaDorsal's
inputs, and from its outputs back to the full frame.

1. camera: the frame's intrinsics and distortion, given or assumed; undistortion as the online
   mode does it (data.align.Undistorter);
2. prior: HaMeR's demo crop of a hand box (given, tracked from the previous frame, or the whole
   image: priors.job.hand_crop), HaMeR, and the prior dict the make-priors job writes
   (priors.writer.prior_dicts); `hand_problem` says when a prior shows no usable hand;
3. align: the online mode's homography and crops (data.align.online_crops) and the evaluation
   transform (data.transforms.to_model_input) on the priors as the readers parse them
   (data.store.parse_prior): the network inputs of the data pipeline in online mode;
4. after the network: the predicted hand placed where HaMeR saw it (HaMeR's global orientation,
   its wrist on HaMeR's wrist, HaMeR's translation cam_t), projected with the readers' camera
   (focal K[0,0]/256*max(w, h), principal point at the centre) and distorted back into the raw
   frame's pixels.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.data import align, egodorsal, store, transforms
from dd_jax.data.egodorsal import ALIGN_KEYPOINTS
from dd_jax.priors import job as priors_job
from dd_jax.priors import writer
from dd_jax.priors.predictor import HamerPredictor

ASSUMED_FX = priors_job.DEFAULT_FX  # K[0,0] without intrinsics: the readers' focal is HaMeR's
# A prior is a usable hand when (hand_problem): its keypoints are finite and in front of the
# camera, span at least MIN_HAND_PIXELS, at least MIN_ALIGN_INSIDE of the 4 alignment keypoints
# fall inside the image, and the image under the keypoints is not blank (HaMeR, which has no
# detector, finds a "hand" in any picture).
MIN_HAND_PIXELS = 16.0
MIN_ALIGN_INSIDE = 3
BLANK_STD = 2.0  # grey levels


class PredictionError(ValueError):
  """A frame, or its base, cannot be predicted; the message says why. Runners mark the frame
  as failed and go on."""


# ------------------------------------------------------------------------------ 1. camera


@dataclasses.dataclass(frozen=True, eq=False)
class Camera:
  """What a frame was taken with: K (3, 3), OpenCV distortion d (n,), and where they came from."""
  K: np.ndarray
  d: np.ndarray
  note: str

  @property
  def distorted(self) -> bool:
    return bool(np.any(self.d))


ASSUMED_NOTE = ("no intrinsics given: assumed no lens distortion and K[0,0] = 5000, so the "
                "readers' focal is 5000/256*max(w, h), HaMeR's own full-image focal, with the "
                "principal point at the image centre")


def make_camera(K: Any = None, d: Any = None, *, width: int, height: int,
                source: str = "given") -> Camera:
  """K, d as given (d optional: no distortion), or the assumed camera when K is None."""
  if K is None:
    if d is not None and np.any(np.asarray(d, np.float64)):
      raise ValueError("distortion coefficients were given without the camera matrix K")
    K = np.array([[ASSUMED_FX, 0, width / 2.0], [0, ASSUMED_FX, height / 2.0], [0, 0, 1]])
    return Camera(K, np.zeros(5), ASSUMED_NOTE)
  K = np.asarray(K, np.float64)
  if K.size != 9 or not np.all(np.isfinite(K)) or K.reshape(3, 3)[0, 0] <= 0:
    raise ValueError(f"K should be a finite 3x3 camera matrix with K[0,0] > 0, got {K.tolist()}")
  if d is None:
    return Camera(K.reshape(3, 3), np.zeros(5), source)
  d_cv = egodorsal.opencv_distortion(np.asarray(d, np.float64))
  if d_cv is None or not np.all(np.isfinite(d_cv)):
    raise ValueError(f"d should hold 4, 5, 8, 12 or 14 OpenCV distortion coefficients, got "
                     f"{np.asarray(d).tolist()}")
  return Camera(K.reshape(3, 3), d_cv, source)


def to_raw_pixels(points: np.ndarray, camera: Camera) -> np.ndarray:
  """(N, 2) pixels of the undistorted image -> the raw (distorted) frame's pixels.

  Undistortion maps raw pixels to K x_n for ideal normalised points x_n (new camera matrix K,
  as align.Undistorter), so a raw pixel is x_n pushed through the lens model with K, d.
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  if not camera.distorted:
    return points
  normalised = np.concatenate([points, np.ones((len(points), 1))], 1) @ np.linalg.inv(camera.K).T
  raw, _ = cv2.projectPoints(normalised[:, None, :], np.zeros(3), np.zeros(3), camera.K, camera.d)
  return np.where(np.isfinite(points), raw.reshape(-1, 2), np.nan)


# ------------------------------------------------------------------------------ 2. prior


@dataclasses.dataclass(frozen=True, eq=False)
class HandPrior:
  """A HaMeR prior: the dict (as the make-priors job writes it) and what the readers parse."""
  raw: dict[str, Any]
  parsed: store.Prior
  global_orient: np.ndarray | None  # (3, 3) HaMeR's root rotation; None when the file has none


def as_prior(value: Any, what: str) -> HandPrior:
  """A prior dict -> HandPrior; a malformed one raises PredictionError naming `what`."""
  try:
    parsed = store.parse_prior(value, what, None)
  except store.FrameLoadError as e:
    raise PredictionError(str(e)) from None
  orient = None
  try:
    matrix = np.asarray(value.get("global_orient"), np.float64)
    if matrix.size == 9 and np.all(np.isfinite(matrix)):
      orient = matrix.reshape(3, 3)
  except (TypeError, ValueError):
    pass
  return HandPrior(value, parsed, orient)


def read_prior(path: str) -> HandPrior:
  """A prior file (allowlisted unpickling); unreadable or malformed ones raise PredictionError."""
  try:
    value = store.load_npy_dict(path, None)
  except store.FrameLoadError as e:
    raise PredictionError(str(e)) from None
  return as_prior(value, path)


def hamer_priors(hamer: HamerPredictor, images: Sequence[np.ndarray], cameras: Sequence[Camera],
                 boxes: Sequence[tuple[np.ndarray, bool] | None],
                 track_from: Sequence[dict | None], options: priors_job.Options,
                 timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
  """Undistorted RGB images -> their prior dicts, one HaMeR batch (a multiple of its mesh).
  timings["prior_compiled"] (if given) grows by the seconds of the compiled call."""
  crops, crop_boxes, sources = [], [], []
  for image, box, previous in zip(images, boxes, track_from):
    crop, crop_box, source = priors_job.hand_crop(image, box, previous, options,
                                                  hamer.config.image_size)
    crops.append(crop)
    crop_boxes.append(crop_box)
    sources.append(source)
  start = time.perf_counter()
  outputs = hamer.predict(np.stack(crops))
  if timings is not None:
    timings["prior_compiled"] += time.perf_counter() - start
  return writer.prior_dicts(
      outputs, crop_boxes, sources, np.array([im.shape[1] for im in images]),
      np.array([im.shape[0] for im in images]), np.array([c.K[0, 0] for c in cameras]))


def hand_problem(prior: HandPrior, K: np.ndarray, image: np.ndarray) -> str | None:
  """Why `prior` shows no usable hand in `image` (undistorted, taken with K), or None."""
  p = prior.parsed
  if p.keypoints_3d is None or p.cam_t is None:
    return "the prior has no keypoints_3d / cam_t"
  height, width = image.shape[:2]
  depth = p.keypoints_3d[:, 2] + p.cam_t[2]
  if not np.all(depth > 0):
    return "HaMeR's hand lies (partly) behind the camera"
  points = align.project_hamer(p.keypoints_3d, p.cam_t, align.hamer_focal(K, width, height),
                               width, height)
  if not np.all(np.isfinite(points)):
    return "HaMeR's keypoints do not project to finite pixels"
  extent = float(np.ptp(points, axis=0).max())
  if extent < MIN_HAND_PIXELS:
    return f"HaMeR's hand spans only {extent:.1f} px (at least {MIN_HAND_PIXELS:.0f} needed)"
  anchors = points[list(ALIGN_KEYPOINTS)]
  inside = int(np.sum((anchors[:, 0] >= 0) & (anchors[:, 0] < width) & (anchors[:, 1] >= 0)
                      & (anchors[:, 1] < height)))
  if inside < MIN_ALIGN_INSIDE:
    return (f"too few keypoints in the image: {inside} of the 4 alignment keypoints "
            f"{list(ALIGN_KEYPOINTS)} fall inside the {width}x{height} image")
  x0, y0 = np.clip(np.floor(points.min(0)).astype(int), 0, [width, height])
  x1, y1 = np.clip(np.ceil(points.max(0)).astype(int) + 1, 0, [width, height])
  window = image[y0:y1, x0:x1]
  if window.size and float(window.std()) < BLANK_STD:
    return f"the image under the hand is blank (pixel std {float(window.std()):.2f})"
  return None


# ------------------------------------------------------------------------------ 3. align


@dataclasses.dataclass(frozen=True, eq=False)
class PairInputs:
  """One frame's network inputs, as the data pipeline's online mode makes them."""
  img: np.ndarray  # (S, S, 3) float32: the frame crop, resized and normalised
  base_img: np.ndarray  # (S, S, 3) float32: the base warped onto the frame, same crop
  prior_pose: np.ndarray  # (45,) float32: the frame prior's hand_pose (axis-angle)
  betas: np.ndarray  # (10,) float32: the base prior's betas[0] (the trainer's shape)
  alignment: align.Alignment


def pair_inputs(frame: np.ndarray, base: np.ndarray, K: np.ndarray, frame_prior: HandPrior,
                base_prior: HandPrior, size: int) -> PairInputs:
  """Undistorted frame and base, both priors -> the network inputs (samples.SampleReader's
  online mode + Finalize); problems raise PredictionError."""
  fp, bp = frame_prior.parsed, base_prior.parsed
  for what, value in (("frame prior's hand_pose", fp.hand_pose), ("base prior's betas", bp.betas),
                      ("frame prior's keypoints_3d", fp.keypoints_3d),
                      ("frame prior's cam_t", fp.cam_t),
                      ("base prior's keypoints_3d", bp.keypoints_3d),
                      ("base prior's cam_t", bp.cam_t)):
    if value is None:
      raise PredictionError(f"no {what}")
  try:
    img, base_img, alignment = align.online_crops(K, frame, base, fp.keypoints_3d, fp.cam_t,
                                                  bp.keypoints_3d, bp.cam_t)
  except align.AlignmentError as e:
    raise PredictionError(f"alignment: {e}") from None
  except cv2.error as e:
    raise PredictionError(f"alignment: OpenCV failed: {e}") from None
  return PairInputs(transforms.to_model_input(img, size), transforms.to_model_input(base_img, size),
                    fp.hand_pose, bp.betas, alignment)


# ------------------------------------------------------------------------------ 4. full frame


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where HaMeR saw the hand (batched): what puts a predicted pose into the frame."""
  orient: np.ndarray  # (B, 3, 3) HaMeR's global orientation
  wrist: np.ndarray  # (B, 3) HaMeR's wrist in the readers' camera frame (keypoints_3d[0] + cam_t)
  focal: np.ndarray  # (B,) the readers' focal
  centre: np.ndarray  # (B, 2) principal point (the image centre)


def placement(priors: Sequence[HandPrior | None], Ks: Sequence[np.ndarray],
              sizes: Sequence[tuple[int, int]]) -> tuple[Placement, np.ndarray]:
  """Per frame prior, camera and (width, height) -> (Placement, placeable (B,) bool). A frame
  without HaMeR's orientation or translation gets an identity placement, marked False."""
  n = len(priors)
  orient, wrist = np.tile(np.eye(3), (n, 1, 1)), np.tile([0.0, 0.0, 1.0], (n, 1))
  ok = np.zeros(n, bool)
  for i, prior in enumerate(priors):
    if prior is not None and prior.global_orient is not None \
        and prior.parsed.keypoints_3d is not None and prior.parsed.cam_t is not None:
      orient[i], wrist[i] = prior.global_orient, prior.parsed.keypoints_3d[0] + prior.parsed.cam_t
      ok[i] = True
  focal = np.array([align.hamer_focal(K, w, h) for K, (w, h) in zip(Ks, sizes)])
  centre = np.array([[w / 2.0, h / 2.0] for w, h in sizes]).reshape(n, 2)
  return Placement(orient.astype(np.float32), wrist.astype(np.float32),
                   focal.astype(np.float32), centre.astype(np.float32)), ok


def place_hand(vertices: jax.Array, keypoints: jax.Array, orient: jax.Array, wrist: jax.Array,
               focal: jax.Array, centre: jax.Array) -> dict[str, jax.Array]:
  """The predicted hand, from MANO with zero global orientation (vertices (B, 778, 3),
  keypoints (B, 21, 3)), put where HaMeR saw it (a Placement's arrays): keypoints_cam
  (B, 21, 3) and vertices_cam (B, 778, 3) in the readers' camera frame, keypoints_2d (B, 21, 2)
  in the undistorted image's pixels.

  MANO's global orientation turns the hand about its wrist (the root joint, keypoint 0), so the
  oriented hand is R (x - wrist) + wrist; it is then moved so that its wrist is HaMeR's.
  """
  root = keypoints[:, :1]
  rotate = lambda x: jnp.einsum("bij,bnj->bni", orient, x - root) + wrist[:, None]
  keypoints_cam, vertices_cam = rotate(keypoints), rotate(vertices)
  pixels = (focal[:, None, None] * keypoints_cam[..., :2] / keypoints_cam[..., 2:3]
            + centre[:, None])
  return {"keypoints_cam": keypoints_cam, "vertices_cam": vertices_cam, "keypoints_2d": pixels}


def prior_keypoints_2d(prior: HandPrior | None, K: np.ndarray, width: int, height: int
                       ) -> np.ndarray:
  """The prior's (21, 2) keypoints in the undistorted image (the readers' projection; NaN
  without keypoints_3d / cam_t)."""
  if prior is None or prior.parsed.keypoints_3d is None or prior.parsed.cam_t is None:
    return np.full((21, 2), np.nan)
  return align.project_hamer(prior.parsed.keypoints_3d, prior.parsed.cam_t,
                             align.hamer_focal(K, width, height), width, height)
