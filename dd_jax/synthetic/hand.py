"""A synthetic right hand in MANO's format, for tests and the demo (the real model is licence-gated).

Same structure as MANO_RIGHT.pkl: 778 vertices, 1538 triangles forming one consistently oriented
surface open only at the wrist (a 16-edge hole, as MANO), MANO's 16-joint tree and joint order,
smooth skinning weights, a sparse convex joint regressor, 10 shape directions, pose correctives
and an orthonormal pose PCA. Nothing here is derived from MANO's data; it is built from tubes.

Frame (as MANO's template): metres, fingers point along -x, the thumb is on +z, the back of the
hand (dorsum) faces +y and the palm -y; the wrist joint is near (0.10, 0.003, 0) and the middle
finger's knuckle near the origin. Wrist to middle fingertip is about 18.4 cm.
Fingertip apex vertices sit at DeltaDorsal's tip ids (743, 333, 443, 554, 671), and smplx's ids
(744, 320) are fingertip-pad vertices 6-7 mm from the thumb and index tips.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax.mano import io as mano_io
from dd_jax.mano import model as mano_model

# ---------------------------------------------------------------- design (anatomical frame)
# Coordinates (u, w, n): u from wrist to fingers, w toward the thumb (radial), n out of the back of
# the hand; right-handed (u x w = n). MANO axes: x = X_OFFSET - u, y = n, z = w (a rotation).
SCALE = 1.05
X_OFFSET = 0.100

# Joint targets (u, w, n) in metres before SCALE: knuckle (MCP), PIP, DIP, tip per finger.
# Ring counts: (lead-in to the knuckle, proximal, middle, distal bone); the thumb's lead-in leaves
# its base loop along the loop's normal.
_FINGERS = {  # name: (joints, (half-width, half-thickness) at base and tip, ring counts)
    "index": ([(0.088, 0.027, 0.002), (0.121, 0.029, 0.004), (0.143, 0.029, 0.004),
               (0.166, 0.031, 0.003)], (0.0095, 0.0085, 0.0078, 0.0068), (1, 3, 3, 3)),
    "middle": ([(0.095, 0.003, 0.004), (0.126, -0.003, 0.006), (0.149, -0.007, 0.005),
                (0.175, -0.011, 0.004)], (0.0097, 0.0088, 0.0080, 0.0070), (1, 3, 3, 4)),
    "ring": ([(0.082, -0.020, 0.002), (0.110, -0.026, 0.004), (0.134, -0.032, 0.003),
              (0.157, -0.038, 0.002)], (0.0090, 0.0082, 0.0074, 0.0066), (1, 3, 3, 3)),
    "pinky": ([(0.069, -0.039, -0.003), (0.087, -0.050, -0.003), (0.102, -0.058, -0.004),
               (0.119, -0.066, -0.004)], (0.0078, 0.0072, 0.0064, 0.0058), (1, 3, 2, 3)),
}
_THUMB = ([(0.024, 0.032, -0.009), (0.046, 0.057, -0.010), (0.068, 0.071, -0.015),
           (0.095, 0.090, -0.018)], (0.0110, 0.0095, 0.0088, 0.0076), (1, 2, 3, 3))
_WRIST_TARGET = (0.0, -0.002, 0.002)
_FINGER_LEAD = 0.008  # finger tubes start this far before the knuckle joint (webbing level)
_THUMB_LEAD = 0.35  # fraction of the base-to-thumb-knuckle distance spent along the loop normal

# The palm is a tube of 7 rings of 34 vertices (a 15 x 2 quad grid around its cross-section,
# columns from the radial to the ulnar side); ring 7 is made of the four finger base rings, each
# the boundary of a 3 x 2 patch of the knuckle face. The thumb grows from a 3 x 2 patch on the
# palmar-radial corner of rings 2-4. Two rings of 25 and 16 vertices close the palm at the wrist.
_PALM_T = (0.0, 0.13, 0.28, 0.44, 0.61, 0.80, 1.0)  # ring positions from wrist end to knuckles
_PALM_START_U, _PALM_HALF_WIDTH, _PALM_HALF_THICKNESS = 0.010, 0.031, 0.0165
_PALM_CENTER = (-0.004, 0.002)  # (w, n)
_WRIST_RINGS = ((0.0, 25, 0.0295, 0.0180), (-0.012, 16, 0.0275, 0.0175))  # (u, size, a, b)
_FINGER_COLUMNS = {"index": 0, "middle": 4, "ring": 8, "pinky": 12}
_THUMB_RINGS = (2, 4)  # thumb patch: palm rings 2..4 ...
_THUMB_PERIMETER = (30, 33)  # ... perimeter vertices 30..33 (palmar face near the radial edge)
_RING_SIZE, _PERIMETER = 10, 34

# MANO joint ids per finger (knuckle, middle, distal) and OpenPose tip order.
_JOINT_IDS = {"index": (1, 2, 3), "middle": (4, 5, 6), "pinky": (7, 8, 9), "ring": (10, 11, 12),
              "thumb": (13, 14, 15)}
_TIP_ORDER = ("thumb", "index", "middle", "ring", "pinky")
_PAD_IDS = {"thumb": 744, "index": 320}  # smplx ids not shared with DeltaDorsal's


def _to_mano_axes(p: np.ndarray) -> np.ndarray:
  """(..., 3) anatomical (u, w, n) -> MANO axes (x, y, z) = (X_OFFSET - u, n, w)."""
  return np.stack([X_OFFSET - p[..., 0], p[..., 2], p[..., 1]], -1)


def _dir_to_mano_axes(d: np.ndarray) -> np.ndarray:
  return np.stack([-d[..., 0], d[..., 2], d[..., 1]], -1)


def _normalize(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Chain:
  """A finger's centre line through its joints: points, tangents and frames by arc length."""

  def __init__(self, points: np.ndarray):
    self.points = points
    seg = np.diff(points, axis=0)
    self.lengths = np.linalg.norm(seg, axis=1)
    self.cum = np.concatenate([[0.0], np.cumsum(self.lengths)])
    dirs = seg / self.lengths[:, None]
    self.joint_dirs = np.concatenate([dirs[:1], _normalize(dirs[:-1] + dirs[1:]), dirs[-1:]])

  def at(self, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre, tangent and the frame (e1 radial-ish, e2 dorsal-ish) at arc length s."""
    k = int(np.clip(np.searchsorted(self.cum, s, side="right") - 1, 0, len(self.lengths) - 1))
    phi = (s - self.cum[k]) / self.lengths[k]
    center = self.points[k] + phi * (self.points[k + 1] - self.points[k])
    tangent = _normalize((1 - phi) * self.joint_dirs[k] + phi * self.joint_dirs[k + 1])
    dorsal = np.array([0.0, 0.0, 1.0])
    e2 = _normalize(dorsal - dorsal.dot(tangent) * tangent)
    return center, tangent, np.cross(e2, tangent), e2


def _ring_arclengths(chain: _Chain, counts: Sequence[int], tip_radius: float) -> list[float]:
  """Ring positions: evenly per segment with one ring exactly at each inner chain point, then a
  rounded tip (the last segment's final rings at 1.1 and 0.45 tip radii before the apex)."""
  c = chain.cum
  out = []
  for k, count in enumerate(counts[:-1]):
    out += [c[k] + (c[k + 1] - c[k]) * (i + 1) / count for i in range(count)]
  last_even = c[-1] - 1.1 * tip_radius
  out += [c[-2] + (last_even - c[-2]) * (i + 1) / (counts[-1] - 1) for i in range(counts[-1] - 1)]
  return out + [c[-1] - 0.45 * tip_radius]


class _MeshBuilder:
  """Vertices with per-vertex bookkeeping, triangles, and boundary-loop utilities."""

  def __init__(self):
    self.positions: list[np.ndarray] = []
    self.part: list[str] = []  # 'palm' or a finger name
    self.arclength: list[float] = []  # along the finger's chain (palm: -1)
    self.angle: list[float] = []  # around a finger ring
    self.keys: dict[Any, int] = {}
    self.faces: list[tuple[int, int, int]] = []

  def add(self, position, part="palm", arclength=-1.0, angle=0.0, key=None) -> int:
    index = len(self.positions)
    self.positions.append(np.asarray(position, dtype=np.float64))
    self.part.append(part)
    self.arclength.append(float(arclength))
    self.angle.append(float(angle))
    if key is not None:
      self.keys[key] = index
    return index

  def quad(self, a, b, c, d):
    self.faces += [(a, b, c), (a, c, d)]

  def boundary_loops(self) -> list[list[int]]:
    """Loops of boundary vertices, each in the direction its faces' edges run."""
    directed = {(f[i], f[(i + 1) % 3]) for f in self.faces for i in range(3)}
    following = {a: b for a, b in directed if (b, a) not in directed}
    loops, seen = [], set()
    for start in following:
      if start in seen:
        continue
      loop, v = [], start
      while v not in seen:
        seen.add(v)
        loop.append(v)
        v = following[v]
      loops.append(loop)
    return loops

  def zip_rings(self, ring_a: Sequence[int], ring_b: Sequence[int], center: np.ndarray):
    """Triangulates the band between boundary loop ring_a and new ring_b (same turning sense)."""
    def angles(ring):  # around the palm axis in the (w, n) plane
      p = np.array([self.positions[i] for i in ring])
      return np.arctan2(p[:, 2] - center[1], p[:, 1] - center[0])
    ta, tb = angles(ring_a), angles(ring_b)
    ta = ta[0] + np.unwrap(ta - ta[0])
    start = int(np.argmin(np.abs(np.angle(np.exp(1j * (tb - ta[0]))))))
    ring_b = list(ring_b[start:]) + list(ring_b[:start])
    tb = np.roll(tb, -start)
    tb = ta[0] + np.angle(np.exp(1j * (tb[0] - ta[0]))) + np.unwrap(tb - tb[0])
    n, m = len(ring_a), len(ring_b)
    sign = np.sign(ta[-1] - ta[0])
    ta, tb = sign * ta, sign * tb
    ta_next = np.append(ta[1:], ta[0] + 2 * np.pi)
    tb_next = np.append(tb[1:], tb[0] + 2 * np.pi)
    i = j = 0
    while i < n or j < m:
      if j == m or (i < n and ta_next[i] <= tb_next[j]):
        self.faces.append((ring_a[(i + 1) % n], ring_a[i], ring_b[j % m]))
        i += 1
      else:
        self.faces.append((ring_a[i % n], ring_b[j], ring_b[(j + 1) % m]))
        j += 1

  def extend_tube(self, loop: Sequence[int], rings: Sequence[Sequence[int]], apex: int):
    """Stitches loop -> rings[0] -> ... (vertex k of each ring follows vertex k) -> apex fan."""
    previous = list(loop)
    for ring in rings:
      for k in range(len(previous)):
        k1 = (k + 1) % len(previous)
        self.quad(previous[k1], previous[k], ring[k], ring[k1])
      previous = list(ring)
    for k in range(len(previous)):
      self.faces.append((previous[(k + 1) % len(previous)], previous[k], apex))


def _perimeter_cell(p: int) -> tuple[int, int]:
  """Palm perimeter index (0..33, counter-clockwise seen from the fingers) -> grid (column, row)."""
  if p <= 15:
    return p, 0
  if p == 16:
    return 15, 1
  if p <= 32:
    return 32 - p, 2
  return 0, 1


def _finger_base_angles(c0: int) -> dict[tuple[int, int], float]:
  """Grid cells of a finger's 3 x 2 patch boundary -> angle around the finger (0 = radial side)."""
  cells = [(c0, 1)] + [(c0 + i, 0) for i in range(4)] + [(c0 + 3, 1)]
  cells += [(c0 + 3 - i, 2) for i in range(4)]
  return {cell: 2 * np.pi * k / _RING_SIZE for k, cell in enumerate(cells)}


def _ring_point(center, e1, e2, half_width, half_thickness, angle):
  return center + half_width * np.cos(angle) * e1 + half_thickness * np.sin(angle) * e2


def _build_mesh() -> tuple[_MeshBuilder, dict[str, Any]]:
  mesh = _MeshBuilder()
  joints = {name: np.array(spec[0]) * SCALE for name, spec in _FINGERS.items()}
  joints["thumb"] = np.array(_THUMB[0]) * SCALE
  radii = {name: np.array(spec[1]) * SCALE for name, spec in _FINGERS.items()}
  radii["thumb"] = np.array(_THUMB[1]) * SCALE
  chains = {}
  for name in _FINGERS:  # base (webbing level), knuckle, PIP, DIP, tip
    pts = joints[name]
    lead = pts[0] - np.array([_FINGER_LEAD * SCALE, 0.0, 0.0])  # back along the palm axis
    chains[name] = _Chain(np.concatenate([lead[None], pts]))
  info: dict[str, Any] = {"joints": joints, "chains": chains, "apex": {}, "pad": {}, "rings": {}}
  wc, nc = (v * SCALE for v in _PALM_CENTER)

  # ---- knuckle ring (palm ring 7): the four finger base rings, each tilted along the arc of the
  # base centres so that neighbouring rings meet at similar heights (shallow webs).
  names = list(_FINGER_COLUMNS)
  centers = np.array([chains[name].points[0] for name in names])
  slopes = np.gradient(centers[:, 0], centers[:, 1])  # du / dw along the arc
  knuckle: dict[tuple[int, int], tuple[np.ndarray, str, float]] = {}
  for name, c0, slope in zip(names, _FINGER_COLUMNS.values(), slopes):
    center, _, e1, e2 = chains[name].at(0.0)
    a, b = radii[name][:2]
    for cell, angle in _finger_base_angles(c0).items():
      point = _ring_point(center, e1, e2, a, b, angle)
      point[0] += slope * (point[1] - center[1])
      knuckle[cell] = (point, name, angle)

  # ---- palm rings 1..7
  last = len(_PALM_T)
  thumb_interior = {(j, p) for j in range(_THUMB_RINGS[0] + 1, _THUMB_RINGS[1])
                    for p in range(_THUMB_PERIMETER[0] + 1, _THUMB_PERIMETER[1])}
  for j, t in enumerate(_PALM_T, start=1):
    tau = 1.0 - (1.0 - t) ** 2
    for p in range(_PERIMETER):
      if (j, p) in thumb_interior:
        continue
      c, r = _perimeter_cell(p)
      end, name, angle = knuckle[(c, r)]
      if j == last:
        mesh.add(end, part=name, arclength=0.0, angle=angle, key=("P", j, p))
        continue
      s = 0.92 * (1 - 2 * c / 15)
      if r == 1:
        start_w, start_n = wc + (1 if c == 0 else -1) * _PALM_HALF_WIDTH * SCALE, nc
      else:
        lift = _PALM_HALF_THICKNESS * SCALE * (1 - abs(s) ** 4) ** 0.25
        start_w, start_n = wc + _PALM_HALF_WIDTH * SCALE * s, nc + (lift if r == 0 else -lift)
      u = _PALM_START_U * SCALE + t * (end[0] - _PALM_START_U * SCALE)
      w = start_w + tau * (end[1] - start_w)
      n = start_n + tau * (end[2] - start_n)
      n += {0: 0.0035, 1: 0.0, 2: -0.006}[r] * SCALE * np.sin(np.pi * t) ** 0.8
      mesh.add((u, w, n), key=("P", j, p))
  for c in (3, 4, 7, 8, 11, 12):  # knuckle-face vertices between the finger patches
    end, name, angle = knuckle[(c, 1)]
    mesh.add(end, part=name, arclength=0.0, angle=angle, key=("C", c))

  def key_of(j, c, r):
    if r == 1 and 0 < c < 15:
      return mesh.keys[("C", c)]
    p = {0: c, 2: 32 - c}.get(r, 33 if c == 0 else 16)
    return mesh.keys[("P", j, p)]

  thumb_quads = {(j, p) for j in range(_THUMB_RINGS[0], _THUMB_RINGS[1])
                 for p in range(*_THUMB_PERIMETER)}
  for j in range(1, last):
    for p in range(_PERIMETER):
      if (j, p) in thumb_quads:
        continue
      q = (p + 1) % _PERIMETER
      mesh.quad(mesh.keys[("P", j, p)], mesh.keys[("P", j, q)], mesh.keys[("P", j + 1, q)],
                mesh.keys[("P", j + 1, p)])
  for g in (3, 7, 11):  # webbing between neighbouring finger base rings
    for r in (0, 1):
      mesh.quad(key_of(last, g, r), key_of(last, g + 1, r), key_of(last, g + 1, r + 1),
                key_of(last, g, r + 1))

  # ---- wrist: two rings zipped onto palm ring 1; the last one stays open (MANO's wrist hole)
  previous = [mesh.keys[("P", 1, p)] for p in range(_PERIMETER)]
  wrist_rings = []
  for u, size, a, b in _WRIST_RINGS:
    ring = []
    for k in range(size):
      angle = 2 * np.pi * (k + 0.5) / size
      ring.append(mesh.add((u * SCALE, wc + a * SCALE * np.cos(angle),
                            nc + b * SCALE * np.sin(angle))))
    mesh.zip_rings(previous, ring, np.array([wc, nc]))
    previous = ring
    wrist_rings.append(ring)
  info["wrist_rings"] = wrist_rings

  # ---- fingers and thumb: tubes grown from the holes' boundary loops
  loops = mesh.boundary_loops()
  loop_of = {}
  for loop in loops:
    names = {mesh.part[v] for v in loop}
    if mesh.keys[("P", _THUMB_RINGS[0], _THUMB_PERIMETER[0])] in loop:
      loop_of["thumb"] = loop
    elif len(names) == 1 and next(iter(names)) in _FINGERS:
      loop_of[next(iter(names))] = loop
  for name in ("index", "middle", "ring", "pinky", "thumb"):
    _grow_finger(mesh, name, loop_of[name], chains.get(name), radii[name], info)
  info["loops"] = loop_of
  _smooth_junctions(mesh, info)
  return mesh, info


def _smooth_junctions(mesh: _MeshBuilder, info: dict[str, Any], iterations: int = 12) -> None:
  """Taubin (non-shrinking) smoothing of the palm, the webs and the thumb's base, rounding the
  box-like joins of the tubes; finger tubes past the knuckle and the wrist hole stay fixed."""
  positions = np.array(mesh.positions)
  faces = np.array(mesh.faces)
  edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  edges = np.unique(np.sort(edges, axis=1), axis=0)
  degree = np.bincount(edges.ravel(), minlength=len(positions)).astype(np.float64)
  movable = np.zeros(len(positions), dtype=bool)
  for v, (part, s) in enumerate(zip(mesh.part, mesh.arclength)):
    if part == "palm":
      movable[v] = True
    elif part == "thumb":
      movable[v] = s < info["chains"]["thumb"].cum[2] - 1e-9
    else:
      movable[v] = s < info["chains"][part].cum[1] - 1e-9
  movable[info["wrist_rings"][-1]] = False
  for step in range(2 * iterations):
    total = np.zeros_like(positions)
    np.add.at(total, edges[:, 0], positions[edges[:, 1]])
    np.add.at(total, edges[:, 1], positions[edges[:, 0]])
    delta = total / degree[:, None] - positions
    factor = 0.5 if step % 2 == 0 else -0.53
    positions[movable] += factor * delta[movable]
  mesh.positions = list(positions)


def _grow_finger(mesh: _MeshBuilder, name: str, loop: list[int], chain: _Chain | None,
                 radii: np.ndarray, info: dict[str, Any]) -> None:
  """Adds a finger's rings and tip apex onto its base loop; records the rings and the apex."""
  counts = _THUMB[2] if name == "thumb" else _FINGERS[name][2]
  a0, b0, a1, b1 = radii
  loop_pos = np.array([mesh.positions[v] for v in loop])
  if name == "thumb":
    # The thumb leaves its large (thenar) base loop along the loop's outward normal, then runs
    # through the thumb knuckle, IP joint and tip; the loop's shape blends into an ellipse.
    base = loop_pos.mean(0)
    area = 0.5 * np.sum(np.cross(loop_pos, np.roll(loop_pos, -1, axis=0)), axis=0)
    normal = -_normalize(area)  # the loop runs clockwise seen from outside
    pts = info["joints"]["thumb"]
    lead = base + _THUMB_LEAD * np.linalg.norm(pts[1] - base) * normal
    chain = _Chain(np.stack([base, lead, pts[1], pts[2], pts[3]]))
    info["chains"]["thumb"] = chain
    center, _, e1, e2 = chain.at(0.0)
    rel = loop_pos - center
    base_angle = np.unwrap(np.arctan2(rel @ e2, rel @ e1))
    base_radius = np.hypot(rel @ e1, rel @ e2)
    turn = np.sign(base_angle[-1] - base_angle[0])
    uniform = base_angle[0] + turn * 2 * np.pi * np.arange(len(loop)) / len(loop)
    uniform += np.mean(base_angle - uniform)
  else:
    base_angle = np.array([mesh.angle[v] for v in loop])
  arclengths = _ring_arclengths(chain, counts, 0.5 * (a1 + b1))
  total = chain.cum[-1]
  rings = []
  for index, s in enumerate(arclengths):
    center, _, e1, e2 = chain.at(s)
    frac = max(0.0, s - chain.cum[1]) / (total - chain.cum[1])
    a, b = a0 + frac * (a1 - a0), b0 + frac * (b1 - b0)
    if index == len(arclengths) - 1:
      a, b = 0.75 * a, 0.75 * b  # rounded tip
    elif index == len(arclengths) - 2:
      a, b = 0.97 * a, 0.97 * b
    if name == "thumb":
      beta = min(1.0, s / chain.cum[2]) ** 0.7
      angles = (1 - beta) * base_angle + beta * uniform
      radius = np.hypot(a * np.cos(angles), b * np.sin(angles))
      radius = (1 - beta) * base_radius * 0.85 + beta * radius
      points = center + radius[:, None] * (np.cos(angles)[:, None] * e1
                                           + np.sin(angles)[:, None] * e2)
    else:
      angles = base_angle
      points = np.array([_ring_point(center, e1, e2, a, b, t) for t in angles])
    rings.append([mesh.add(pt, part=name, arclength=s, angle=t) for pt, t in zip(points, angles)])
  apex = mesh.add(chain.points[-1], part=name, arclength=total)
  mesh.extend_tube(loop, rings, apex)
  info["apex"][name] = apex
  info["rings"][name] = [list(loop)] + rings
  if name in _PAD_IDS:  # a pad vertex of the last ring (palmar side, angle ~ 3 pi / 2)
    last_angles = np.mod(np.array(angles), 2 * np.pi)
    info["pad"][name] = rings[-1][int(np.argmin(np.abs(last_angles - 1.5 * np.pi)))]


# ---------------------------------------------------------------- model arrays


def _vertex_order(mesh: _MeshBuilder, info: dict[str, Any]) -> np.ndarray:
  """new index -> construction index, putting tip apexes (and smplx pads) at the MANO tip ids."""
  fixed = dict(zip(mano_model.DELTADORSAL_TIP_IDS, (info["apex"][n] for n in _TIP_ORDER)))
  fixed.update({vid: info["pad"][name] for name, vid in _PAD_IDS.items()})
  order = np.full(len(mesh.positions), -1, dtype=np.int64)
  for new, old in fixed.items():
    order[new] = old
  rest = [v for v in range(len(mesh.positions)) if v not in set(fixed.values())]
  order[order < 0] = rest
  return order


def _convex_weights(points: np.ndarray, target: np.ndarray, reg: float = 1e-3,
                    steps: int = 3000) -> np.ndarray:
  """Weights on the simplex with points.T @ w ~ target (projected gradient, mild pull to uniform)."""
  x = (points - target) / 0.01  # centimetres: well-scaled
  k = len(points)
  w = np.full(k, 1.0 / k)
  lipschitz = 2 * (np.linalg.norm(x, 2) ** 2 + reg)
  for _ in range(steps):
    grad = 2 * x @ (x.T @ w) + 2 * reg * (w - 1.0 / k)
    w = _project_simplex(w - grad / lipschitz)
  return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1
  rho = np.nonzero(u * np.arange(1, len(v) + 1) > css)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _joint_regressor(mesh: _MeshBuilder, info: dict[str, Any]) -> np.ndarray:
  """(16, V) rows of convex weights: the ring around each finger joint (its centre is the joint),
  fitted weights for the wrist (wrist-side ring) and the thumb's base joint (nearby vertices)."""
  positions = np.array(mesh.positions)
  regressor = np.zeros((mano_model.NUM_JOINTS, len(positions)))
  for name, ids in _JOINT_IDS.items():
    counts = _THUMB[2] if name == "thumb" else _FINGERS[name][2]
    boundaries = np.cumsum(counts[:3])  # ring index at chain points 1, 2, 3
    rings = info["rings"][name]
    joint_rings = boundaries if name != "thumb" else [None, boundaries[1], boundaries[2]]
    for joint, ring_index in zip(ids, joint_rings):
      if ring_index is None:
        continue
      regressor[joint, rings[ring_index]] = 1.0 / len(rings[ring_index])
  wrist_ring = info["wrist_rings"][0]
  target = np.array(_WRIST_TARGET) * SCALE
  regressor[0, wrist_ring] = _convex_weights(positions[wrist_ring], target)
  target = np.array(_THUMB[0][0]) * SCALE
  candidates = [v for v in np.argsort(np.linalg.norm(positions - target, axis=1))
                if mesh.part[v] in ("palm", "thumb")][:14]
  regressor[13, candidates] = _convex_weights(positions[candidates], target)
  regressor[np.abs(regressor) < 1e-6] = 0.0
  return regressor / regressor.sum(1, keepdims=True)


def _skinning_weights(mesh: _MeshBuilder, info: dict[str, Any], faces: np.ndarray) -> np.ndarray:
  """Each bone's vertices follow its joint (50/50 on the ring at a joint), then two passes of
  mesh smoothing; finger vertices only keep weights of the wrist and their own finger."""
  count = len(mesh.positions)
  weights = np.zeros((count, mano_model.NUM_JOINTS))
  for v, (part, s) in enumerate(zip(mesh.part, mesh.arclength)):
    if part == "palm":
      weights[v, 0] = 1.0
      continue
    cum = info["chains"][part].cum
    start = 2 if part == "thumb" else 1  # chain point where the first finger joint takes over
    bones = [0, *_JOINT_IDS[part]]
    boundaries = cum[start:start + 3] if part != "thumb" else [0.0, cum[2], cum[3]]
    level = int(np.searchsorted(boundaries, s + 1e-9))
    if np.any(np.abs(np.asarray(boundaries) - s) < 1e-9) and s > 0:
      weights[v, bones[level - 1]] = weights[v, bones[level]] = 0.5
    else:
      weights[v, bones[level]] = 1.0
  for v in info["loops"]["thumb"]:
    weights[v] = 0.0
    weights[v, [0, 13]] = 0.5
  allowed = np.ones_like(weights, dtype=bool)
  for v, part in enumerate(mesh.part):
    if part != "palm":
      allowed[v] = False
      allowed[v, [0, *_JOINT_IDS[part]]] = True
  edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  edges = np.unique(np.sort(edges, axis=1), axis=0)
  degree = np.bincount(edges.ravel(), minlength=count)[:, None]
  for _ in range(2):
    total = np.zeros_like(weights)
    np.add.at(total, edges[:, 0], weights[edges[:, 1]])
    np.add.at(total, edges[:, 1], weights[edges[:, 0]])
    weights = 0.5 * weights + 0.5 * total / degree
    weights = np.where(allowed, weights, 0.0)
    weights /= weights.sum(1, keepdims=True)
  return weights


def _vertex_normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
  tri = positions[faces]
  face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  normals = np.zeros_like(positions)
  for k in range(3):
    np.add.at(normals, faces[:, k], face_normals)
  return _normalize(normals)


def _shape_directions(mesh: _MeshBuilder, info: dict[str, Any]) -> np.ndarray:
  """(V, 3, 10) displacements in the anatomical frame: 0 size, 1 palm width, 2 finger length,
  3 thumb length, 4 finger girth, 5 palm length, 6 palm thickness, 7 index vs ring length,
  8 little finger length, 9 finger spread."""
  positions = np.array(mesh.positions)
  dirs = np.zeros(positions.shape + (mano_model.NUM_BETAS,))
  wc, nc = (v * SCALE for v in _PALM_CENTER)
  u0 = _PALM_START_U * SCALE
  dirs[:, :, 0] = 0.05 * (positions - np.array(_WRIST_TARGET) * SCALE)
  middle_base = info["chains"]["middle"].points[0]
  for v, (p, part, s) in enumerate(zip(positions, mesh.part, mesh.arclength)):
    if part == "palm":
      dirs[v, 1, 1] = 0.06 * (p[1] - wc)
      dirs[v, 0, 5] = 0.06 * max(p[0] - u0, 0.0)
      dirs[v, 2, 6] = 0.10 * (p[2] - nc)
      continue
    chain = info["chains"][part]
    base = chain.points[0]
    dirs[v, 1, 1] = 0.06 * (base[1] - wc)
    dirs[v, 0, 5] = 0.06 * (base[0] - u0)
    knuckle_s = chain.cum[1]
    if s <= knuckle_s:
      continue
    center = chain.at(min(s, chain.cum[-1]))[0]
    stretch = center - chain.at(knuckle_s)[0]
    if part == "thumb":
      dirs[v, :, 3] = 0.07 * stretch
    else:
      dirs[v, :, 2] = 0.07 * stretch
      dirs[v, :, 7] = {"index": 0.06, "ring": -0.06}.get(part, 0.0) * stretch
      dirs[v, :, 8] = 0.09 * stretch if part == "pinky" else 0.0
      angle = 0.08 * (base[1] - middle_base[1]) / 0.02  # radians per unit beta
      pivot = chain.at(knuckle_s)[0]
      dirs[v, :, 9] = np.cross(np.array([0.0, 0.0, angle]), p - pivot)
    dirs[v, :, 4] = 0.08 * (p - center)
  return dirs


def _pose_directions(positions: np.ndarray, normals: np.ndarray, joints: np.ndarray,
                     weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(V, 3, 135) pose correctives: a bulge along the normal around each bent joint, growing with
  3 - trace(R) = 2 (1 - cos angle), plus small smooth random terms."""
  dirs = np.zeros(positions.shape + (9 * (mano_model.NUM_JOINTS - 1),))
  for k in range(1, mano_model.NUM_JOINTS):
    parent = mano_model.MANO_PARENTS[k]
    near = (weights[:, k] + weights[:, parent]) > 0.05
    falloff = np.exp(-np.sum((positions - joints[k]) ** 2, 1) / (2 * 0.007 ** 2)) * near
    columns = slice(9 * (k - 1), 9 * k)
    dirs[:, :, columns] = 0.0002 * falloff[:, None, None] * rng.normal(size=(1, 3, 9))
    for diagonal in (0, 4, 8):
      dirs[:, :, 9 * (k - 1) + diagonal] -= 0.0008 * falloff[:, None] * normals
  return dirs


def _pose_space(joints_mano: np.ndarray, rng: np.random.Generator):
  """hands_components (45, 45) orthonormal rows starting with hand synergies, hands_mean (45,)
  (a slightly curled hand) and hands_coeffs (1554, 45), all for joints 1..15 in MANO axes."""
  flex = np.zeros((15, 3))
  flex[:12, 2] = 1.0  # fingers curl about +z
  thumb_dir = _normalize(joints_mano[15] - joints_mano[14])
  thumb_axis = _normalize(np.cross(thumb_dir, np.array([0.0, -1.0, 0.0])))
  flex[13:15] = thumb_axis
  opposition = np.zeros((15, 3))
  opposition[12] = (0.0, 1.0, 0.0)
  opposition[13:15] = 0.5 * thumb_axis
  spread = np.zeros((15, 3))
  for joint, sign in ((0, 1.0), (3, 0.2), (9, -0.8), (6, -1.5)):  # index, middle, ring, pinky
    spread[joint, 1] = sign
  index_vs_rest = flex * np.repeat([1.0, -0.3, -0.3, -0.3, 0.0], 3)[:, None]
  ulnar_curl = flex * np.repeat([0.0, 0.0, 1.0, 1.0, 0.0], 3)[:, None]
  synergies = np.stack([flex, opposition, spread, index_vs_rest, ulnar_curl]).reshape(5, 45)
  basis = np.concatenate([synergies, rng.normal(size=(40, 45))]).T
  q, r = np.linalg.qr(basis)
  components = (q * np.sign(np.diag(r))).T
  mean = 0.15 * flex * np.repeat([[1.0, 1.6, 0.8]], 5, axis=0).reshape(15, 1)
  mean[12] += (0.05, 0.12, 0.0)
  mean += 0.04 * spread
  spread_of_coefficients = np.concatenate([[0.9, 0.5, 0.25, 0.4, 0.4], 0.3 * 0.93 ** np.arange(40)])
  coeffs = rng.normal(size=(1554, 45)) * spread_of_coefficients
  return components, mean.reshape(45), coeffs


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(seed: int) -> dict[str, Any]:
  mesh, info = _build_mesh()
  rng = np.random.default_rng(seed)
  faces_old = np.array(mesh.faces, dtype=np.int64)
  regressor = _joint_regressor(mesh, info)
  weights = _skinning_weights(mesh, info, faces_old)
  shapedirs = _shape_directions(mesh, info)
  positions = np.array(mesh.positions)
  joints = regressor @ positions
  posedirs = _pose_directions(positions, _vertex_normals(positions, faces_old), joints, weights,
                              rng)
  order = _vertex_order(mesh, info)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  v_template = _to_mano_axes(positions[order])
  regressor = regressor[:, order]
  components, mean, coeffs = _pose_space(regressor @ v_template, rng)
  parents = np.array(mano_model.MANO_PARENTS, dtype=np.int64)
  parents[0] = mano_io.ROOT_PARENT_STORED
  arrays = {
      "v_template": v_template,
      "f": inverse[faces_old].astype(np.uint32),
      "J_regressor": regressor,
      "J": regressor @ v_template,
      "kintree_table": np.stack([parents, np.arange(mano_model.NUM_JOINTS)]),
      "weights": weights[order],
      "posedirs": np.moveaxis(_dir_to_mano_axes(np.moveaxis(posedirs[order], 1, -1)), -1, 1),
      "shapedirs": np.moveaxis(_dir_to_mano_axes(np.moveaxis(shapedirs[order], 1, -1)), -1, 1),
      "hands_components": components,
      "hands_mean": mean,
      "hands_coeffs": coeffs,
      "bs_style": "lbs",
      "bs_type": "lrotmin",
      "synthetic_note": "SYNTHETIC hand in MANO's file format generated by dd_jax; not MANO.",
  }
  for value in arrays.values():
    if isinstance(value, np.ndarray):
      value.flags.writeable = False
  return arrays


# ---------------------------------------------------------------- public API

SYNTHETIC_FILENAMES = {"official": "SYNTHETIC_MANO_RIGHT.pkl",
                       "cleaned": "SYNTHETIC_MANO_RIGHT_cleaned.pkl",
                       "npz": "SYNTHETIC_MANO_RIGHT.npz"}


def make_synthetic_mano(seed: int = 0) -> dict[str, Any]:
  """The synthetic hand as MANO's keys (numpy, float64; J_regressor dense; 'f' uint32; root parent
  stored as 4294967295), plus a 'synthetic_note'. The geometry is fixed; `seed` draws the random
  parts (pose-corrective noise, PCA completion, hands_coeffs)."""
  return {k: (v.copy() if isinstance(v, np.ndarray) else v)
          for k, v in _synthetic_arrays(int(seed)).items()}


def write_synthetic_mano(path: str | os.PathLike, layout: str = "official", seed: int = 0) -> str:
  """Writes the synthetic hand; `path` may be a directory (then SYNTHETIC_FILENAMES[layout])."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, SYNTHETIC_FILENAMES[layout])
  mano_io.write_mano(make_synthetic_mano(seed), path, layout=layout)
  return path


def synthetic_mano_model(tip_ids: Sequence[int] = mano_model.DELTADORSAL_TIP_IDS,
                         dtype: Any = jnp.float32, seed: int = 0) -> mano_model.ManoModel:
  """The synthetic hand as a ManoModel (cached; what tests and the demo use without a MANO file)."""
  x64 = bool(jax.config.read("jax_enable_x64"))
  return _cached_model(tuple(int(i) for i in tip_ids), jnp.dtype(dtype).name, int(seed), x64)


@functools.lru_cache(maxsize=16)
def _cached_model(tip_ids, dtype_name, seed, x64):
  del x64  # part of the cache key only: arrays are created differently with and without x64
  arrays = mano_io.validate_mano_arrays(dict(_synthetic_arrays(seed)), source="synthetic MANO")
  return mano_model.make_mano_model(arrays, tip_ids=tip_ids, dtype=dtype_name)
