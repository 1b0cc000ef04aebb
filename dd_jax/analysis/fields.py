"""The per-frame fields the analysis adds to test_outputs_epoch{N}.npy, beside the original's.

Metadata from the dataset (participant, trial, motion type, hand position, FSR reading,
timestamp), per-joint angle errors of the model and the prior, and per-finger visibility of
the ground-truth hand seen from the trial's camera. The test phase writes them; `report.py`
fills in whatever an older (or the original's) file lacks from the dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import cv2
import jax
import numpy as np

from dd_jax.analysis import pose_errors, visibility
from dd_jax.data import array_record, egodorsal, store
from dd_jax.logs import log
from dd_jax.mano.model import mano_forward

METADATA_FIELDS = ("p_id", "trial_id", "motion_type", "hand_position", "fsr_reading", "timestamp")
POSE_FIELDS = ("angle_error", "angle_error_prior", "finger_visibility")
_CHUNK = 64  # MANO batch of the visibility pass (one compilation)


def frame_metadata(data_dir: str, frame_ids: Sequence[int]) -> dict[str, np.ndarray]:
  """METADATA_FIELDS for each frame id, from frames.json and trials.json under data_dir.

  Missing readings and timestamps are NaN. An id that is not in frames.json is an error naming it.
  """
  index = egodorsal.load_index(data_dir)
  frames = {f.frame_id: f for f in egodorsal.select_frames(index, "all")}
  raw = egodorsal.read_json(egodorsal.split_file(index.root, "all"), [])
  stamps = {item.get("frame_id"): item.get("timestamp") for item in raw.get("frames", [])}
  missing = [int(i) for i in frame_ids if int(i) not in frames]
  if missing:
    raise KeyError(f"{len(missing)} frame id(s) of the test outputs are not in "
                   f"{egodorsal.split_file(index.root, 'all')}: {missing[:10]}")
  chosen = [frames[int(i)] for i in frame_ids]
  trials = [index.trials[f.trial_id] for f in chosen]
  number = lambda v: np.nan if v is None else float(v)
  return {"p_id": np.array([f.p_id for f in chosen], np.int64),
          "trial_id": np.array([f.trial_id for f in chosen], np.int64),
          "motion_type": np.array([t.motion_type for t in trials], str),
          "hand_position": np.array([t.hand_position for t in trials], str),
          "fsr_reading": np.array([number(f.fsr_reading) for f in chosen], np.float64),
          "timestamp": np.array([number(stamps.get(f.frame_id)) for f in chosen], np.float64)}


def angle_error_fields(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-joint angle errors (N, 15) degrees of the model and the prior (pose outputs)."""
  gt = record["gt_kp_3d"]
  return {"angle_error": pose_errors.angle_errors(record["pred_kp_3d"], gt),
          "angle_error_prior": pose_errors.angle_errors(record["hamer_kp_3d"], gt)}


@dataclasses.dataclass(frozen=True)
class _HandInCamera:
  betas: np.ndarray  # (10,)
  pose: np.ndarray  # (45,)
  orient: np.ndarray  # (3, 3) world frame
  keypoints: np.ndarray  # (21, 3) world frame
  world2cam: np.ndarray  # (3, 4)


def _read_hand(frame: egodorsal.Frame, trial: egodorsal.Trial) -> _HandInCamera:
  """The ground-truth hand of a frame: annotation pose, shape, orientation and 3D keypoints."""
  where = frame.ann_path or "<frames.json>"
  if frame.ann_path is None:
    raise store.FrameLoadError(frame.frame_id, where, "no ann_path for this frame")
  ann = store.load_npy_dict(frame.ann_path, frame.frame_id)
  pose = store.parse_ground_truth(ann, frame.ann_path, frame.frame_id)
  try:
    arrays = {}
    for key, sizes in (("betas", (10,)), ("global_orient", (3, 9)), ("keypoints_3d", (63,))):
      if key not in ann:
        raise ValueError(f"no '{key}' (visibility needs the annotated hand's shape, "
                         "orientation and 3D keypoints)")
      value = np.asarray(ann[key], np.float64)
      if value.size not in sizes or not np.all(np.isfinite(value)):
        raise ValueError(f"'{key}' should hold {' or '.join(map(str, sizes))} finite numbers, "
                         f"got shape {value.shape}")
      arrays[key] = value.reshape(-1)
  except ValueError as e:
    raise store.FrameLoadError(frame.frame_id, frame.ann_path, str(e)) from None
  orient = arrays["global_orient"]
  orient = cv2.Rodrigues(orient)[0] if orient.size == 3 else orient.reshape(3, 3)
  return _HandInCamera(arrays["betas"], pose.astype(np.float64), orient,
                       arrays["keypoints_3d"].reshape(21, 3), np.asarray(trial.world2cam)[:3])


_mano_jit = jax.jit(lambda model, betas, pose, orient: mano_forward(model, betas, pose, orient))


