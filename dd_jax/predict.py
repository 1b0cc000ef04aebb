r"""Runs a trained pose or force network on image files: JSON per frame, overlay PNGs, latency.

  python -m dd_jax.predict --checkpoint runs/demo --image frame.jpg --base base.jpg \
      --hamer frame_hamer.npy --out predictions/
  python -m dd_jax.predict --checkpoint runs/demo --image crops/ --base bases/ --hamer hamer/ \
      [--base_hamer base_hamer.npy] --out predictions/
  python -m dd_jax.predict --checkpoint /ckpt/deltadorsal_pose --config configs/pose.py \
      --mano MANO_RIGHT.pkl --image crops/ --base base.jpg --out predictions/

Pairing (`pair_files`): --image is one image file or a folder of them (.jpg .jpeg .png .bmp
.tif .tiff .webp, not recursive), each frame named by its file stem. --base is one file that
serves every frame, or a folder holding an image with each frame's stem. --hamer (the frame's
HaMeR prior) is a .npy file (single image only) or a folder holding <stem>.npy for every frame;
--base_hamer (the base image's HaMeR file, whose betas[0] the trainer uses as hand shape) is a
file for every frame or a folder holding <base stem>.npy. A missing partner is an error that
lists the frames concerned. Writes OUT/<stem>.json and OUT/<stem>.png per frame and
OUT/predict_summary.json; prints each frame's network latency (batch 1, after a warm-up
compile) and a summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

import cv2
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dd_jax import inference
from dd_jax.convert import lightning
from dd_jax.data import store
from dd_jax.viz import overlays

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SUMMARY_FILE = "predict_summary.json"
POSE_FORMAT = ("15 axis-angle rotations (radians) of MANO's finger joints in MANO order (index "
               "1-3, middle 1-3, pinky 1-3, ring 1-3, thumb 1-3), flat hand mean")
KEYPOINTS_FORMAT = ("21 OpenPose keypoints (0 wrist, 1-4 thumb, 5-8 index, 9-12 middle, 13-16 "
                    "ring, 17-20 pinky) in metres, computed as the trainer does: right-hand MANO "
                    "with zero global orientation and translation (MANO's own frame; the wrist is "
                    "not at the origin: subtract keypoint 0 for wrist-relative coordinates)")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One frame to predict: output name, image, base image and optional HaMeR files."""
  name: str
  image: str
  base: str
  hamer: str | None = None
  base_hamer: str | None = None


# ------------------------------------------------------------------------------ pairing


def _images_in(folder: str) -> dict[str, str]:
  """stem -> path of the image files directly in `folder`; two files with one stem are an error."""
  found: dict[str, str] = {}
  for entry in sorted(os.listdir(folder)):
    path = os.path.join(folder, entry)
    stem, ext = os.path.splitext(entry)
    if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
      if stem in found:
        raise ValueError(f"{folder}: two images named {stem!r} ({os.path.basename(found[stem])}, "
                         f"{entry}): frames are paired by file stem")
      found[stem] = path
  return found


def _partner(folder_or_file: str | None, stem: str, images: dict[str, str] | None,
             suffix: str) -> str | None:
  if folder_or_file is None:
    return None
  if images is not None:
    return images.get(stem)
  if os.path.isdir(folder_or_file):
    path = os.path.join(folder_or_file, stem + suffix)
    return path if os.path.isfile(path) else None
  return folder_or_file


def _require_exists(path: str | None, flag: str) -> None:
  if path is not None and not os.path.exists(path):
    raise FileNotFoundError(f"{flag} {path}: no such file or folder")


