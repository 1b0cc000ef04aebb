"""The raw-input mode of dd_jax.predict: every frame of an image, a folder or a video, against a
base chosen from a neutral capture, through inference.Pipeline.

Writes predictions.npz (every frame, failed ones marked), predictions.jsonl (one line per frame,
written as it goes), overlays on the full frames (PNGs, or overlay.mp4 for a video), .obj meshes
(--save_mesh) and predict_summary.json (frames/s per stage, the camera, the base, failures).
Bad frames, a base without a usable hand and failed alignments are reported per frame; the run
goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np

from dd_jax import inference
from dd_jax.full_frames import smoothing, sources, stages
from dd_jax.viz import overlays

NPZ_FILE, JSONL_FILE, SUMMARY_FILE = "predictions.npz", "predictions.jsonl", "predict_summary.json"
VIDEO_FILE = "overlay.mp4"
DEFAULT_FPS = 30.0  # folders of frames, for smoothing and the timestamps
WRIST_UNIT_M = 0.1  # the wrist is smoothed in decimetres (about a hand length): one beta suits
# both it and the joint angles (radians)


@dataclasses.dataclass(frozen=True)
class Settings:
  boxes: dict = dataclasses.field(default_factory=dict)  # frame name -> (box, is_right)
  base_box: Any = None  # (x0, y0, x1, y1) of the hand in the base candidates
  track: bool = True  # a frame's box from the previous frame's hand
  base_choice: str = "first"  # "first" usable candidate, or "random" per frame (seeded by index)
  max_base_frames: int = 8  # candidates taken from a base folder / video, evenly spread
  smoothing: smoothing.OneEuroSettings | None = None
  fps: float | None = None  # frame rate of a folder (default DEFAULT_FPS; videos know theirs)
  overlay: bool = True
  save_mesh: bool = False


def choose_bases(pipeline: inference.Pipeline, path: str, K, d, settings: Settings,
                 echo: Callable[[str], None]) -> tuple[list[inference.Base], list[str]]:
  """The usable base candidates of an image / folder / video, and a note per rejected one."""
  candidates = sources.FrameSource(path).select(max(1, settings.max_base_frames))
  usable, notes = [], []
  for frame in candidates:
    if frame.image is None:
      notes.append(f"base candidate {frame.name}: {frame.error}")
      continue
    try:
      usable.append(pipeline.base(frame.image, K=K, d=d, box=settings.base_box,
                                  name=f"base {frame.name}"))
    except stages.PredictionError as e:
      notes.append(str(e))
  for note in notes:
    echo(f"rejected: {note}")
  return usable, notes


def _pick(usable: list[inference.Base], choice: str, index: int) -> inference.Base:
  if choice == "random":  # as the data pipeline's random_base at evaluation: seeded per frame
    return usable[int(np.random.default_rng(index).integers(len(usable)))]
  return usable[0]


class _Smoother:
  """One-Euro filters of the pose and of HaMeR's placement (orientation, wrist) of a sequence."""

  def __init__(self, settings: smoothing.OneEuroSettings):
    self.pose, self.orient, self.wrist = (smoothing.OneEuroFilter(settings) for _ in range(3))

  def __call__(self, pose, orient, wrist, t):
    return (self.pose(pose, t).astype(np.float32),
            smoothing.nearest_rotation(self.orient(orient, t)).astype(np.float32),
            (self.wrist(wrist / WRIST_UNIT_M, t) * WRIST_UNIT_M).astype(np.float32))


def _smoothed(pipeline: inference.Pipeline, record: dict, smoother: _Smoother, t: float) -> dict:
  """The record with its pose and placement filtered, and everything derived recomputed."""
  prior = stages.as_prior(record["prior"], "frame prior")
  camera = record["camera"]
  height, width = record["size"][1], record["size"][0]
  place, placeable = stages.placement([prior], [camera.K], [(width, height)])
  pose, orient, wrist = smoother(record["pose"], place.orient[0], place.wrist[0], t)
  if not placeable[0]:
    orient, wrist = place.orient[0], place.wrist[0]
  place = dataclasses.replace(place, orient=orient[None], wrist=wrist[None])
  out = {k: np.asarray(v)[0] for k, v in pipeline.network.place(pose[None],
                                                                record["betas"][None],
                                                                place).items()}
  return dict(record, pose=pose, keypoints_3d=out["keypoints_3d"],
              keypoints_cam=out["keypoints_cam"], vertices_cam=out["vertices_cam"],
              keypoints_2d=stages.to_raw_pixels(out["keypoints_2d"], camera))


