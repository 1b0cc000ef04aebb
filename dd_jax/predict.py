r"""Runs a trained pose or force network: on crops already aligned to their base (--image), on
raw camera frames (--frames: an image, a folder or a video, with HaMeR, the online alignment
and MANO end to end), or on a whole unlabelled EgoDorsal-layout set (--data_dir: every device of
every process, resumable). docs/inference.md.

  python -m dd_jax.predict --checkpoint runs/demo --hamer_weights /ckpt/hamer \
      --frames clip.mp4 --base neutral.mp4 [--K '[[...]]' --d k1,k2,p1,p2,k3] --out predictions/
  python -m dd_jax.predict --checkpoint runs/demo --hamer_weights /ckpt/hamer \
      --data_dir /data/egodorsal_unlabelled --out predictions/ [--per_device_batch 32]
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
compile) and a summary. The other modes write OUT/predictions.npz and predictions.jsonl
(dd_jax.full_frames.sequence / .dataset). Exit status 0, 3 when some frames failed, 1 on errors.
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
from dd_jax.convert import hamer as convert_hamer
from dd_jax.convert import lightning
from dd_jax.data import store
from dd_jax.full_frames import sources
from dd_jax.priors import job as priors_job
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
  flags.DEFINE_string("out", None, "Output folder.")
  # --- the three inputs (one of them)
  flags.DEFINE_string("image", None, "Crops already aligned to their base: an image file, or a "
                      "folder of images (frames by file stem).")
  flags.DEFINE_string("frames", None, "Raw camera frames: an image, a folder of images or a "
                      "video file (HaMeR, alignment and crop run here; needs --hamer_weights).")
  flags.DEFINE_string("data_dir", None, "An EgoDorsal-layout set (frames.json, no annotations "
                      "needed): every frame, on every device of every process, resumable.")
  flags.DEFINE_string("base", None, "--image: base image file (for every frame) or folder (by "
                      "stem). --frames: the neutral capture: an image, a folder or a video.")
  flags.DEFINE_string("hamer", None, "--image: the frame's HaMeR .npy, or a folder of <stem>.npy.")
  flags.DEFINE_string("base_hamer", None, "--image: the base image's HaMeR .npy (hand shape = "
                      "its betas[0], as in training), or a folder of <base stem>.npy.")
  # --- raw frames and datasets
  flags.DEFINE_string("hamer_weights", None, "HaMeR: a converted folder (tools/convert_hamer.py) "
                      "or HaMeR's .ckpt.")
  flags.DEFINE_string("hamer_variant", "hamer_vith", "Sizes of a .ckpt given to --hamer_weights.")
  flags.DEFINE_string("hamer_custom", "", "JSON size overrides for --hamer_variant custom.")
  flags.DEFINE_string("hamer_dtype", "float32", "HaMeR compute dtype (bfloat16 on accelerators).")
  flags.DEFINE_enum("base_choice", "first", ["first", "random"], "The base of a frame: the first "
                    "candidate with a usable hand, or one drawn per frame (seeded by its index / "
                    "frame_id), as the data pipeline's online mode allows.")
  # --- raw frames
  flags.DEFINE_string("K", None, "Camera matrix: JSON [[fx,0,cx],[0,fy,cy],[0,0,1]] or 9 numbers.")
  flags.DEFINE_string("d", None, "OpenCV distortion coefficients (JSON or comma-separated).")
  flags.DEFINE_string("trial", None, "K and d from an EgoDorsal trials.json: PATH:TRIAL_ID.")
  flags.DEFINE_string("boxes", None, "Hand boxes JSON {frame name: {box: [x0,y0,x1,y1], "
                      "is_right: true}} (names: file stems, or <video stem>_<6-digit index>).")
  flags.DEFINE_string("base_box", None, "Hand box x0,y0,x1,y1 in the base candidates.")
  flags.DEFINE_bool("track", True, "A frame without a box uses the box around the previous "
                    "frame's hand (else the whole image).")
  flags.DEFINE_integer("max_base_frames", 8, "Base candidates taken from a base folder / video.")
  flags.DEFINE_bool("smooth", False, "One-Euro filter on the pose and HaMeR's placement.")
  flags.DEFINE_float("smooth_min_cutoff", 1.0, "One-Euro cutoff (Hz) when still.")
  flags.DEFINE_float("smooth_beta", 0.5, "One-Euro speed gain (per rad/s; the wrist in dm/s).")
  flags.DEFINE_float("smooth_d_cutoff", 1.0, "One-Euro cutoff (Hz) of the speed estimate.")
  flags.DEFINE_float("fps", None, "Frame rate of a folder of frames (default 30).")
  flags.DEFINE_bool("save_mesh", False, "Write each predicted hand as OUT/meshes/<frame>.obj.")
  # --- datasets
  flags.DEFINE_string("split", "all", "--data_dir: frames.json ('all') or a split file's name.")
  flags.DEFINE_integer("per_device_batch", 8, "--data_dir: frames per device per batch.")
  flags.DEFINE_integer("workers", 4, "--data_dir: image-loading threads per process.")
  flags.DEFINE_bool("overwrite", False, "--data_dir: redo frames that have a result already.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection.")
  flags.DEFINE_integer("heartbeat_timeout_s", 100, "Seconds before a silent process is dead.")
  # --- all
  flags.DEFINE_string("mano", None, "MANO_RIGHT.pkl to use instead of the checkpoint's.")
  flags.DEFINE_integer("image_size", None, "Network input size instead of the checkpoint's.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run (default: the best).")
  flags.DEFINE_bool("overlay", True, "Write the overlays (PNGs, or an MP4 for a video).")
  flags.DEFINE_enum("backbone_dtype", None, ["float32", "bfloat16"], "Backbone compute dtype "
                    "instead of the checkpoint's (float32 is much faster on most CPUs).")
  config_flags.DEFINE_config_file("config", None, "Converted checkpoints only: configs/pose.py "
                                  "or configs/force.py (+ overrides); default: the model "
                                  "settings stored in deltadorsal.json.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def _raw_frames(f) -> int:
  """--frames: the sequence runner (dd_jax.full_frames.sequence)."""
  from dd_jax.full_frames import sequence, smoothing  # pylint: disable=import-outside-toplevel
  if f.base is None:
    raise ValueError("--frames needs --base (an image, a folder or a video of the neutral hand)")
  K, d, camera_source = _camera_flags(f)
  boxes = priors_job.load_boxes(f.boxes, "") if f.boxes else {}
  boxes = {os.path.splitext(os.path.basename(k))[0]: v for k, v in boxes.items()}
  settings = sequence.Settings(
      boxes=boxes, base_box=(None if f.base_box is None
                             else sources.parse_numbers(f.base_box, "--base_box").reshape(4)),
      track=f.track, base_choice=f.base_choice, max_base_frames=f.max_base_frames,
      smoothing=smoothing.OneEuroSettings(f.smooth_min_cutoff, f.smooth_beta,
                                          f.smooth_d_cutoff) if f.smooth else None,
      fps=f.fps, overlay=f.overlay, save_mesh=f.save_mesh)
  pipeline = inference.Pipeline.from_dirs(
      hamer=_required(f.hamer_weights, "--hamer_weights"), deltadorsal=f.checkpoint, mano=f.mano,
      hamer_variant=f.hamer_variant, hamer_dtype=f.hamer_dtype,
      hamer_custom=json.loads(f.hamer_custom) if f.hamer_custom else None, config=f.config,
      step=f.step, image_size=f.image_size, backbone_dtype=f.backbone_dtype)
  summary = sequence.run(pipeline, f.frames, f.base, f.out, K=K, d=d,
                         camera_source=camera_source, settings=settings)
  return 3 if summary["failed"] else 0


def _camera_flags(f) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """(K, d, where they came from) of --trial or --K / --d; None, None without them."""
  if f.trial:
    if f.K or f.d:
      raise ValueError("give either --trial or --K / --d, not both")
    return sources.trial_camera(f.trial)
  K = sources.parse_numbers(f.K, "--K") if f.K else None
  d = sources.parse_numbers(f.d, "--d") if f.d else None
  return K, d, "--K / --d"


def _required(value, flag):
  if not value:
    raise ValueError(f"{flag} is required here")
  return value


def _dataset(f) -> int:
  """--data_dir: the dataset job (dd_jax.full_frames.dataset), on every device of every process."""
  from dd_jax import parallel  # pylint: disable=import-outside-toplevel
  from dd_jax.full_frames import dataset  # pylint: disable=import-outside-toplevel
  from dd_jax.mano import io as mano_io  # pylint: disable=import-outside-toplevel
  from dd_jax.priors import predictor  # pylint: disable=import-outside-toplevel
  parallel.join_processes(f.coordinator_address, f.num_processes, f.process_id, f.distributed,
                        f.heartbeat_timeout_s)
  mesh = parallel.make_mesh()
  network = inference.load(f.checkpoint, config=f.config, step=f.step, mano_path=f.mano,
                           image_size=f.image_size, backbone_dtype=f.backbone_dtype, mesh=mesh)
  hamer = None
  if f.hamer_weights:
    hand = network.mano if network.mano is not None else mano_io.load_mano_or_synthetic(
        f.mano or network.config.mano.path)
    hamer, _ = predictor.HamerPredictor.from_weights(
        f.hamer_weights, hand, mesh, variant=f.hamer_variant, dtype=f.hamer_dtype,
        custom=json.loads(f.hamer_custom) if f.hamer_custom else None)
  options = dataset.Options(
      split=f.split, base_choice=f.base_choice, per_device_batch=f.per_device_batch,
      workers=f.workers, overwrite=f.overwrite,
      priors=priors_job.Options(per_device_batch=f.per_device_batch, workers=f.workers))
  report = dataset.run(f.data_dir, f.out, network, mesh, hamer, options)
  if jax.process_index() == 0:
    print(f"{report.predicted} frame(s) predicted, {report.skipped_existing} already done, "
          f"{len(report.failed)} failed, in {report.seconds:.1f} s; outputs in {f.out}")
  return 3 if report.failed else 0


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # Orbax logs each step of a read-only restore
  modes = [name for name in ("image", "frames", "data_dir") if getattr(f, name)]
  if len(modes) != 1:
    raise app.UsageError("give exactly one of --image (aligned crops), --frames (raw frames: an "
                         "image, a folder or a video) and --data_dir (an EgoDorsal-layout set)")
  try:
    if f.frames:
      return _raw_frames(f)
    if f.data_dir:
      return _dataset(f)
    if f.base is None:
      raise ValueError("--image needs --base")
    run(f.checkpoint, f.image, f.base, f.out, hamer=f.hamer, base_hamer=f.base_hamer,
        config=f.config, mano_path=f.mano, image_size=f.image_size, step=f.step,
        overlay=f.overlay, backbone_dtype=f.backbone_dtype)
  except (FileNotFoundError, ValueError, store.FrameLoadError,
          lightning.LightningConversionError, convert_hamer.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
