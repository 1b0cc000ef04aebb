"""Raw frames in and overlay videos out: one image, a folder of images or a video file (read with
OpenCV) as a sequence of named RGB frames; a camera from --K / --d or a trials.json entry; and
an MP4 writer (OpenCV's VideoWriter, codec mp4v)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Iterator

import cv2
import numpy as np

from dd_jax.data import store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
VIDEO_CODEC = "mp4v"  # MPEG-4 Part 2: what opencv-python(-headless) wheels write to .mp4 here


class SourceError(ValueError):
  """A whole source cannot be read (a video OpenCV cannot open, a folder without images)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Frame:
  """One frame of a source: an RGB image, or why there is none."""
  index: int  # position in the source
  name: str  # file stem, or <video stem>_<index> (6 digits)
  image: np.ndarray | None  # (H, W, 3) uint8 RGB
  error: str = ""
  decode_s: float = 0.0  # seconds spent reading and decoding it


def _natural_key(name: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_video(path: str) -> bool:
  return os.path.isfile(path) and os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


class FrameSource:
  """The frames of an image file, a folder of images (in natural name order: frame_2 before
  frame_10) or a video; iterating yields Frames, bad ones carrying their error."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise SourceError(f"{path}: no such file or folder")
    self.path = path
    self.fps: float | None = None
    self._capture = None
    if os.path.isdir(path):
      self.kind = "folder"
      self.files = sorted((os.path.join(path, f) for f in os.listdir(path)
                           if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                           and os.path.isfile(os.path.join(path, f))),
                          key=lambda p: _natural_key(os.path.basename(p)))
      if not self.files:
        raise SourceError(f"{path}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
      stems = [os.path.splitext(os.path.basename(f))[0] for f in self.files]
      if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise SourceError(f"{path}: several images named {twice[:5]}: frames are named by stem")
      self.count = len(self.files)
    elif is_video(path):
      self.kind = "video"
      capture = cv2.VideoCapture(path)
      if not capture.isOpened():
        raise SourceError(f"{path}: OpenCV cannot open this video (not a video file, or no "
                          "decoder for its codec)")
      fps = capture.get(cv2.CAP_PROP_FPS)
      self.fps = float(fps) if np.isfinite(fps) and fps > 0 else None
      self.count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
      capture.release()
    else:
      self.kind = "image"
      self.files = [path]
      self.count = 1

  @property
  def stem(self) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]

  def __iter__(self) -> Iterator[Frame]:
    if self.kind == "video":
      yield from self._video_frames(None)
      return
    for i, path in enumerate(self.files):
      yield _read_image_file(i, path)

  def select(self, count: int) -> list[Frame]:
    """At most `count` frames spread evenly over the source (first and last included)."""
    n = self.count
    if n <= 0:  # a video without a frame count: its first frames
      return list(_take(iter(self), count))
    wanted = sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))
    if self.kind != "video":
      return [_read_image_file(i, self.files[i]) for i in wanted]
    return list(self._video_frames(set(wanted)))

  def _video_frames(self, wanted: set[int] | None) -> Iterator[Frame]:
    capture = cv2.VideoCapture(self.path)
    if not capture.isOpened():
      raise SourceError(f"{self.path}: OpenCV cannot open this video")
    index = 0
    try:
      while wanted is None or index <= max(wanted):
        start = time.perf_counter()
        ok, bgr = capture.read()
        name = f"{self.stem}_{index:06d}"
        if not ok:
          if index < self.count:  # the container promised more: a truncated or damaged file
            yield Frame(index, name, None, f"{self.path}: frame {index} could not be decoded; "
                        f"the video ends here ({index} of {self.count} frames read)")
          return
        if wanted is None or index in wanted:
          image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
          yield Frame(index, name, image, decode_s=time.perf_counter() - start)
        index += 1
    finally:
      capture.release()


def _take(iterator, count):
  for _, item in zip(range(count), iterator):
    yield item


def _read_image_file(index: int, path: str) -> Frame:
  start = time.perf_counter()
  name = os.path.splitext(os.path.basename(path))[0]
  try:
    image = store.decode_image(store.read_file(path, None, "image"), path, None)
  except store.FrameLoadError as e:
    return Frame(index, name, None, str(e))
  return Frame(index, name, image, decode_s=time.perf_counter() - start)


# ------------------------------------------------------------------------------ cameras


def parse_numbers(text: str, what: str) -> np.ndarray:
  """'[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]' (JSON) or 'a,b,c,...' -> float64 array."""
  try:
    value = json.loads(text) if text.strip().startswith("[") else [
        float(v) for v in text.split(",") if v.strip()]
    return np.asarray(value, np.float64)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: expected numbers (JSON or comma-separated), got {text!r} "
                     f"({e})") from None


def trial_camera(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
  """'trials.json:TRIAL_ID' -> (K, d, description) of that EgoDorsal trial."""
  path, _, trial_id = spec.rpartition(":")
  if not path or not trial_id.strip().lstrip("-").isdigit():
    raise ValueError(f"--trial {spec!r}: expected PATH/trials.json:TRIAL_ID")
  try:
    with open(path, encoding="utf-8") as f:
      trials = json.load(f)["trials"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--trial {path}: not a readable trials.json ({e})") from None
  for trial in trials:
    if isinstance(trial, dict) and trial.get("trial_id") == int(trial_id):
      if "K" not in trial or "d" not in trial:
        raise ValueError(f"{path}: trial {trial_id} has no K / d")
      return (np.asarray(trial["K"], np.float64), np.asarray(trial["d"], np.float64),
              f"trial {trial_id} of {path}")
  raise ValueError(f"{path}: no trial {trial_id}")


# ------------------------------------------------------------------------------ video out


class VideoOutput:
  """Frames (uint8 RGB, all one size) into an MP4 (codec mp4v) at `fps`."""

  def __init__(self, path: str, fps: float, size: tuple[int, int]):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path, self.size, self.frames = path, tuple(size), 0
    self._writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*VIDEO_CODEC), float(fps),
                                   self.size)
    if not self._writer.isOpened():
      raise SourceError(f"{path}: OpenCV cannot write an MP4 ({VIDEO_CODEC}) here")

  def write(self, rgb: np.ndarray) -> None:
    if (rgb.shape[1], rgb.shape[0]) != self.size:
      rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
    self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    self.frames += 1

  def close(self) -> None:
    self._writer.release()
