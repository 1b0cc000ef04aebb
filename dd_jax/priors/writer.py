"""The prior file: one HaMeR hand as the pickled `.npy` dict the EgoDorsal readers take
(dd_jax.data.store.parse_prior), written atomically. Keys (docs/hamer.md):

  hand_pose (1, 15, 3, 3), global_orient (1, 1, 3, 3)  rotation matrices; for a left hand,
      right-hand MANO parameters of the mirrored crop (as HaMeR outputs them)
  betas (1, 10)
  keypoints_3d (1, 21, 3)  MANO joints + smplx tips, OpenPose order, metres, model frame (no
      translation); x negated for a left hand (the hand as seen)
  cam_t (1, 3)             readers' convention: focal K[0,0]/256*max(w,h), centred principal point
  keypoints_2d (1, 21, 2)  full-image pixels: keypoints_3d + cam_t through that camera
  hamer_keypoints_2d (1, 21, 2)  HaMeR's own 2D keypoints (its crop camera), full-image pixels
  cam_t_fit_rms_px ()      how far keypoints_2d lie from hamer_keypoints_2d (RMS, pixels)
  focal_length ()          the readers' focal used for cam_t
  cam_t_full (1, 3), focal_length_full ()  HaMeR's demo convention (cam_crop_to_full, focal
      5000/256*max(w,h)) for x-negated left hands
  pred_cam (1, 3)          the network's crop camera (s, tx, ty)
  box_center (1, 2), box_size (), is_right (), box_source (str), image_size (2,) as (w, h)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dd_jax import safe_pickle, sharded_job
from dd_jax.priors import camera
from dd_jax.priors.preprocess import CropBox

BOX_SOURCES = ("boxes_json", "tracked", "whole_image")


def prior_dicts(outputs: dict[str, np.ndarray], boxes: list[CropBox], sources: list[str],
                widths: np.ndarray, heights: np.ndarray, fxs: np.ndarray) -> list[dict[str, Any]]:
  """A batch of hands' network outputs (global_orient (B,1,3,3), hand_pose (B,15,3,3), betas
  (B,10), pred_cam (B,3), keypoints_3d (B,21,3), keypoints_2d_crop (B,21,2)), their crop boxes,
  box sources, image sizes and K[0,0] -> one prior dict per hand (cameras fitted per hand)."""
  bad = sorted(set(sources) - set(BOX_SOURCES))
  if bad:
    raise ValueError(f"box sources {bad} are not among {BOX_SOURCES}")
  n = len(boxes)
  centers = np.stack([b.center for b in boxes]).astype(np.float64)
  sizes = np.array([b.size for b in boxes], np.float64)
  rights = np.array([b.is_right for b in boxes])
  widths, heights = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
  points = camera.mirror_x(outputs["keypoints_3d"], rights)
  seen_2d = camera.crop_keypoints_to_full(outputs["keypoints_2d_crop"], centers, sizes, rights)
  focal = camera.readers_focal(fxs, widths, heights)
  start = camera.cam_crop_to_full(outputs["pred_cam"], centers, sizes, widths, heights, focal,
                                  rights)
  cam_t = camera.fit_translation(points, seen_2d, focal, widths, heights, start)
  # What the readers will compute, from what they will read (float32).
  points32, cam_t32 = points.astype(np.float32), cam_t.astype(np.float32)
  keypoints_2d = camera.project(points32, cam_t32, focal, widths, heights)
  rms = np.sqrt(np.mean(np.sum((keypoints_2d - seen_2d) ** 2, -1), -1))
  focal_full = camera.hamer_full_focal(widths, heights)
  cam_t_full = camera.cam_crop_to_full(outputs["pred_cam"], centers, sizes, widths, heights,
                                       focal_full, rights)
  f32 = lambda x, shape: np.asarray(x, np.float32).reshape(shape)
  return [{
      "hand_pose": f32(outputs["hand_pose"][i], (1, 15, 3, 3)),
      "global_orient": f32(outputs["global_orient"][i], (1, 1, 3, 3)),
      "betas": f32(outputs["betas"][i], (1, 10)),
      "keypoints_3d": points32[i][None],
      "cam_t": cam_t32[i][None],
      "keypoints_2d": f32(keypoints_2d[i], (1, 21, 2)),
      "hamer_keypoints_2d": f32(seen_2d[i], (1, 21, 2)),
      "cam_t_fit_rms_px": np.float32(rms[i]),
      "focal_length": np.float32(focal[i]),
      "cam_t_full": f32(cam_t_full[i], (1, 3)),
      "focal_length_full": np.float32(focal_full[i]),
      "pred_cam": f32(outputs["pred_cam"][i], (1, 3)),
      "box_center": f32(boxes[i].center, (1, 2)),
      "box_size": np.float32(boxes[i].size),
      "is_right": np.float32(boxes[i].is_right),
      "box_source": sources[i],
      "image_size": np.array([widths[i], heights[i]], np.int32),
  } for i in range(n)]


def write_prior(path: str, prior: dict[str, Any]) -> None:
  """np.save of the dict (allow_pickle, as the EgoDorsal files are) to `path`, atomically
  (sharded_job.atomic_write): a reader or a killed run never sees a partial file."""
  sharded_job.atomic_write(path, lambda f: np.save(f, prior, allow_pickle=True))


def read_prior(path: str) -> dict[str, Any]:
  """A prior file as a dict (allowlisted unpickling: arrays, dicts, lists, scalars only)."""
  value = safe_pickle.load_npy(path)
  if not isinstance(value, dict):
    raise ValueError(f"{path}: a {type(value).__name__}, not a prior dict")
  return value
