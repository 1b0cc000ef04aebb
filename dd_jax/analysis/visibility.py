"""Finger visibility: how much of each finger's camera-facing surface a z-buffer sees.

Face labels use the original's `assets/mano_face_labels.json` format: a JSON list with one
integer per MANO face, 0 index, 1 middle, 2 ring, 3 pinky, 4 thumb, 5 dorsal, 6 palm, 7 other.
`generate_face_labels` makes such a list for any MANO-format model (the synthetic hand's own
labels; a real MANO file without the original's list).

A finger's visibility is the share of its camera-facing faces' projected area whose pixels the
finger wins in a z-buffer of the whole hand: 1 for a finger nothing covers, 0 for one hidden
behind the palm. Faces turned away from the camera are not counted at all (the original's
unwired helper counted them as hidden, so an unoccluded finger scored about 0.5 there).
"""

from __future__ import annotations

import json
import os

import numpy as np

from dd_jax.synthetic import render

LABEL_NAMES = ("index", "middle", "ring", "pinky", "thumb", "dorsal", "palm", "other")
FINGERS = ("thumb", "index", "middle", "ring", "pinky")  # OpenPose order, as metrics.ANGLE_TRIPLETS
FINGER_LABELS = (4, 0, 1, 2, 3)  # the label of each finger in FINGERS
# MANO joints (SPEC.md §3 order) of each finger in FINGERS.
FINGER_JOINTS = ((13, 14, 15), (1, 2, 3), (4, 5, 6), (10, 11, 12), (7, 8, 9))
DORSAL, PALM = 5, 6
# The z-buffer is drawn so that the hand's longer side spans this many pixels: finger shares then
# agree with a 1024-pixel z-buffer to ~0.01 on the synthetic hand, at ~15 ms per frame.
RESOLUTION = 192


def load_face_labels(path: str, num_faces: int | None = None) -> np.ndarray:
  """Reads a mano_face_labels.json list -> (F,) int64; errors name the file and the entry."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable face-label JSON list ({e})") from None
  if not isinstance(value, list) or not value:
    raise ValueError(f"{path}: expected a JSON list with one label per MANO face, "
                     f"got {type(value).__name__}")
  bad = [i for i, v in enumerate(value)
         if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(LABEL_NAMES)]
  if bad:
    raise ValueError(f"{path}: entry {bad[0]} is {value[bad[0]]!r}; labels are integers 0-7 "
                     f"({', '.join(f'{i} {n}' for i, n in enumerate(LABEL_NAMES))})")
  if num_faces is not None and len(value) != num_faces:
    raise ValueError(f"{path}: {len(value)} labels for a mesh of {num_faces} faces")
  return np.asarray(value, np.int64)


def save_face_labels(labels: np.ndarray, path: str) -> str:
  """Writes labels in the original's format (one JSON list of ints)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump([int(v) for v in labels], f)
  return path


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def generate_face_labels(model) -> np.ndarray:
  """(F,) labels for a MANO-format model: a face belongs to the finger whose joints skin most of
  its vertices; the rest of the hand is dorsal or palm by which side its normal faces."""
  vertices = np.asarray(model.v_template, np.float64)
  faces = np.asarray(model.faces, np.int64)
  joints = np.asarray(model.joint_template, np.float64)
  owner = np.argmax(np.asarray(model.weights), axis=1)  # (V,) dominant joint
  vertex_label = np.full(len(vertices), -1)
  for finger, chain in enumerate(FINGER_JOINTS):
    vertex_label[np.isin(owner, chain)] = FINGER_LABELS[finger]
  per_face = vertex_label[faces]  # (F, 3)
  labels = np.empty(len(faces), np.int64)
  for f, row in enumerate(per_face):
    values, counts = np.unique(row, return_counts=True)
    labels[f] = values[np.argmax(counts)] if counts.max() >= 2 else row[0]
  # Right hand: forward (wrist -> middle knuckle) x (pinky -> index knuckle) points out of the
  # back of the hand, whatever the model's axes are.
  forward = joints[4] - joints[0]
  dorsal = _unit(np.cross(forward, joints[1] - joints[7]))
  normals = _face_normals(vertices, faces) * _orientation(vertices, faces)
  body = labels < 0
  labels[body] = np.where(normals[body] @ dorsal > 0, DORSAL, PALM)
  return labels


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
  tri = vertices[faces]
  return np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])


def _orientation(vertices: np.ndarray, faces: np.ndarray) -> float:
  """+1 when the winding's normals point out of the surface (positive enclosed volume), else -1.
  MANO's surface is open only at the wrist, which barely changes the volume."""
  tri = vertices[faces] - vertices.mean(0)
  volume = np.sum(np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])))
  return 1.0 if volume >= 0 else -1.0


def label_visibility(vertices_cam: np.ndarray, faces: np.ndarray, labels: np.ndarray,
                     resolution: int = RESOLUTION) -> np.ndarray:
  """Visible share of each label's camera-facing surface -> (8,) in [0, 1] (NaN: no such face).

  vertices_cam: (V, 3) the posed mesh in the camera frame (metres, +z forward; camera at the
  origin). Only the viewpoint matters: the z-buffer uses its own pinhole framing the hand.
  """
  vertices = np.asarray(vertices_cam, np.float64)
  faces = np.asarray(faces, np.int64)
  labels = np.asarray(labels)
  if not np.all(vertices[:, 2] > 1e-3):
    raise ValueError("the hand must lie in front of the camera (every vertex at z > 1 mm)")
  uv = vertices[:, :2] / vertices[:, 2:]
  lo, hi = uv.min(0), uv.max(0)
  focal = (resolution - 4) / max(float(np.max(hi - lo)), 1e-9)
  K = np.array([[focal, 0.0, 2.0 - focal * lo[0]], [0.0, focal, 2.0 - focal * lo[1]], [0, 0, 1]])
  width, height = (np.ceil((hi - lo) * focal) + 4).astype(int)
  raster = render.rasterize(vertices, faces, K, (int(width), int(height)))
  won = np.bincount(raster.face[raster.face >= 0], minlength=len(faces)).astype(np.float64)

  pixels = uv * focal
  tri = pixels[faces]
  (ax, ay), (bx, by) = (tri[:, 1] - tri[:, 0]).T, (tri[:, 2] - tri[:, 0]).T
  area = 0.5 * np.abs(ax * by - ay * bx)
  centroid = vertices[faces].mean(1)
  normals = _face_normals(vertices, faces) * _orientation(vertices, faces)
  facing = np.einsum("fi,fi->f", normals, centroid) < 0  # towards the camera at the origin
  out = np.full(len(LABEL_NAMES), np.nan)
  for label in range(len(LABEL_NAMES)):
    selected = facing & (labels == label)
    if np.any(labels == label):
      total = area[selected].sum()
      out[label] = min(won[selected].sum() / total, 1.0) if total > 0 else 0.0
  return out


def finger_visibility(vertices_cam: np.ndarray, faces: np.ndarray, labels: np.ndarray,
                      resolution: int = RESOLUTION) -> np.ndarray:
  """(5,) visible share of each finger, OpenPose order (thumb, index, middle, ring, pinky)."""
  return label_visibility(vertices_cam, faces, labels, resolution)[list(FINGER_LABELS)]
