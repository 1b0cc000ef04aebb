"""EgoDorsal metadata: bases.json, trials.json, frames.json and split files (SPEC.md §4).

Reads the JSON side of the format into small picklable records (`Base`, `Trial`, `Frame`) and
selects the frames of a split file or of a participant list (dd_jax.data.splits says which).
Every reader collects all problems it finds and raises one `DatasetFormatError` listing them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

# Released-code keypoint subsets (OpenPose order): homography and crop anchors.
ALIGN_KEYPOINTS = (0, 1, 5, 17)
CROP_KEYPOINTS = (0, 1, 2, 5, 9, 13, 17)

# Force classes and per-finger activation [index, middle, ring, pinky, thumb] per motion type.
MOTION_LABELS = {
    "force_pinch_index": 1,
    "force_pinch_middle": 2,
    "force_pinch_ring": 3,
    "force_fist_clench": 4,
    "surface_tap_all_force": 5,
    "surface_tap_index_force": 6,
}
MOTION_FINGERS = {
    "force_pinch_index": (1, 0, 0, 0, 1),
    "force_pinch_middle": (0, 1, 0, 0, 1),
    "force_pinch_ring": (0, 0, 1, 0, 1),
    "force_fist_clench": (1, 1, 1, 1, 1),
    "surface_tap_all_force": (1, 0, 0, 0, 0),
    "surface_tap_index_force": (1, 0, 0, 0, 0),
}
# Lengths cv2.undistort accepts; longer vectors are accepted when the extra terms are zero.
_OPENCV_DISTORTION_LENGTHS = (4, 5, 8, 12, 14)
MAX_LISTED_PROBLEMS = 1000


class DatasetFormatError(ValueError):
  """The dataset's metadata or files are wrong; `problems` lists every problem found."""

  def __init__(self, what: str, problems: Sequence[str]):
    self.problems = list(problems)
    shown = self.problems[:MAX_LISTED_PROBLEMS]
    more = len(self.problems) - len(shown)
    lines = [f"{what}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in shown]
    if more:
      lines.append(f"  ... and {more} more (all of them are in the exception's .problems)")
    super().__init__("\n".join(lines))


def check(what: str, problems: Sequence[str]) -> None:
  if problems:
    raise DatasetFormatError(what, problems)


@dataclasses.dataclass(frozen=True)
class Base:
  """A neutral-pose reference image of a participant (paths absolute)."""
  base_id: int
  img_path: str
  hamer_path: str


@dataclasses.dataclass(frozen=True, eq=False)
class Trial:
  trial_id: int
  p_id: int
  motion_type: str
  hand_position: str
  K: np.ndarray  # (3, 3) float64 intrinsics
  d: np.ndarray  # (n,) float64 OpenCV distortion, n in 4, 5, 8, 12, 14
  world2cam: np.ndarray  # (3, 4) or (4, 4)


@dataclasses.dataclass(frozen=True, slots=True)  # slots: 170k of them live in every worker
class Frame:
  """One captured frame (paths absolute; optional fields None when the JSON omits them)."""
  frame_id: int
  trial_id: int
  p_id: int
  img_path: str | None
  cropped_img_path: str | None
  cropped_base_path: str | None
  cropped_base_idx: int | None
  ann_path: str | None
  hamer_path: str | None
  fsr_reading: float | None
  tap_label: float | None


@dataclasses.dataclass(frozen=True)
class EgoDorsalIndex:
  """bases.json + trials.json of one dataset root."""
  root: str
  bases_dir: str
  bases: dict[int, list[Base]]  # p_id -> bases in list order (cropped_base_idx indexes it)
  trials: dict[int, Trial]

  @property
  def participants(self) -> list[int]:
    return sorted(set(self.bases) | {t.p_id for t in self.trials.values()})


def read_json(path: str, problems: list[str]) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    problems.append(f"{path}: file not found")
  except (OSError, ValueError) as e:
    problems.append(f"{path}: not readable JSON ({e})")
  return None


def _join(directory: str, rel: Any) -> str:
  return os.path.normpath(os.path.join(directory, str(rel)))


def inside(path: str, root: str) -> bool:
  """Whether the normalised `path` is `root` or lies under it."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _contained(directory: str, rel: str, what: str, where: str, problems: list[str]) -> str | None:
  """directory/rel, or None (a problem listed) when it leaves `directory` (.., absolute)."""
  path = _join(directory, rel)
  if inside(path, directory):
    return path
  problems.append(f"{where}: {what} {rel!r} resolves to {path}, outside {directory}")
  return None


def _get(item: dict, key: str, kind: type | tuple[type, ...], where: str, problems: list[str],
         optional: bool = False) -> Any:
  if key not in item or item[key] is None:
    if not optional:
      problems.append(f"{where}: missing '{key}'")
    return None
  value = item[key]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if kind is int and isinstance(value, float) and value.is_integer():
    value = int(value)
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    problems.append(f"{where}: '{key}' should be {getattr(kind, '__name__', kind)}, "
                    f"got {type(value).__name__} {value!r:.40}")
    return None
  return value


def _matrix(value: Any, shapes: Iterable[tuple[int, ...]], name: str, where: str,
            problems: list[str]) -> np.ndarray | None:
  try:
    array = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    problems.append(f"{where}: '{name}' is not a numeric array")
    return None
  shapes = tuple(shapes)
  if array.shape not in shapes or not np.all(np.isfinite(array)):
    problems.append(f"{where}: '{name}' should be a finite array of shape "
                    f"{' or '.join(str(s) for s in shapes)}, got shape {array.shape}")
    return None
  return array


def opencv_distortion(d: np.ndarray) -> np.ndarray | None:
  """Flattens `d` to a length cv2.undistort accepts (trailing zeros dropped); None if impossible."""
  d = np.asarray(d, np.float64).reshape(-1)
  if d.size in _OPENCV_DISTORTION_LENGTHS:
    return d
  for n in _OPENCV_DISTORTION_LENGTHS:
    if d.size > n and not np.any(d[n:]):
      return d[:n]
  return None


def load_index(root: str, problems: list[str] | None = None) -> EgoDorsalIndex:
  """Reads bases.json and trials.json under `root`.

  With `problems` given, appends to it and returns what it could read; otherwise raises one
  DatasetFormatError listing every problem.
  """
  collect = problems if problems is not None else []
  root = os.path.abspath(root)
  bases_json = read_json(os.path.join(root, "bases.json"), collect) or {}
  trials_json = read_json(os.path.join(root, "trials.json"), collect) or {}

  bases_dir = (_contained(root, bases_json.get("bases_dir", "bases"), "bases_dir", "bases.json",
                          collect) or _join(root, "bases"))
  bases: dict[int, list[Base]] = {}
  for i, participant in enumerate(bases_json.get("participants", []) if bases_json else []):
    where = f"bases.json participants[{i}]"
    p_id = _get(participant, "p_id", int, where, collect)
    if p_id is None:
      continue
    if p_id in bases:
      collect.append(f"{where}: participant {p_id} listed twice")
    items = []
    for j, base in enumerate(participant.get("bases", [])):
      bw = f"bases.json participant {p_id} bases[{j}]"
      base_id = _get(base, "base_id", int, bw, collect)
      img = _get(base, "img_path", str, bw, collect)
      hamer = _get(base, "hamer_path", str, bw, collect)
      if img is not None:
        img = _contained(bases_dir, img, "img_path", bw, collect)
      if hamer is not None:
        hamer = _contained(bases_dir, hamer, "hamer_path", bw, collect)
      if all(x is not None for x in (base_id, img, hamer)):
        items.append(Base(base_id, img, hamer))
    if not items:
      collect.append(f"{where}: participant {p_id} has no usable base")
    bases[p_id] = items
  if bases_json and "participants" not in bases_json:
    collect.append("bases.json: missing 'participants'")

  trials: dict[int, Trial] = {}
  if trials_json and "trials" not in trials_json:
    collect.append("trials.json: missing 'trials'")
  for i, trial in enumerate(trials_json.get("trials", []) if trials_json else []):
    where = f"trials.json trials[{i}]"
    trial_id = _get(trial, "trial_id", int, where, collect)
    if trial_id is None:
      continue
    where = f"trials.json trial {trial_id}"
    p_id = _get(trial, "p_id", int, where, collect)
    motion = _get(trial, "motion_type", str, where, collect)
    position = _get(trial, "hand_position", str, where, collect, optional=True) or ""
    K = _matrix(trial.get("K"), [(3, 3)], "K", where, collect)
    d = _matrix(trial.get("d"), [(1, n) for n in range(4, 16)] + [(n,) for n in range(4, 16)],
                "d", where, collect)
    w2c = _matrix(trial.get("world2cam"), [(4, 4), (3, 4)], "world2cam", where, collect)
    if d is not None:
      d_cv = opencv_distortion(d)
      if d_cv is None:
        collect.append(f"{where}: 'd' has {d.size} coefficients with non-zero terms beyond the "
                       f"OpenCV model (lengths {_OPENCV_DISTORTION_LENGTHS})")
      d = d_cv
    if trial_id in trials:
      collect.append(f"{where}: trial_id listed twice")
    if p_id is not None and bases and p_id not in bases:
      collect.append(f"{where}: participant {p_id} has no entry in bases.json")
    if all(x is not None for x in (p_id, motion, K, d, w2c)):
      trials[trial_id] = Trial(trial_id, p_id, motion, position, K, d, w2c)

  index = EgoDorsalIndex(root, bases_dir, bases, trials)
  if problems is None:
    check(f"EgoDorsal metadata in {root}", collect)
  return index


def split_file(root: str, split: str) -> str:
  """'all' -> frames.json, otherwise {split}.json (SPEC.md §4)."""
  return os.path.join(root, "frames.json" if split == "all" else f"{split}.json")


def select_frames(index: EgoDorsalIndex, split: str, participants: Sequence[int] = (),
                  sample_ratio: float = 1.0, problems: list[str] | None = None) -> list[Frame]:
  """Frames of `split` ('all' or a split file name), or of `participants` from frames.json.

  A participant list overrides the split (as in the released code); sample_ratio r keeps every
  int(1/r)-th frame of the selection.
  """
  collect = problems if problems is not None else []
  if participants:
    split = "all"
  path = split_file(index.root, split)
  data = read_json(path, collect)
  frames: list[Frame] = []
  if data is None:
    if problems is None:
      check(f"EgoDorsal split '{split}'", collect)
    return frames
  name = os.path.basename(path)
  frames_dir = (_contained(index.root, data.get("frames_dir", "trials"), "frames_dir", name,
                           collect) or _join(index.root, "trials"))
  if "frames" not in data:
    collect.append(f"{name}: missing 'frames'")
  wanted = set(int(p) for p in participants)
  for i, item in enumerate(data.get("frames", [])):
    frame_id = _get(item, "frame_id", int, f"{name} frames[{i}]", collect)
    where = f"{name} frame {frame_id}" if frame_id is not None else f"{name} frames[{i}]"
    trial_id = _get(item, "trial_id", int, where, collect)
    if frame_id is None or trial_id is None:
      continue
    trial = index.trials.get(trial_id)
    if trial is None:
      collect.append(f"{where}: unknown trial {trial_id} (not in trials.json)")
      continue
    if wanted and trial.p_id not in wanted:
      continue
    before = len(collect)
    paths = {}
    for key in ("img_path", "cropped_img_path", "cropped_base_path", "ann_path", "hamer_path"):
      rel = _get(item, key, str, where, collect, optional=True)
      paths[key] = _contained(frames_dir, rel, key, where, collect) if rel is not None else None
    frame = Frame(
        frame_id=frame_id, trial_id=trial_id, p_id=trial.p_id,
        cropped_base_idx=_get(item, "cropped_base_idx", int, where, collect, optional=True),
        fsr_reading=_get(item, "fsr_reading", float, where, collect, optional=True),
        tap_label=_get(item, "tap_label", float, where, collect, optional=True), **paths)
    if len(collect) == before:  # a bad field is listed once, not again as a missing one
      frames.append(frame)
  if sample_ratio <= 0 or sample_ratio > 1:
    collect.append(f"sample_ratio must be in (0, 1], got {sample_ratio}")
  else:
    frames = frames[::max(int(1 / sample_ratio), 1)]
  if problems is None:
    check(f"EgoDorsal split '{split}' ({path})", collect)
  return frames