ARRAY_KEYS = {"pose": (45,), "betas": (10,), "keypoints_3d": (21, 3), "keypoints_cam": (21, 3),
              "keypoints_2d": (21, 2), "prior_pose": (45,), "prior_keypoints_2d": (21, 2)}


def run(pipeline: inference.Pipeline, frames_path: str, base_path: str, out_dir: str, *,
        K=None, d=None, camera_source: str = "given", settings: Settings = Settings(),
        echo: Callable[[str], None] = print) -> dict:
  """Predicts every frame of `frames_path` against a base from `base_path`; returns the summary.
  K, d: the camera of both (None: the assumed camera, stages.ASSUMED_NOTE); camera_source: where
  they came from, for the summary."""
  start = time.perf_counter()
  source = sources.FrameSource(frames_path)  # SourceError when it cannot be read at all
  os.makedirs(out_dir, exist_ok=True)
  fps = source.fps or settings.fps or DEFAULT_FPS
  if K is None:
    echo(f"camera: {stages.ASSUMED_NOTE}")
  usable, base_notes = choose_bases(pipeline, base_path, K, d, settings, echo)
  base_error = "" if usable else ("no usable base in " + base_path + ": "
                                  + "; ".join(base_notes))
  task = pipeline.task
  smoother = (_Smoother(settings.smoothing) if settings.smoothing and task == "pose" else None)
  faces = (np.asarray(pipeline.network.mano.faces) if task == "pose" else None)
  video = None
  records, failures, decode_s = [], [], 0.0
  previous = None  # the last good frame's prior dict: where tracking looks for the hand
  jsonl = open(os.path.join(out_dir, JSONL_FILE), "w", encoding="utf-8")
  try:
    for frame in source:
      decode_s += frame.decode_s
      t = frame.index / fps
      record: dict[str, Any] = {"frame": frame.name, "index": frame.index, "time_s": t}
      try:
        if frame.image is None:
          raise stages.PredictionError(frame.error)
        if base_error:
          raise stages.PredictionError(base_error)
        base = _pick(usable, settings.base_choice, frame.index)
        result = pipeline(frame.image, base, K=K, d=d, box=settings.boxes.get(frame.name),
                          track_from=previous if settings.track else None)
        record.update(result, base=base.name, size=(frame.image.shape[1], frame.image.shape[0]),
                      box_source=result["prior"]["box_source"])
        if smoother is not None:
          record = _smoothed(pipeline, record, smoother, t)
        previous = result["prior"]
        record["valid"], record["error"] = True, ""
      except stages.PredictionError as e:
        record.update(valid=False, error=str(e))
        failures.append(f"{frame.name}: {e}")
        echo(f"{frame.name}: failed: {e}")
      records.append(record)
      jsonl.write(json.dumps(_json_record(record, task)) + "\n")
      jsonl.flush()
      if settings.overlay and frame.image is not None:
        picture = _overlay(frame.image, record, task, faces, pipeline)
        if source.kind == "video":
          if video is None:
            video = sources.VideoOutput(os.path.join(out_dir, VIDEO_FILE), fps,
                                        (picture.shape[1], picture.shape[0]))
          video.write(picture)
        else:
          overlays_dir = os.path.join(out_dir, "overlays")
          os.makedirs(overlays_dir, exist_ok=True)
          _write_png(os.path.join(overlays_dir, frame.name + ".png"), picture)
      if settings.save_mesh and record["valid"] and task == "pose":
        write_obj(os.path.join(out_dir, "meshes", frame.name + ".obj"), record["vertices_cam"],
                  faces)
  finally:
    jsonl.close()
    if video is not None:
      video.close()
  write_npz(os.path.join(out_dir, NPZ_FILE), records, task)
  total = time.perf_counter() - start
  timings = dict(pipeline.timings, decode=decode_s)
  summary = {
      "frames": len(records), "predicted": sum(r["valid"] for r in records),
      "failed": failures, "source": frames_path, "source_kind": source.kind, "fps": fps,
      "base": base_path, "base_choice": settings.base_choice,
      "bases_usable": [b.name for b in usable], "bases_rejected": base_notes,
      "camera": stages.ASSUMED_NOTE if K is None else camera_source,
      "task": task, "checkpoint": pipeline.network.source, "seconds": total,
      "frames_per_s": len(records) / max(total, 1e-9), "stage_seconds": timings,
      "smoothing": dataclasses.asdict(settings.smoothing) if smoother else None,
      "video": os.path.join(out_dir, VIDEO_FILE) if video is not None else None,
      "video_frames": video.frames if video is not None else 0}
  with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  echo(f"{summary['predicted']}/{summary['frames']} frame(s) predicted, {len(failures)} failed, "
       f"{summary['frames_per_s']:.2f} frames/s; outputs in {out_dir}")
  return summary


