"""Pose and force samples (SPEC.md §4) as Grain transforms: read, augment, finalise.

A sample travels through the pipeline as a dict: `ReadSample` turns a frame number into the
decoded, cropped and aligned uint8 images plus the label arrays; `Augment` (train only) and
`Finalize` make the model inputs. A frame whose content is bad raises FrameLoadError, or with
skip_bad_frames becomes a masked sample (valid=False) that carries its error for the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cv2
import grain
import numpy as np

from dd_jax.data import align
from dd_jax.data.egodorsal import MOTION_FINGERS, MOTION_LABELS, EgoDorsalIndex, Frame
from dd_jax.data.store import FrameLoadError, Prior, decode_image
from dd_jax.data.transforms import AugmentConfig, augment, resize_square, to_model_input

PADDING = -1  # frame number of an eval padding element
ERROR_BYTES = 400  # room for a bad frame's message inside the sample (stripped from batches)


class MotionTypeError(ValueError):
  """A force trial's motion type has no label."""


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  task: str  # "pose" | "force"
  precropped: bool
  random_base: bool
  fsr_thresh: float
  out_img_size: int
  skip_bad_frames: bool


def motion_label(trial) -> tuple[int, np.ndarray]:
  """(tap class for a press, per-finger activation (5,)) of a force trial."""
  if trial.motion_type not in MOTION_LABELS:
    raise MotionTypeError(f"trial {trial.trial_id} (participant {trial.p_id}): unknown motion "
                          f"type '{trial.motion_type}' (known: {sorted(MOTION_LABELS)})")
  return MOTION_LABELS[trial.motion_type], np.asarray(MOTION_FINGERS[trial.motion_type],
                                                      np.float32)


def tap_label(frame, trial, fsr_thresh: float) -> int:
  """0 (no press) when the FSR reads below fsr_thresh, else the trial's motion class."""
  label, _ = motion_label(trial)
  return 0 if float(frame.fsr_reading) < fsr_thresh else label


def _require(prior: Prior, field: str, path_hint: str, frame_id: int):
  value = getattr(prior, field)
  if value is None:
    raise FrameLoadError(frame_id, path_hint, f"the HaMeR dict has no '{field}'")
  return value


