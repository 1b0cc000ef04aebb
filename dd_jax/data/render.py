"""A z-buffered triangle rasteriser in numpy/OpenCV, and keypoint overlays.

Used by the synthetic EgoDorsal generator (textured hands) and by training / inference pictures
(mesh and keypoint overlays). Pixel centres are at integer coordinates, as in OpenCV's K.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# OpenPose hand skeleton: (parent, child) bones, and one colour per finger (RGB).
HAND_BONES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
              (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
              (18, 19), (19, 20))
FINGER_COLORS = ((230, 60, 60), (240, 160, 40), (60, 190, 70), (50, 130, 230), (170, 80, 220))


@dataclasses.dataclass(frozen=True)
class Raster:
  """Per-pixel visible triangle: face (H, W) int32 (-1 = background), perspective-correct
  barycentric weights (H, W, 3) float32, depth (H, W) float32 (inf = background)."""
  face: np.ndarray
  bary: np.ndarray
  depth: np.ndarray

  @property
  def mask(self) -> np.ndarray:
    return self.face >= 0


def project(points: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Camera-frame points (N, 3) -> pixels (N, 2) and depth (N,) with a pinhole K."""
  points = np.asarray(points, np.float64)
  z = points[:, 2]
  uv = points @ np.asarray(K, np.float64).T
  return uv[:, :2] / uv[:, 2:3], z


def rasterize(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray,
              image_size: tuple[int, int], near: float = 1e-3) -> Raster:
  """Z-buffer rasterisation of camera-frame `vertices` (V, 3), `faces` (F, 3).

  image_size is (width, height). Triangles with a vertex closer than `near` are dropped. The
  work is vectorised over all (triangle, covered pixel of its bounding box) pairs.
  """
  width, height = image_size
  faces = np.asarray(faces, np.int64)
  uv, z = project(vertices, K)
  tri_uv, tri_z = uv[faces], z[faces]  # (F, 3, 2), (F, 3)
  keep = np.all(tri_z > near, axis=1)
  x0 = np.clip(np.ceil(tri_uv[..., 0].min(1)), 0, width).astype(np.int64)
  x1 = np.clip(np.floor(tri_uv[..., 0].max(1)) + 1, 0, width).astype(np.int64)
  y0 = np.clip(np.ceil(tri_uv[..., 1].min(1)), 0, height).astype(np.int64)
  y1 = np.clip(np.floor(tri_uv[..., 1].max(1)) + 1, 0, height).astype(np.int64)
  a, b, c = tri_uv[:, 0], tri_uv[:, 1], tri_uv[:, 2]
  area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
  keep &= (np.abs(area) > 1e-12) & (x1 > x0) & (y1 > y0)
  ids = np.flatnonzero(keep)
  face = np.full((height, width), -1, np.int32)
  bary = np.zeros((height, width, 3), np.float32)
  depth = np.full((height, width), np.inf, np.float32)
  if ids.size == 0:
    return Raster(face, bary, depth)

  w = (x1 - x0)[ids]
  counts = w * (y1 - y0)[ids]
  owner = np.repeat(ids, counts)
  local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  w_rep = np.repeat(w, counts)
  px = x0[owner] + local % w_rep
  py = y0[owner] + local // w_rep
  ax, ay = a[owner, 0], a[owner, 1]
  bx, by = b[owner, 0], b[owner, 1]
  cx, cy = c[owner, 0], c[owner, 1]
  inv_area = 1.0 / area[owner]
  l0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) * inv_area
  l1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) * inv_area
  l2 = 1.0 - l0 - l1
  inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
  owner, px, py = owner[inside], px[inside], py[inside]
  lam = np.stack([l0[inside], l1[inside], l2[inside]], 1)
  # Perspective-correct: interpolate 1/z linearly in screen space.
  lam_over_z = lam / tri_z[owner]
  inv_depth = lam_over_z.sum(1)
  pixel = py * width + px
  order = np.lexsort((-inv_depth, pixel))  # per pixel, the nearest first
  pixel, order = pixel[order], order
  first = np.ones(pixel.size, bool)
  first[1:] = pixel[1:] != pixel[:-1]
  win = order[first]
  flat = pixel[first]
  face.reshape(-1)[flat] = owner[win]
  bary.reshape(-1, 3)[flat] = lam_over_z[win] / inv_depth[win, None]
  depth.reshape(-1)[flat] = 1.0 / inv_depth[win]
  return Raster(face, bary, depth)


def interpolate(raster: Raster, faces: np.ndarray, attributes: np.ndarray) -> np.ndarray:
  """Per-vertex attributes (V, C) -> per-pixel (H, W, C) float32 (zeros on the background)."""
  attributes = np.asarray(attributes, np.float32)
  out = np.zeros(raster.face.shape + attributes.shape[1:], np.float32)
  mask = raster.mask
  tri = np.asarray(faces)[raster.face[mask]]  # (P, 3)
  out[mask] = np.einsum("pk,pkc->pc", raster.bary[mask], attributes[tri])
  return out


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
  """Area-weighted unit vertex normals (V, 3) (right-handed winding)."""
  v = np.asarray(vertices, np.float64)
  f = np.asarray(faces)
  n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
  normals = np.zeros_like(v)
  for k in range(3):
    np.add.at(normals, f[:, k], n)
  return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


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


draw_keypoints = draw_hand_keypoints  # the name used in interfaces.md