def hands_in_camera(model, hands: Sequence[_HandInCamera]) -> np.ndarray:
  """(N, 778, 3) ground-truth meshes in each trial's camera frame.

  MANO with the annotation's orientation, moved so that its keypoints' mean matches the
  annotation's keypoints_3d (world frame), then through world2cam (as the original's helper).
  """
  out = []
  for start in range(0, len(hands), _CHUNK):
    chunk = list(hands[start:start + _CHUNK])
    pad = _CHUNK - len(chunk)
    chunk += chunk[:1] * pad
    result = _mano_jit(model, np.stack([h.betas for h in chunk]).astype(np.float32),
                       np.stack([h.pose for h in chunk]).astype(np.float32),
                       np.stack([h.orient for h in chunk]).astype(np.float32))
    vertices = np.asarray(result.vertices, np.float64)[:_CHUNK - pad]
    keypoints = np.asarray(result.keypoints, np.float64)[:_CHUNK - pad]
    for hand, v, k in zip(chunk, vertices, keypoints):
      world = v + (hand.keypoints - k).mean(0)
      out.append(world @ hand.world2cam[:, :3].T + hand.world2cam[:, 3])
  return np.stack(out) if out else np.zeros((0, 778, 3))


def finger_visibility_field(data_dir: str, frame_ids: Sequence[int], model,
                            face_labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """(N, 5) visible share of each finger (thumb..pinky) per frame, and the problems found.

  A frame whose annotation cannot be read (or lacks what the mesh needs) gets NaN and is listed;
  the others are still computed.
  """
  index = egodorsal.load_index(data_dir)
  frames = {f.frame_id: f for f in egodorsal.select_frames(index, "all")}
  result = np.full((len(frame_ids), 5), np.nan)
  hands, rows, problems = [], [], []
  for row, frame_id in enumerate(frame_ids):
    frame = frames.get(int(frame_id))
    if frame is None:
      problems.append(f"frame {int(frame_id)}: not in frames.json")
      continue
    try:
      hands.append(_read_hand(frame, index.trials[frame.trial_id]))
      rows.append(row)
    except store.FrameLoadError as e:
      problems.append(str(e))
  faces = np.asarray(model.faces)
  for row, vertices in zip(rows, hands_in_camera(model, hands)):
    try:
      result[row] = visibility.finger_visibility(vertices, faces, face_labels)
    except ValueError as e:
      problems.append(f"frame {int(frame_ids[row])}: {e}")
  return result, problems


def add_fields(record: dict[str, np.ndarray], data_dir: str, model=None,
               face_labels: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
  """The record with every analysis field it lacks added (the original's fields untouched).

  Visibility needs the MANO model and face labels; without them it is left out. Returns the new
  record and the problems met (frames whose visibility could not be computed).
  """
  out = dict(record)
  problems: list[str] = []
  frame_ids = np.asarray(record["frame_id"]).reshape(-1)
  if any(k not in out for k in METADATA_FIELDS):
    meta = frame_metadata(data_dir, frame_ids)
    out.update({k: v for k, v in meta.items() if k not in out})
  if "pred_kp_3d" in out:
    if "angle_error" not in out or "angle_error_prior" not in out:
      out.update({k: v for k, v in angle_error_fields(out).items() if k not in out})
    if "finger_visibility" not in out and model is not None and face_labels is not None:
      out["finger_visibility"], problems = finger_visibility_field(data_dir, frame_ids, model,
                                                                   face_labels)
  return out, problems


def _annotations_dir(data_dir: str) -> str | None:
  """The folder whose annotation files visibility reads: data_dir, or for a packed ArrayRecord
  folder the source folder it was packed from (None when that is gone)."""
  pack = os.path.join(data_dir, array_record.PACK_INDEX)
  if not os.path.exists(pack):
    return data_dir
  with open(pack, encoding="utf-8") as f:
    source = json.load(f).get("source", "")
  return source if source and os.path.isdir(source) else None


def with_test_fields(record: dict[str, np.ndarray], config, model=None) -> dict[str, np.ndarray]:
  """The test phase's record plus the analysis fields (config.analysis.frame_fields).

  Never fails the test phase: what cannot be computed is logged and left out (tools/report.py
  --data_dir computes it later). model: the MANO model of a pose task (None: no visibility).
  """
  if not config.analysis.frame_fields:
    return record
  try:
    labels = None
    folder = _annotations_dir(config.data.data_dir)
    if model is not None and folder is None:
      log.warning("finger visibility left out: %s is packed and its source folder is gone",
                  config.data.data_dir)
      model = None
    if model is not None:
      labels = (visibility.load_face_labels(config.analysis.face_labels, len(model.faces))
                if config.analysis.face_labels else visibility.generate_face_labels(model))
    start = time.perf_counter()
    out, problems = add_fields(record, folder or config.data.data_dir, model, labels)
    log.info("analysis fields of %d test frames in %.1f s", len(out["frame_id"]),
             time.perf_counter() - start)
    for problem in problems[:20]:
      log.warning("finger visibility skipped: %s", problem)
    if len(problems) > 20:
      log.warning("... and %d more frames without finger visibility", len(problems) - 20)
    return out
  except (OSError, KeyError, ValueError) as e:  # DatasetFormatError is a ValueError
    log.warning("test outputs written without the analysis fields (%s); tools/report.py "
                "--data_dir DATA adds them", e)
    return record
