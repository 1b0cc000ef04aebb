"""Drawing on pictures: a Lambert-shaded mesh and the 21-keypoint hand skeleton, uint8 RGB.

What training pictures (dd_jax.viz.pictures) and inference overlays (dd_jax.viz.overlays) draw
with. Pixel centres are at integer coordinates, as in OpenCV's K.
"""

from __future__ import annotations

import cv2
import numpy as np

from dd_jax.synthetic.render import interpolate, rasterize, vertex_normals

# OpenPose hand skeleton: (parent, child) bones, and one colour per finger (RGB).
HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
              (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
              (18, 19), (19, 20))
FINGER_COLORS = ((230, 60, 60), (240, 160, 40), (60, 190, 70), (50, 130, 230), (170, 80, 220))


def render_mesh(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray,
                image_size: tuple[int, int], *, background: np.ndarray | None = None,
                color=(170, 190, 230), alpha: float = 1.0, light_dir=(0.3, 0.4, 1.0),
                ambient: float = 0.35) -> np.ndarray:
  """Lambert-shaded mesh over `background` (H, W, 3) uint8 RGB (black if None) -> uint8 RGB.

  vertices (V, 3) are in the camera frame (metres, +z forward); image_size is (width, height).
  light_dir is the direction the light travels (from the light into the scene, camera frame):
  the default comes from above-left of the camera. alpha < 1 blends the mesh over the background.
  """
  width, height = image_size
  raster = rasterize(vertices, faces, K, image_size)
  normals = interpolate(raster, faces, vertex_normals(vertices, faces))
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
  light = np.asarray(light_dir, np.float32)
  light /= np.linalg.norm(light)
  # Two-sided lighting: a normal facing away from the camera is flipped.
  normals *= np.where(normals[..., 2:3] > 0, -1.0, 1.0)
  shade = ambient + (1 - ambient) * np.clip(normals @ -light, 0.0, 1.0)
  mesh = shade[..., None] * np.asarray(color, np.float32)
  out = (np.zeros((height, width, 3), np.float32) if background is None
         else np.asarray(background, np.float32).copy())
  mask = raster.mask
  out[mask] = alpha * mesh[mask] + (1 - alpha) * out[mask]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_hand_keypoints(image: np.ndarray, keypoints_2d: np.ndarray, color=None, *,
                        radius: int = 2, thickness: int = 1) -> np.ndarray:
  """Draws 21 OpenPose hand keypoints (21, 2) and their bones on a copy of `image` (uint8 RGB).

  color None draws each finger in its own colour; otherwise one RGB colour for everything.
  """
  out = np.ascontiguousarray(np.array(image, np.uint8, copy=True))
  points = np.asarray(keypoints_2d, np.float64)
  if points.shape != (21, 2):
    raise ValueError(f"keypoints_2d should have shape (21, 2), got {points.shape}")
  finite = np.all(np.isfinite(points), axis=1)
  shift = 4  # sub-pixel drawing
  pts = np.rint(np.where(finite[:, None], points, 0) * (1 << shift)).astype(np.int64)
  for bone, (i, j) in enumerate(HAND_BONES):
    if finite[i] and finite[j]:
      c = tuple(int(v) for v in (color or FINGER_COLORS[bone // 4]))
      cv2.line(out, tuple(pts[i]), tuple(pts[j]), c, thickness, cv2.LINE_AA, shift)
  for k in range(21):
    if finite[k]:
      c = tuple(int(v) for v in (color or FINGER_COLORS[max(k - 1, 0) // 4]))
      cv2.circle(out, tuple(pts[k]), radius << shift, c, -1, cv2.LINE_AA, shift)
  return out
