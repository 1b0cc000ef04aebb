"""Where frame contents come from: the EgoDorsal folder (JPEG + pickled .npy files).

Also the parsers shared with the ArrayRecord store: HaMeR prior and annotation dicts -> arrays,
JPEG bytes -> RGB. Content problems raise `FrameLoadError` naming the frame and the file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import cv2
import numpy as np

from dd_jax import safe_pickle
from dd_jax.data.egodorsal import EgoDorsalIndex, Frame, inside

IMAGE_FIELDS = ("img", "cropped_img", "cropped_base")


class FrameLoadError(RuntimeError):
  """A frame's content (image or .npy) cannot be used; names the frame and the file."""

  def __init__(self, frame_id: int | None, path: str, reason: str):
    self.frame_id = frame_id
    self.path = path
    self.reason = reason
    who = f"frame {frame_id}: " if frame_id is not None else ""
    super().__init__(f"{who}{path}: {reason}")

  def __reduce__(self):  # picklable across Grain worker processes
    return (FrameLoadError, (self.frame_id, self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class Prior:
  """The arrays of a HaMeR .npy dict the pipeline uses (None when the key is absent)."""
  hand_pose: np.ndarray | None  # (45,) float32 axis-angle
  betas: np.ndarray | None  # (10,) float32: betas[0]
  keypoints_3d: np.ndarray | None  # (21, 3) float64, camera frame without cam_t
  cam_t: np.ndarray | None  # (3,) float64
  # (21, 2) float32 pixels of the full (undistorted) frame; only pictures use it, so a missing
  # or malformed value is None rather than an error.
  keypoints_2d: np.ndarray | None = None


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
  """Rotation matrices (..., 3, 3) -> axis-angle (..., 3), float64; stable near 0 and pi.

  Through the quaternion, computed from the best-conditioned of its four formulas (Shepperd).
  """
  R = np.asarray(R, np.float64)
  m = {(i, j): R[..., i, j] for i in range(3) for j in range(3)}
  q_abs = np.sqrt(np.maximum(0.0, np.stack([
      1.0 + m[0, 0] + m[1, 1] + m[2, 2], 1.0 + m[0, 0] - m[1, 1] - m[2, 2],
      1.0 - m[0, 0] + m[1, 1] - m[2, 2], 1.0 - m[0, 0] - m[1, 1] + m[2, 2]], -1)))
  candidates = np.stack([
      np.stack([q_abs[..., 0] ** 2, m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]], -1),
      np.stack([m[2, 1] - m[1, 2], q_abs[..., 1] ** 2, m[1, 0] + m[0, 1], m[0, 2] + m[2, 0]], -1),
      np.stack([m[0, 2] - m[2, 0], m[1, 0] + m[0, 1], q_abs[..., 2] ** 2, m[1, 2] + m[2, 1]], -1),
      np.stack([m[1, 0] - m[0, 1], m[2, 0] + m[0, 2], m[2, 1] + m[1, 2], q_abs[..., 3] ** 2], -1),
  ], -2) / (2.0 * np.maximum(q_abs, 0.1))[..., None]
  best = np.argmax(q_abs, -1)
  q = np.take_along_axis(candidates, best[..., None, None], -2)[..., 0, :]
  q = np.where(q[..., :1] < 0, -q, q)  # w >= 0: the angle in [0, pi]
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  w, v = q[..., 0], q[..., 1:]
  sin_half = np.linalg.norm(v, axis=-1)
  angle = 2.0 * np.arctan2(sin_half, w)
  scale = np.where(sin_half > 1e-12, angle / np.maximum(sin_half, 1e-300), 2.0)
  return v * scale[..., None]


# The prior and annotation arrays are small (at most 15x3x3 numbers); anything much larger is
# refused before it is converted to float64.
_MAX_VALUES = 4096


def _array(d: dict, key: str, where: str) -> np.ndarray | None:
  if key not in d or d[key] is None:
    return None
  if isinstance(d[key], np.ndarray) and d[key].size > _MAX_VALUES:
    raise ValueError(f"'{key}' holds {d[key].size} values, far more than a pose or keypoints")
  try:
    value = np.asarray(d[key], np.float64)
  except (TypeError, ValueError, OverflowError, RecursionError) as e:
    raise ValueError(f"'{key}' is not a numeric array ({e})") from None
  if not np.all(np.isfinite(value)):
    raise ValueError(f"'{key}' has non-finite values")
  return value


def pose_to_axis_angle(value: np.ndarray, key: str) -> np.ndarray:
  """A finger pose of 15 axis-angles (45 numbers) or 15 rotation matrices -> (45,) float32."""
  if value.size == 45:
    return value.reshape(45).astype(np.float32)
  if value.size == 135 and value.shape[-2:] == (3, 3):
    return matrix_to_axis_angle(value.reshape(15, 3, 3)).reshape(45).astype(np.float32)
  raise ValueError(f"'{key}' should hold 15 axis-angles (1x15x3) or 15 rotation matrices "
                   f"(1x15x3x3), got shape {value.shape}")


def _shaped(value: np.ndarray | None, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
  """Accepts the shape with or without a leading batch axis of 1."""
  if value is None:
    return None
  if value.shape == shape or value.shape == (1,) + shape:
    return value.reshape(shape)
  raise ValueError(f"'{key}' should have shape {shape} or {(1,) + shape}, got {value.shape}")


def _optional_keypoints_2d(value: Any) -> np.ndarray | None:
  try:
    array = np.asarray(value, np.float32)
  except (TypeError, ValueError, OverflowError, RecursionError):
    return None
  if array.size != 42 or not np.all(np.isfinite(array)):
    return None
  return array.reshape(21, 2)


def parse_prior(d: Any, path: str, frame_id: int | None) -> Prior:
  """HaMeR dict -> Prior; wrong types or shapes raise FrameLoadError naming `path`."""
  try:
    if not isinstance(d, dict):
      raise ValueError(f"expected a pickled dict, got {type(d).__name__}")
    pose = _array(d, "hand_pose", path)
    betas = _array(d, "betas", path)
    if betas is not None:
      if betas.ndim == 2 and betas.shape[1] == 10 and betas.shape[0] >= 1:
        betas = betas[0]  # SPEC: betas[0] of the file
      betas = _shaped(betas, "betas", (10,))
    return Prior(
        hand_pose=None if pose is None else pose_to_axis_angle(pose, "hand_pose"),
        betas=None if betas is None else betas.astype(np.float32),
        keypoints_3d=_shaped(_array(d, "keypoints_3d", path), "keypoints_3d", (21, 3)),
        cam_t=_shaped(_array(d, "cam_t", path), "cam_t", (3,)),
        keypoints_2d=_optional_keypoints_2d(d.get("keypoints_2d")))
  except ValueError as e:
    raise FrameLoadError(frame_id, path, str(e)) from None


def parse_ground_truth(d: Any, path: str, frame_id: int | None) -> np.ndarray:
  """Annotation dict -> ground-truth finger pose (45,) float32 from "pose" or "hand_pose"."""
  try:
    if not isinstance(d, dict):
      raise ValueError(f"expected a pickled dict, got {type(d).__name__}")
    for key in ("pose", "hand_pose"):  # the released code reads "pose"; the README documents "hand_pose"
      value = _array(d, key, path)
      if value is not None:
        return pose_to_axis_angle(value, key)
    raise ValueError(f"no ground-truth pose: neither 'pose' nor 'hand_pose' in keys {sorted(d)}")
  except ValueError as e:
    raise FrameLoadError(frame_id, path, str(e)) from None


def load_npy_dict(path: str, frame_id: int | None) -> Any:
  """safe_pickle.load_npy with missing / corrupt / unsafe files reported as FrameLoadError."""
  try:
    return safe_pickle.load_npy(path)
  except FileNotFoundError:
    raise FrameLoadError(frame_id, path, "file not found") from None
  except safe_pickle.UnsafePickleError as e:
    raise FrameLoadError(frame_id, path, f"refused to unpickle: {e}") from None
  except (pickle.UnpicklingError, ValueError, OSError, EOFError) as e:
    raise FrameLoadError(frame_id, path, f"not a readable .npy dict ({e})") from None


def jpeg_end(data: bytes) -> int | None:
  """Where the JPEG stream starting at data[0] ends (after its EOI marker), or None when the data
  ends first (a truncated file). Walks the marker segments by their lengths (so an EXIF
  thumbnail's own EOI is skipped) and the entropy-coded data after each SOS to its next marker;
  bytes after the EOI (trailers that phones append) are not looked at."""
  pos, n = 2, len(data)
  while pos + 1 < n:
    if data[pos] != 0xFF:
      return None  # not a marker where one must be
    marker = data[pos + 1]
    if marker == 0xD9:  # EOI
      return pos + 2
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
      pos += 2
      continue
    if pos + 4 > n:
      return None
    pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker != 0xDA:  # SOS: entropy-coded data follows, up to the next real marker
      continue
    while True:
      pos = data.find(b"\xff", pos)
      if pos < 0 or pos + 1 >= n:
        return None
      following = data[pos + 1]
      if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
        pos += 1 if following == 0xFF else 2  # stuffed byte, restart marker, fill
        continue
      break
  return None


def decode_image(data: bytes, path: str, frame_id: int | None) -> np.ndarray:
  """JPEG/PNG bytes -> (H, W, 3) uint8 RGB."""
  if not data:
    raise FrameLoadError(frame_id, path, "empty image file")
  if data[:2] == b"\xff\xd8" and jpeg_end(data) is None:
    # libjpeg only warns on a cut stream and fills the rest grey: refuse it here.
    raise FrameLoadError(frame_id, path, "truncated JPEG (the stream ends before its "
                         "end-of-image marker)")
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 2:
    raise FrameLoadError(frame_id, path, "not a decodable image")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_file(path: str | None, frame_id: int | None, what: str) -> bytes:
  if path is None:
    raise FrameLoadError(frame_id, "<frames.json>", f"no {what} path for this frame")
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FrameLoadError(frame_id, path, "file not found") from None
  except OSError as e:
    raise FrameLoadError(frame_id, path, f"unreadable ({e})") from None


class FolderStore:
  """Reads frames from the EgoDorsal folder layout (data.format="folder").

  Every file read must resolve inside the dataset root, symlinks followed, unless
  `allow_symlinks_outside_root` (the JSON's paths themselves never leave it: egodorsal checks).
  """

  def __init__(self, index: EgoDorsalIndex, allow_symlinks_outside_root: bool = False):
    self.index = index
    self.allow_symlinks_outside_root = allow_symlinks_outside_root
    self._real_root = os.path.realpath(index.root)

  def __repr__(self) -> str:
    return f"FolderStore({self.index.root!r})"

  def _inside(self, path: str | None, frame_id: int | None) -> str | None:
    if path is not None and not self.allow_symlinks_outside_root:
      real = os.path.realpath(path)
      if not inside(real, self._real_root):
        raise FrameLoadError(frame_id, path, f"resolves to {real} through a symlink, outside the "
                             f"dataset root {self.index.root} (allowed only with "
                             "data.allow_symlinks_outside_root=True)")
    return path

  def frame_image(self, frame: Frame, field: str) -> tuple[bytes, str]:
    """(encoded bytes, path) of the frame's `field` in IMAGE_FIELDS."""
    path = self._inside(getattr(frame, f"{field}_path"), frame.frame_id)
    return read_file(path, frame.frame_id, f"{field}_path"), path

  def frame_prior(self, frame: Frame) -> Prior:
    if frame.hamer_path is None:
      raise FrameLoadError(frame.frame_id, "<frames.json>", "no hamer_path for this frame")
    path = self._inside(frame.hamer_path, frame.frame_id)
    return parse_prior(load_npy_dict(path, frame.frame_id), path, frame.frame_id)

  def frame_ground_truth(self, frame: Frame) -> np.ndarray:
    if frame.ann_path is None:
      raise FrameLoadError(frame.frame_id, "<frames.json>", "no ann_path for this frame")
    path = self._inside(frame.ann_path, frame.frame_id)
    return parse_ground_truth(load_npy_dict(path, frame.frame_id), path, frame.frame_id)

  def _base(self, p_id: int, base_idx: int, frame_id: int):
    bases = self.index.bases.get(p_id, [])
    if not 0 <= base_idx < len(bases):
      raise FrameLoadError(frame_id, os.path.join(self.index.root, "bases.json"),
                           f"participant {p_id} has no base #{base_idx} ({len(bases)} bases)")
    return bases[base_idx]

  def base_name(self, p_id: int, base_idx: int) -> str:
    """The base's HaMeR file, for messages."""
    bases = self.index.bases.get(p_id, [])
    return bases[base_idx].hamer_path if 0 <= base_idx < len(bases) else f"base {base_idx}"

  def base_image(self, p_id: int, base_idx: int, frame_id: int) -> tuple[bytes, str]:
    path = self._inside(self._base(p_id, base_idx, frame_id).img_path, frame_id)
    return read_file(path, frame_id, "base img_path"), path

  def base_prior(self, p_id: int, base_idx: int, frame_id: int) -> Prior:
    path = self._inside(self._base(p_id, base_idx, frame_id).hamer_path, frame_id)
    return parse_prior(load_npy_dict(path, frame_id), path, frame_id)
