"""The cameras a HaMeR prior can be read with (docs/hamer.md "Camera conventions").

HaMeR predicts a weak-perspective camera (s, tx, ty) for its 256-px crop. Two full-image
translations follow from it:
- `cam_t`, the EgoDorsal readers' convention (dd_jax.data.align: focal K[0,0]/256*max(w,h),
  principal point at the image centre): the translation that makes that camera project
  keypoints_3d onto HaMeR's own 2D keypoints (least squares in pixels, Gauss-Newton started from
  cam_crop_to_full with that focal). `keypoints_2d` is then that projection.
- `cam_t_full`, HaMeR's demo convention: cam_crop_to_full with focal 5000/256*max(w,h) and the
  left hand's tx mirrored, for vertices with x negated on left hands (as demo.py draws them).
All float64 numpy on one hand at a time.
"""

from __future__ import annotations

import numpy as np

from dd_jax.data import align

HAMER_FOCAL_LENGTH = 5000.0  # HaMeR's EXTRA.FOCAL_LENGTH for its 256-px crop
FIT_ITERATIONS = 10


def hamer_full_focal(width: int, height: int, image_size: int = 256,
                     focal_length: float = HAMER_FOCAL_LENGTH) -> float:
  """HaMeR's demo focal for a full image: 5000 / 256 * max(W, H) (`scaled_focal_length`)."""
  return focal_length / image_size * max(width, height)


def readers_focal(fx: float, width: int, height: int) -> float:
  """The EgoDorsal readers' focal for a trial with K[0,0] = fx (align.hamer_focal)."""
  return align.hamer_focal(np.array([[fx]]), width, height)


def mirror_x(points: np.ndarray, is_right: bool) -> np.ndarray:
  """Right-hand points of HaMeR's (mirrored) crop -> the hand as seen: x negated for a left hand."""
  points = np.array(points, np.float64)
  if not is_right:
    points[..., 0] = -points[..., 0]
  return points


def cam_crop_to_full(pred_cam: np.ndarray, center: np.ndarray, size: float, width: int,
                     height: int, focal: float, is_right: bool) -> np.ndarray:
  """demo.py + renderer.cam_crop_to_full: (s, tx, ty) of the crop -> full-image translation (3,)
  for focal `focal` and principal point at the image centre (tx mirrored for a left hand)."""
  s, tx, ty = (float(v) for v in np.asarray(pred_cam, np.float64).reshape(3))
  tx = tx if is_right else -tx
  bs = float(size) * s + 1e-9
  cx, cy = (float(v) for v in np.asarray(center, np.float64).reshape(2))
  return np.array([2 * (cx - width / 2.0) / bs + tx, 2 * (cy - height / 2.0) / bs + ty,
                   2 * focal / bs])


def crop_keypoints_to_full(keypoints_crop: np.ndarray, center: np.ndarray, size: float,
                           is_right: bool) -> np.ndarray:
  """HaMeR's 2D keypoints (N, 2) in crop units ([-0.5, 0.5] across the crop) -> full-image
  pixels. The crop maps the box centre to pixel S/2 at S/size pixels per image pixel, so image
  = centre + size * crop; a left hand's crop was mirrored, so its x is mirrored back."""
  k = np.asarray(keypoints_crop, np.float64)
  sign = 1.0 if is_right else -1.0
  c = np.asarray(center, np.float64).reshape(2)
  return np.stack([c[0] + sign * float(size) * k[:, 0], c[1] + float(size) * k[:, 1]], -1)


def fit_translation(points: np.ndarray, pixels: np.ndarray, focal: float, width: int,
                    height: int, initial: np.ndarray) -> np.ndarray:
  """The translation t minimising sum |project(points + t) - pixels|^2 for a pinhole of focal
  `focal` centred in the image (Gauss-Newton from `initial`; kept only while it improves)."""
  p = np.asarray(points, np.float64)
  target = np.asarray(pixels, np.float64) - (width / 2.0, height / 2.0)
  t = np.asarray(initial, np.float64).copy()

  def residual(t):
    q = p + t
    return (focal * q[:, :2] / q[:, 2:3] - target).reshape(-1), q

  r, q = residual(t)
  cost = float(r @ r)
  for _ in range(FIT_ITERATIONS):
    if not np.isfinite(cost) or np.any(q[:, 2] <= 0):
      break
    z = q[:, 2]
    jac = np.zeros((len(p), 2, 3))
    jac[:, 0, 0] = focal / z
    jac[:, 1, 1] = focal / z
    jac[:, :, 2] = -focal * q[:, :2] / (z * z)[:, None]
    jac = jac.reshape(-1, 3)
    try:
      step = np.linalg.solve(jac.T @ jac, -jac.T @ r)
    except np.linalg.LinAlgError:
      break
    r_new, q_new = residual(t + step)
    cost_new = float(r_new @ r_new)
    if not cost_new < cost:
      break
    t, r, q, cost = t + step, r_new, q_new, cost_new
  return t


def project(points: np.ndarray, cam_t: np.ndarray, focal: float, width: int, height: int
            ) -> np.ndarray:
  """The readers' projection (align.project_hamer): (N, 3) + cam_t -> (N, 2) pixels."""
  return align.project_hamer(points, cam_t, focal, width, height)