def _overlay(image, record, task, faces, pipeline) -> np.ndarray:
  if not record["valid"]:
    return overlays.full_frame_overlay(image, [f"{record['frame']}: failed",
                                               record["error"][:120]])
  camera = record["camera"]
  lines = [f"{record['frame']}: prediction (coloured), HaMeR prior (red)"]
  if task == "force":
    label = int(np.asarray(record["label"]).reshape(-1)[0])
    names = inference.FORCE_CLASS_NAMES
    name = names[label] if label < len(names) else str(label)
    p = float(np.asarray(record["probabilities"]).reshape(-1, record["probabilities"].shape[-1])[0,
                                                                                               label])
    lines = [f"{record['frame']}: class {label} {name} (p={p:.2f})"]
    return overlays.full_frame_overlay(image, lines,
                                       prior_keypoints_2d=record["prior_keypoints_2d"])
  width, height = record["size"]
  focal = float(np.asarray(record["prior"]["focal_length"])) if "focal_length" in record[
      "prior"] else stages.align.hamer_focal(camera.K, width, height)
  return overlays.full_frame_overlay(
      image, lines, keypoints_2d=record["keypoints_2d"],
      prior_keypoints_2d=record["prior_keypoints_2d"], vertices_cam=record["vertices_cam"],
      faces=faces, focal=focal, K=camera.K, d=camera.d)


def _write_png(path: str, rgb: np.ndarray) -> None:
  import cv2  # pylint: disable=import-outside-toplevel
  if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
    raise OSError(f"{path}: could not write the overlay")


def _json_record(record: dict, task: str) -> dict:
  out = {k: record[k] for k in ("frame", "index", "time_s", "valid", "error")}
  if not record["valid"]:
    return out
  out.update(base=record["base"], box_source=record["box_source"])
  keys = ["prior_pose", "prior_keypoints_2d"] + (
      ["pose", "betas", "keypoints_3d", "keypoints_cam", "keypoints_2d"] if task == "pose"
      else ["label", "probabilities"])
  out.update({k: np.asarray(record[k]).tolist() for k in keys})
  if task == "force":
    label = np.asarray(record["label"]).reshape(-1)
    out["class_name"] = [inference.FORCE_CLASS_NAMES[int(k)]
                         if int(k) < len(inference.FORCE_CLASS_NAMES) else str(int(k))
                         for k in label]
  return out


def write_npz(path: str, records: list[dict], task: str) -> None:
  """Every frame in order: frame, index, time_s, valid, error, and the arrays (NaN where a frame
  failed): pose models ARRAY_KEYS, force models label (-1 where failed), probabilities."""
  n = len(records)
  arrays: dict[str, np.ndarray] = {
      "frame": np.array([r["frame"] for r in records], dtype=str),
      "index": np.array([r["index"] for r in records], np.int64),
      "time_s": np.array([r["time_s"] for r in records], np.float64),
      "valid": np.array([r["valid"] for r in records], bool),
      "error": np.array([r["error"] for r in records], dtype=str)}
  keys = ARRAY_KEYS if task == "pose" else {k: ARRAY_KEYS[k] for k in ("prior_pose",
                                                                       "prior_keypoints_2d")}
  for key, shape in keys.items():
    arrays[key] = np.full((n,) + shape, np.nan, np.float32)
    for i, r in enumerate(records):
      if r["valid"]:
        arrays[key][i] = r[key]
  if task == "force":
    valid = [r for r in records if r["valid"]]
    shape = np.asarray(valid[0]["probabilities"]).shape if valid else (0,)
    arrays["label"] = np.full((n,) + shape[:-1], -1, np.int64)
    arrays["probabilities"] = np.full((n,) + shape, np.nan, np.float32)
    for i, r in enumerate(records):
      if r["valid"]:
        arrays["label"][i], arrays["probabilities"][i] = r["label"], r["probabilities"]
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def write_obj(path: str, vertices: np.ndarray, faces: np.ndarray) -> None:
  """A Wavefront .obj of one hand mesh (metres; faces 1-based)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in np.asarray(vertices, np.float64))
    f.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in np.asarray(faces, np.int64))