class SampleReader:
  """frame number -> sample dict with uint8 crops (the expensive, random-access part)."""

  def __init__(self, index: EgoDorsalIndex, frames: Sequence[Frame], store, options: SampleOptions):
    self.index = index
    self.frames = list(frames)
    self.store = store
    self.options = options
    self._undistort = align.Undistorter()

  def __len__(self) -> int:
    return len(self.frames)

  def read(self, number: int, rng: np.random.Generator | None) -> dict[str, Any]:
    """The sample of self.frames[number]; `rng` picks the online base (None: per-frame seed)."""
    if number == PADDING:
      return self.placeholder(-1)
    frame = self.frames[number]
    try:
      return self._read(frame, rng)
    except (FrameLoadError, align.AlignmentError, cv2.error) as e:
      if isinstance(e, align.AlignmentError):
        e = FrameLoadError(frame.frame_id, frame.hamer_path or "<frame>", f"alignment: {e}")
      elif isinstance(e, cv2.error):
        e = FrameLoadError(frame.frame_id, frame.img_path or "<frame>",
                           f"OpenCV failed on this frame: {e}")
      if not self.options.skip_bad_frames:
        raise e
      # The report adds "frame N: " itself.
      return self.placeholder(frame.frame_id, f"{e.path}: {e.reason}",
                              self.index.trials[frame.trial_id].p_id)

  def placeholder(self, frame_id: int, error: str = "", p_id: int = -1) -> dict[str, Any]:
    return placeholder(self.options.task, frame_id, error, p_id)

  def _read(self, frame: Frame, rng: np.random.Generator | None) -> dict[str, Any]:
    trial = self.index.trials[frame.trial_id]
    fid, store = frame.frame_id, self.store
    if self.options.task == "force":
      label, fingers = motion_label(trial)
      if frame.fsr_reading is None:
        raise FrameLoadError(fid, "<frames.json>", "force sample without 'fsr_reading'")
    prior = store.frame_prior(frame)
    hamer_pose = _require(prior, "hand_pose", frame.hamer_path, fid)

    if self.options.precropped:
      if frame.cropped_base_idx is None:
        raise FrameLoadError(fid, "<frames.json>", "precropped mode needs 'cropped_base_idx'")
      base_idx = frame.cropped_base_idx
    else:
      n_bases = len(self.index.bases.get(trial.p_id, []))
      if n_bases == 0:
        raise FrameLoadError(fid, "bases.json", f"participant {trial.p_id} has no base")
      if self.options.random_base:
        # Eval has no rng: a per-frame seed keeps its base choice fixed from run to run.
        rng = rng if rng is not None else np.random.default_rng(fid)
        base_idx = int(rng.integers(n_bases))
      else:
        base_idx = 0
    base_prior = store.base_prior(trial.p_id, base_idx, fid)
    if hasattr(store, "crops"):  # packed crops (tools/pack_array_record.py --image_size)
      img, base_img, prior_kp2d = store.crops(frame, base_idx)
    elif self.options.precropped:
      img, base_img, prior_kp2d = precropped_crops(store, frame, prior)
    else:
      img, base_img, prior_kp2d = self._align_online(frame, trial, base_idx, prior, base_prior)

    shape = _require(base_prior, "betas", store.base_name(trial.p_id, base_idx), fid)
    sample = {"img": img, "base_img": base_img, "hamer_pose": hamer_pose, "hamer_shape": shape,
              "frame_id": np.int64(fid), "p_id": np.int32(trial.p_id), "valid": np.bool_(True),
              "load_error": _encode_error("")}
    if self.options.task == "pose":
      sample["gt_pose"] = store.frame_ground_truth(frame)
      sample["prior_kp2d"] = (np.full((21, 2), np.nan, np.float32) if prior_kp2d is None
                              else np.asarray(prior_kp2d, np.float32))
    else:
      fsr = float(frame.fsr_reading)
      sample["tap_label"] = np.int32(tap_label(frame, trial, self.options.fsr_thresh))
      sample["force"] = (fsr * fingers).astype(np.float32)
      sample["fsr"] = np.float32(fsr)
    return sample

  def _align_online(self, frame: Frame, trial, base_idx: int, prior: Prior, base_prior: Prior):
    fid = frame.frame_id
    img_bytes, img_path = self.store.frame_image(frame, "img")
    base_bytes, base_path = self.store.base_image(trial.p_id, base_idx, fid)
    img = self._undistort(decode_image(img_bytes, img_path, fid), trial.K, trial.d)
    base_img = self._undistort(decode_image(base_bytes, base_path, fid), trial.K, trial.d)
    return online_crops(img, base_img, trial.K, frame, prior, base_prior,
                        self.store.base_name(trial.p_id, base_idx))


def precropped_crops(store, frame: Frame, prior: Prior):
  """(frame crop, base crop, prior keypoints in crop pixels or None) of a precropped frame."""
  fid = frame.frame_id
  img = decode_image(*store.frame_image(frame, "cropped_img"), fid)
  base_img = decode_image(*store.frame_image(frame, "cropped_base"), fid)
  return img, base_img, align.place_prior_keypoints(prior.keypoints_2d, img.shape[1],
                                                    img.shape[0])[0]


def online_crops(img: np.ndarray, base_img: np.ndarray, K: np.ndarray, frame: Frame,
                 prior: Prior, base_prior: Prior, base_name: str):
  """align.online_crops with the priors' keypoints (a missing one a FrameLoadError): (frame
  crop, aligned base crop, prior keypoints in crop pixels); raises AlignmentError."""
  fid = frame.frame_id
  img, base_img, alignment = align.online_crops(
      K, img, base_img, _require(prior, "keypoints_3d", frame.hamer_path, fid),
      _require(prior, "cam_t", frame.hamer_path, fid),
      _require(base_prior, "keypoints_3d", base_name, fid),
      _require(base_prior, "cam_t", base_name, fid))
  x0, _, y0, _ = alignment.box
  return img, base_img, alignment.frame_keypoints - (x0, y0)


