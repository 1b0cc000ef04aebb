"""Pictures researchers look at: pose panels (image, base, hands drawn over the image) and
confusion matrices, as uint8 RGB arrays for PNG files and TensorBoard."""

from __future__ import annotations

import cv2
import numpy as np

from dd_jax.data import transforms
from dd_jax.viz import draw

PANEL_SIZE = 256
GT_COLOR, PRIOR_COLOR, PRED_COLOR = (60, 120, 255), (255, 80, 60), (40, 220, 90)


def fit_affine_camera(points_3d: np.ndarray, points_2d: np.ndarray) -> np.ndarray:
  """Least-squares (2, 4) affine camera taking (21, 3) keypoints to their (21, 2) pixels."""
  homogeneous = np.concatenate([points_3d, np.ones((len(points_3d), 1))], 1)
  solution, *_ = np.linalg.lstsq(homogeneous, points_2d, rcond=None)
  return solution.T


def _canonical_view(points: np.ndarray, size: int, reference: np.ndarray) -> np.ndarray:
  """Root-relative x/y of (21, 3) keypoints scaled into a size x size panel (no camera known)."""
  rel = points[:, :2] - reference[:1, :2]
  extent = np.abs(reference[:, :2] - reference[:1, :2]).max() + 1e-6
  return size / 2 + rel / extent * (0.42 * size) * np.array([1.0, -1.0])


def pose_panel(img: np.ndarray, base: np.ndarray, pred_kp: np.ndarray, gt_kp: np.ndarray,
               prior_kp: np.ndarray, prior_kp2d: np.ndarray | None = None) -> np.ndarray:
  """[image | base | image with ground truth (blue), prior (red), prediction (green)].

  The networks predict finger poses only, so the three hands share one camera: an affine camera
  fitted from the prior's keypoints to the prior's 2D keypoints in this image (network-input
  pixels; HaMeR's keypoints_2d placed on the crop) puts the prior exactly where HaMeR saw the
  hand and the others where they differ from it. Without 2D keypoints (NaN) the hands are
  drawn in a canonical front view on the image.
  """
  size = PANEL_SIZE
  scale = size / img.shape[0]
  picture = lambda x: cv2.resize(transforms.denormalise(x), (size, size),
                                 interpolation=cv2.INTER_LINEAR)
  image, base_image = picture(img), picture(base)
  overlay = image.copy()
  if prior_kp2d is not None and np.all(np.isfinite(prior_kp2d)):
    camera = fit_affine_camera(np.asarray(prior_kp, np.float64),
                               (np.asarray(prior_kp2d, np.float64) + 0.5) * scale - 0.5)
    project = lambda k: np.concatenate([k, np.ones((len(k), 1))], 1) @ camera.T
  else:
    project = lambda k: _canonical_view(k, size, gt_kp)
  for kp, color in ((gt_kp, GT_COLOR), (prior_kp, PRIOR_COLOR), (pred_kp, PRED_COLOR)):
    overlay = draw.draw_hand_keypoints(overlay, project(np.asarray(kp, np.float64)), color)
  return np.concatenate([image, base_image, overlay], axis=1)


def confusion_matrix(matrix: np.ndarray, labels: list[str] | None = None) -> np.ndarray:
  """(K, K) counts [true, predicted] -> a heat-map picture with counts and row-normalised shading."""
  matrix = np.asarray(matrix, np.int64)
  k = matrix.shape[0]
  labels = labels or [str(i) for i in range(k)]
  cell, margin = 56, 70
  size = margin + cell * k + 10
  picture = np.full((size, size, 3), 255, np.uint8)
  rows = matrix.sum(1, keepdims=True)
  share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
  font = cv2.FONT_HERSHEY_SIMPLEX
  for i in range(k):
    for j in range(k):
      y0, x0 = margin + i * cell, margin + j * cell
      shade = int(255 * (1 - share[i, j]))
      picture[y0:y0 + cell, x0:x0 + cell] = (shade, shade, 255)
      cv2.rectangle(picture, (x0, y0), (x0 + cell, y0 + cell), (180, 180, 180), 1)
      text_color = (255, 255, 255) if share[i, j] > 0.5 else (0, 0, 0)
      cv2.putText(picture, str(matrix[i, j]), (x0 + 6, y0 + cell // 2 + 5), font, 0.45,
                  text_color, 1, cv2.LINE_AA)
    cv2.putText(picture, labels[i], (margin - 22, margin + i * cell + cell // 2 + 5), font, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(picture, labels[i], (margin + i * cell + cell // 2 - 5, margin - 10), font, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA)
  cv2.putText(picture, "true \\ predicted", (5, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
  return picture
