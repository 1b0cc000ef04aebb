"""The cameras a HaMeR prior can be read with (docs/hamer.md "Camera conventions").

HaMeR predicts a weak-perspective camera (s, tx, ty) for its 256-px crop. Two full-image
translations follow from it:
- `cam_t`, the EgoDorsal readers' convention (dd_jax.data.align: focal K[0,0]/256*max(w,h),
  principal point at the image centre): the translation that makes that camera project
  keypoints_3d onto HaMeR's own 2D keypoints (least squares in pixels, Gauss-Newton started from
  cam_crop_to_full with that focal). `keypoints_2d` is then that projection.
- `cam_t_full`, HaMeR's demo convention: cam_crop_to_full with focal 5000/256*max(w,h) and the
  left hand's tx mirrored, for vertices with x negated on left hands (as demo.py draws them).
Float64 numpy over a batch of hands (leading axis B).
"""

from __future__ import annotations

import numpy as np

from dd_jax.data import align

HAMER_FOCAL_LENGTH = 5000.0  # HaMeR's EXTRA.FOCAL_LENGTH for its 256-px crop
FIT_ITERATIONS = 10


def hamer_full_focal(width: np.ndarray, height: np.ndarray, image_size: int = 256,
                     focal_length: float = HAMER_FOCAL_LENGTH) -> np.ndarray:
  """HaMeR's demo focal for full images: 5000 / 256 * max(W, H) (`scaled_focal_length`)."""
  return focal_length / image_size * np.maximum(width, height).astype(np.float64)


def readers_focal(fx: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
  """The EgoDorsal readers' focal for cameras with K[0,0] = fx (align.hamer_focal)."""
  return (np.asarray(fx, np.float64) / align.HAMER_IMAGE_SIZE
          * np.maximum(width, height).astype(np.float64))


def mirror_x(points: np.ndarray, is_right: np.ndarray) -> np.ndarray:
  """Right-hand points (B, N, 3) of HaMeR's (mirrored) crops -> the hands as seen: x negated
  where is_right (B,) is False."""
  points = np.array(points, np.float64)
  points[..., 0] *= np.where(np.asarray(is_right, bool), 1.0, -1.0)[:, None]
  return points


def cam_crop_to_full(pred_cam: np.ndarray, center: np.ndarray, size: np.ndarray,
                     width: np.ndarray, height: np.ndarray, focal: np.ndarray,
                     is_right: np.ndarray) -> np.ndarray:
  """demo.py + renderer.cam_crop_to_full: crop cameras (B, 3) as (s, tx, ty), box centres
  (B, 2), box sides, image sizes, focals, hand sides (B,) -> full-image translations (B, 3) for
  a pinhole of that focal centred in the image (tx mirrored for left hands)."""
  cam = np.asarray(pred_cam, np.float64)
  c = np.asarray(center, np.float64)
  tx = cam[:, 1] * np.where(np.asarray(is_right, bool), 1.0, -1.0)
  bs = np.asarray(size, np.float64) * cam[:, 0] + 1e-9
  return np.stack([2 * (c[:, 0] - np.asarray(width) / 2.0) / bs + tx,
                   2 * (c[:, 1] - np.asarray(height) / 2.0) / bs + cam[:, 2],
                   2 * np.asarray(focal, np.float64) / bs], -1)


def crop_keypoints_to_full(keypoints_crop: np.ndarray, center: np.ndarray, size: np.ndarray,
                           is_right: np.ndarray) -> np.ndarray:
  """HaMeR's 2D keypoints (B, N, 2) in crop units ([-0.5, 0.5] across the crop) -> full-image
  pixels. The crop maps the box centre to pixel S/2 at S/size pixels per image pixel, so image
  = centre + size * crop; a left hand's crop was mirrored, so its x is mirrored back."""
  k = np.asarray(keypoints_crop, np.float64)
  size = np.asarray(size, np.float64)[:, None]
  sign = np.where(np.asarray(is_right, bool), 1.0, -1.0)[:, None]
  c = np.asarray(center, np.float64)
  return np.stack([c[:, :1] + sign * size * k[..., 0], c[:, 1:] + size * k[..., 1]], -1)


def project(points: np.ndarray, cam_t: np.ndarray, focal: np.ndarray, width: np.ndarray,
            height: np.ndarray) -> np.ndarray:
  """The readers' projection (align.project_hamer) of each hand: (B, N, 3) + cam_t (B, 3) ->
  (B, N, 2) pixels, focal (B,), principal point at each image's centre."""
  p = np.asarray(points, np.float64) + np.asarray(cam_t, np.float64)[:, None]
  centre = np.stack([np.asarray(width) / 2.0, np.asarray(height) / 2.0], -1)[:, None]
  return np.asarray(focal, np.float64)[:, None, None] * p[..., :2] / p[..., 2:3] + centre


def fit_translation(points: np.ndarray, pixels: np.ndarray, focal: np.ndarray,
                    width: np.ndarray, height: np.ndarray, initial: np.ndarray) -> np.ndarray:
  """Per hand, the translation t minimising sum |project(points + t) - pixels|^2 (points
  (B, N, 3), pixels (B, N, 2), focal and image size (B,)): Gauss-Newton from `initial` (B, 3),
  each hand's step kept only while it lowers that hand's cost. Hands are independent: a hand's
  result does not depend on the others in the batch."""
  p = np.asarray(points, np.float64)
  focal = np.asarray(focal, np.float64)[:, None]
  target = np.asarray(pixels, np.float64) - np.stack(
      [np.asarray(width) / 2.0, np.asarray(height) / 2.0], -1)[:, None]
  t = np.array(initial, np.float64)

  def residual(t):
    q = p + t[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
      r = focal[..., None] * q[..., :2] / q[..., 2:3] - target
    return r, q, np.sum(r * r, axis=(1, 2))

  r, q, cost = residual(t)
  active = np.isfinite(cost) & np.all(q[..., 2] > 0, axis=1)
  for _ in range(FIT_ITERATIONS):
    if not active.any():
      break
    z = np.where(q[..., 2] > 0, q[..., 2], 1.0)
    jac = np.zeros(p.shape[:2] + (2, 3))
    jac[..., 0, 0] = jac[..., 1, 1] = focal / z
    jac[..., :, 2] = -focal[..., None] * q[..., :2] / (z * z)[..., None]
    jac = jac.reshape(len(p), -1, 3)
    normal = np.einsum("bki,bkj->bij", jac, jac)
    gradient = np.einsum("bki,bk->bi", jac, np.nan_to_num(r.reshape(len(p), -1)))
    solvable = active & (np.abs(np.linalg.det(normal)) > 1e-300)
    normal[~solvable] = np.eye(3)
    step = -np.linalg.solve(normal, gradient[..., None])[..., 0]
    r_new, q_new, cost_new = residual(t + step)
    better = solvable & (cost_new < cost) & np.all(q_new[..., 2] > 0, axis=1)
    t[better] += step[better]
    r[better], q[better], cost[better] = r_new[better], q_new[better], cost_new[better]
    active = better
  return t