def placeholder(task: str, frame_id: int, error: str = "", p_id: int = -1) -> dict[str, Any]:
  """A masked sample (padding or a skipped bad frame): zero images, valid=False."""
  sample = {"img": np.zeros((2, 2, 3), np.uint8), "base_img": np.zeros((2, 2, 3), np.uint8),
            "hamer_pose": np.zeros(45, np.float32), "hamer_shape": np.zeros(10, np.float32),
            "frame_id": np.int64(frame_id), "p_id": np.int32(p_id), "valid": np.bool_(False),
            "load_error": _encode_error(error)}
  if task == "pose":
    sample["gt_pose"] = np.zeros(45, np.float32)
    sample["prior_kp2d"] = np.full((21, 2), np.nan, np.float32)
  else:
    sample.update(tap_label=np.int32(0), force=np.zeros(5, np.float32), fsr=np.float32(0))
  return sample


def batch_shapes(task: str, batch_size: int, image_size: int, uint8_images: bool
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the batches the loaders hand the steps (load_error stripped):
  images (B, S, S, 3), uint8 with data.augment_on_device, else float32 model inputs."""
  shapes = {k: ((batch_size, *np.shape(v)), np.asarray(v).dtype)
            for k, v in placeholder(task, PADDING).items() if k != "load_error"}
  image = ((batch_size, image_size, image_size, 3), np.dtype(np.uint8 if uint8_images
                                                              else np.float32))
  return dict(shapes, img=image, base_img=image)


def _encode_error(message: str) -> np.ndarray:
  data = message.encode("utf-8", "replace")[:ERROR_BYTES]
  return np.frombuffer(data.ljust(ERROR_BYTES, b"\0"), np.uint8).copy()


def decode_error(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


# ------------------------------------------------------------------ Grain transforms


class ReadSample(grain.transforms.Map):
  """Eval: frame number -> sample (online base choice seeded by the frame id)."""

  def __init__(self, reader: SampleReader):
    self.reader = reader

  def map(self, number: int) -> dict[str, Any]:
    return self.reader.read(int(number), None)


class ReadSampleRandom(grain.transforms.RandomMap):
  """Train: frame number -> sample, the online base drawn from the element's rng."""

  def __init__(self, reader: SampleReader):
    self.reader = reader

  def random_map(self, number: int, rng: np.random.Generator) -> dict[str, Any]:
    return self.reader.read(int(number), rng)


class Augment(grain.transforms.RandomMap):
  """Photometric augmentation drawn independently for the current and the base image."""

  def __init__(self, config: AugmentConfig = AugmentConfig()):
    self.config = config

  def random_map(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if not sample["valid"]:
      return sample
    return dict(sample, img=augment(sample["img"], rng, self.config),
                base_img=augment(sample["base_img"], rng, self.config))


class Finalize(grain.transforms.Map):
  """Resize to out_img_size and normalise (uint8: resize only, the step normalises on the
  device); masked samples get zero images. The prior's 2D keypoints (pose samples: crop
  pixels, NaN where unknown) follow the resize."""

  def __init__(self, size: int, uint8: bool = False):
    self.size = size
    self.uint8 = uint8

  def map(self, sample: dict[str, Any]) -> dict[str, Any]:
    if not sample["valid"]:
      zeros = np.zeros((self.size, self.size, 3), np.uint8 if self.uint8 else np.float32)
      return dict(sample, img=zeros, base_img=zeros)
    finish = resize_square if self.uint8 else to_model_input
    out = dict(sample, img=finish(sample["img"], self.size),
               base_img=finish(sample["base_img"], self.size))
    if "prior_kp2d" in sample:
      height, width = sample["img"].shape[:2]
      scale = np.array([self.size / width, self.size / height], np.float32)
      out["prior_kp2d"] = (sample["prior_kp2d"] + 0.5) * scale - 0.5
    return out
