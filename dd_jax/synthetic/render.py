"""A z-buffered triangle rasteriser in numpy: visible triangle and barycentrics per pixel.

Used by the synthetic EgoDorsal generator (textured hands) and by dd_jax.viz (shaded mesh
overlays). Pixel centres are at integer coordinates, as in OpenCV's K.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