def pair_files(image: str, base: str, hamer: str | None = None,
               base_hamer: str | None = None) -> list[Pair]:
  """The frames to predict, by the pairing rules of this module's docstring."""
  for path, flag in ((image, "--image"), (base, "--base"), (hamer, "--hamer"),
                     (base_hamer, "--base_hamer")):
    _require_exists(path, flag)
  if os.path.isdir(image):
    frames = _images_in(image)
    if not frames:
      raise FileNotFoundError(f"--image {image}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
    if hamer is not None and not os.path.isdir(hamer):
      raise ValueError(f"--hamer {hamer}: with a folder of images, --hamer must be a folder of "
                       "<stem>.npy files (one prior per frame)")
  else:
    frames = {os.path.splitext(os.path.basename(image))[0]: image}
  if os.path.splitext(SUMMARY_FILE)[0] in frames:
    raise ValueError(f"a frame may not be named {os.path.splitext(SUMMARY_FILE)[0]!r} "
                     f"({SUMMARY_FILE} is the summary)")
  base_images = _images_in(base) if os.path.isdir(base) else None
  pairs, missing = [], []
  for stem, image_path in frames.items():
    base_path = _partner(base, stem, base_images, "")
    hamer_path = _partner(hamer, stem, None, ".npy")
    base_stem = os.path.splitext(os.path.basename(base_path))[0] if base_path else stem
    base_hamer_path = _partner(base_hamer, base_stem, None, ".npy")
    for path, given, what in ((base_path, base, f"a base image named {stem}.*"),
                              (hamer_path, hamer, f"{stem}.npy"),
                              (base_hamer_path, base_hamer, f"{base_stem}.npy")):
      if given is not None and path is None:
        missing.append(f"{image_path}: {given} has no {what}")
    pairs.append(Pair(stem, image_path, base_path, hamer_path, base_hamer_path))
  if missing:
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise FileNotFoundError("unpaired frames:\n  " + "\n  ".join(missing[:10]) + more)
  return pairs


# ------------------------------------------------------------------------------ one frame


def _shape_for(pair: Pair, prior: store.Prior | None,
               base_prior: store.Prior | None) -> tuple[np.ndarray, str]:
  if base_prior is not None and base_prior.betas is not None:
    return base_prior.betas, f"betas[0] of the base's HaMeR file {pair.base_hamer} (as the trainer)"
  if prior is not None and prior.betas is not None:
    return prior.betas, f"betas[0] of the frame's HaMeR file {pair.hamer}"
  return np.zeros(10, np.float32), "zeros (no HaMeR file with betas given)"


def predict_pair(predictor: inference.Predictor, pair: Pair, out_dir: str, *,
                 overlay: bool = True, base_priors: dict | None = None) -> dict:
  """Predicts one frame; writes OUT/<name>.json (and .png); returns the JSON record."""
  image = inference.read_image(pair.image)
  base = inference.read_image(pair.base)
  prior = inference.read_prior(pair.hamer) if pair.hamer else None
  record = {"frame": pair.name, "image": pair.image, "base": pair.base, "hamer": pair.hamer,
            "checkpoint": predictor.source, "task": predictor.task,
            "image_hw": list(image.shape[:2]), "network_input_size": predictor.image_size}
  if predictor.task == "force":
    result = predictor(image, base)
    record["forward_ms"] = result["forward_ms"]
    label = np.asarray(result["label"])
    names = list(inference.FORCE_CLASS_NAMES) if predictor.config.model.head.n_classes == len(
        inference.FORCE_CLASS_NAMES) else [str(k) for k in range(result["probabilities"].shape[-1])]
    record.update(label=label.tolist(), class_names=names,
                  class_name=(names[int(label)] if label.ndim == 0
                              else [names[int(k)] for k in label]),
                  probabilities=np.asarray(result["probabilities"]).tolist())
    if pair.hamer:
      record["note"] = "force models do not use the HaMeR prior"
    if overlay:
      p = np.asarray(result["probabilities"]).reshape(-1, len(names))
      lines = [f"class {int(k)}: {names[int(k)]} (p={p[g, int(k)]:.2f})"
               for g, k in enumerate(label.reshape(-1))]
      picture = overlays.force_overlay(image, lines)
      record["overlay"] = _write_png(out_dir, pair.name, picture)
    return _write_json(out_dir, pair.name, record)

  base_priors = {} if base_priors is None else base_priors
  base_prior = None
  if pair.base_hamer:
    if pair.base_hamer not in base_priors:
      base_priors[pair.base_hamer] = inference.read_prior(pair.base_hamer)
    base_prior = base_priors[pair.base_hamer]
  betas, shape_source = _shape_for(pair, prior, base_prior)
  result = predictor(image, base, prior, betas=betas)
  record.update(
      forward_ms=result["forward_ms"], base_hamer=pair.base_hamer,
      prior_pose_used=predictor.uses_prior,
      pose=result["pose"].tolist(), pose_format=POSE_FORMAT,
      keypoints=result["keypoints"].tolist(), keypoints_format=KEYPOINTS_FORMAT,
      betas=result["betas"].tolist(), shape_source=shape_source, mano=predictor.mano_source)
  if overlay:
    vertices, faces = predictor.hand_mesh(result["pose"][None], betas[None])
    prior_kp3d = prior_kp2d = None
    if prior is not None and prior.hand_pose is not None:
      prior_kp3d = np.asarray(predictor.keypoints(prior.hand_pose[None], betas[None]))[0]
      prior_kp2d = prior.keypoints_2d
    picture, how = overlays.pose_overlay(image, vertices[0], faces, result["keypoints"],
                                         prior_keypoints_3d=prior_kp3d,
                                         prior_keypoints_2d=prior_kp2d)
    record["overlay"] = _write_png(out_dir, pair.name, picture)
    record["overlay_placement"] = how
  return _write_json(out_dir, pair.name, record)


def _write_json(out_dir: str, name: str, record: dict) -> dict:
  with open(os.path.join(out_dir, name + ".json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  return record


def _write_png(out_dir: str, name: str, picture: np.ndarray) -> str:
  path = os.path.join(out_dir, name + ".png")
  if not cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
    raise OSError(f"{path}: could not write the overlay")
  return path


# ------------------------------------------------------------------------------ a whole run


def latency_summary(times_ms: list[float]) -> dict[str, float]:
  t = np.asarray(times_ms, np.float64)
  return {"frames": int(t.size), "mean_ms": float(t.mean()), "median_ms": float(np.median(t)),
          "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()), "max_ms": float(t.max())}


def run(checkpoint: str, image: str, base: str, out: str, *, hamer: str | None = None,
        base_hamer: str | None = None, config=None, mano_path: str | None = None,
        image_size: int | None = None, step: int | None = None, overlay: bool = True,
        backbone_dtype: str | None = None, echo: Callable[[str], None] = print) -> dict:
  """Pairs the files, loads the network, predicts every frame; returns the summary."""
  pairs = pair_files(image, base, hamer, base_hamer)
  predictor = inference.load(checkpoint, config=config, step=step, mano_path=mano_path,
                             image_size=image_size, backbone_dtype=backbone_dtype)
  if predictor.uses_prior:
    lacking = [p.image for p in pairs if p.hamer is None]
    if lacking:
      raise inference.PriorRequiredError(
          f"{predictor.source} was trained with model.head.use_prior=True: every frame needs its "
          f"HaMeR prior (--hamer FILE.npy, or a folder of <stem>.npy); none for {lacking[0]}"
          + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""))
  os.makedirs(out, exist_ok=True)
  echo(f"{predictor.source}: {predictor.task} network, input {predictor.image_size} px, "
       f"backbone {predictor.config.model.backbone.dtype}, "
       f"{len(pairs)} frame(s), device {jax.devices()[0]}")
  compile_s = predictor.warm_up(1)
  echo(f"warm-up compile: {compile_s:.2f} s")
  times, base_priors = [], {}
  for pair in pairs:
    record = predict_pair(predictor, pair, out, overlay=overlay, base_priors=base_priors)
    times.append(record["forward_ms"])
    what = (f"class {record['label']} ({record['class_name']})" if predictor.task == "force"
            else f"overlay: {record.get('overlay_placement', 'off')}")
    echo(f"{pair.name}: {record['forward_ms']:8.2f} ms  {what}")
  summary = dict(latency_summary(times), compile_s=compile_s, batch_size=1,
                 checkpoint=predictor.source, task=predictor.task,
                 network_input_size=predictor.image_size, device=str(jax.devices()[0]),
                 backbone_dtype=predictor.config.model.backbone.dtype,
                 note="network forward only (preprocessing, MANO and drawing excluded), "
                      "timed per frame after a warm-up compile")
  with open(os.path.join(out, SUMMARY_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  echo(f"{summary['frames']} frame(s): forward mean {summary['mean_ms']:.2f} ms, median "
       f"{summary['median_ms']:.2f} ms, p90 {summary['p90_ms']:.2f} ms (batch 1, "
       f"{summary['device']}); outputs in {out}")
  return summary


# ------------------------------------------------------------------------------ command line


def _define_flags() -> None:
  """Only when run as a program, so importing this module defines no absl flags."""
  flags.DEFINE_string("checkpoint", None, "dd_jax run folder, its checkpoints/ or one step "
                      "folder; or a converted original checkpoint (deltadorsal.json + params/).")
  flags.DEFINE_string("image", None, "Image file, or a folder of images (frames by file stem).")
  flags.DEFINE_string("base", None, "Base image file (for every frame) or folder (by stem).")
  flags.DEFINE_string("hamer", None, "Frame's HaMeR .npy, or a folder of <stem>.npy.")
  flags.DEFINE_string("base_hamer", None, "Base image's HaMeR .npy (hand shape = its betas[0], "
                      "as in training), or a folder of <base stem>.npy.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_string("mano", None, "MANO_RIGHT.pkl to use instead of the checkpoint's.")
  flags.DEFINE_integer("image_size", None, "Network input size instead of the checkpoint's.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: the best).")
  flags.DEFINE_bool("overlay", True, "Write the overlay PNGs.")
  flags.DEFINE_enum("backbone_dtype", None, ["float32", "bfloat16"], "Backbone compute dtype "
                    "instead of the checkpoint's (float32 is much faster on most CPUs).")
  config_flags.DEFINE_config_file("config", None, "Converted checkpoints only: configs/pose.py "
                                  "or configs/force.py (+ overrides); default: the model "
                                  "settings stored in deltadorsal.json.")
  flags.mark_flags_as_required(["checkpoint", "image", "base", "out"])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs each step of a read-only restore
  try:
    run(f.checkpoint, f.image, f.base, f.out, hamer=f.hamer, base_hamer=f.base_hamer,
        config=f.config, mano_path=f.mano, image_size=f.image_size, step=f.step,
        overlay=f.overlay, backbone_dtype=f.backbone_dtype)
  except (FileNotFoundError, ValueError, store.FrameLoadError,
          lightning.LightningConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
