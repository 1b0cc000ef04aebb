"""The make-priors job: a HaMeR prior file for every frame and base of an EgoDorsal folder, or
for every image of a plain folder (tools/make_priors.py is its command line; docs/hamer.md).

Work list: frames.json frames (their full frame `img_path`, undistorted with the trial's K, d as
the online mode does; or `cropped_img_path` when a frame has no full frame) and bases.json bases,
written to their `hamer_path`; or, without frames.json, every image under the folder, written to
`hamer/<stem>.npy` beside it. Hand boxes, per image: the boxes JSON; else tracked from the
previous frame of the same trial (the box around its prior's keypoints_2d, treated like the
demo's keypoint boxes); else the whole image. Tracking makes a trial sequential: images run in
waves (wave k holds the k-th untracked-box successors), each wave in fixed-size batches.

Every process builds the same plan; each global batch is split over all devices of all processes
and each process loads, and later writes, only the images of its own rows (every image exactly
once). Outputs and per-row metadata are gathered to every process, so all of them know every
prior a later wave tracks from. Existing outputs are skipped (resume; --overwrite redoes them),
files are replaced atomically, and an image that cannot be read is named, skipped and listed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from dd_jax import sharded_job
from dd_jax.data import align, egodorsal, store
from dd_jax.priors import preprocess, writer
from dd_jax.priors.predictor import OUTPUT_KEYS, HamerPredictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_FX = 5000.0  # images without intrinsics: the readers' focal is then HaMeR's own
REPORT_FILE = "make_priors_report.json"


@dataclasses.dataclass(frozen=True)
class Item:
  """One image to make a prior for."""
  name: str  # for messages: "frame 12", "participant 3 base 0", or the image's relative path
  image_path: str
  out_path: str
  fx: float  # K[0,0] of the camera (the readers' focal is fx/256*max(w,h))
  K: np.ndarray | None = dataclasses.field(default=None, compare=False)  # undistort with K, d
  d: np.ndarray | None = dataclasses.field(default=None, compare=False)
  sequence: int | None = None  # trial id of a full frame (tracking follows it)
  order: tuple = ()  # position in its trial


@dataclasses.dataclass(frozen=True)
class Options:
  rescale_factor: float = preprocess.DEMO_RESCALE_FACTOR
  default_is_right: bool = True  # whole-image boxes (and tracked ones without a known side)
  overwrite: bool = False
  per_device_batch: int = 8
  workers: int = 4  # image-loading threads per process
  progress_every_s: float = 10.0


# ---------------------------------------------------------------------------------------------
# What to do
# ---------------------------------------------------------------------------------------------


def _frame_order(item: dict) -> tuple:
  return tuple(float(item[k]) for k in ("frame_no", "timestamp", "frame_id")
               if isinstance(item.get(k), (int, float)))


def egodorsal_items(root: str, default_fx: float = DEFAULT_FX, *, split: str = "all",
                    prior_path: Callable[[Any], str | None] | None = None
                    ) -> tuple[list[Item], list[str]]:
  """Frames (frames.json, or a split file) and bases (bases.json) of an EgoDorsal folder ->
  (items, notes). prior_path(frame or base) says where its prior goes (default: its
  hamer_path; None skips it with a note)."""
  prior_path = prior_path or (lambda x: x.hamer_path)
  index = egodorsal.load_index(root)
  frames = egodorsal.select_frames(index, split)
  raw = egodorsal.read_json(egodorsal.split_file(index.root, split), []) or {}
  order = {int(f["frame_id"]): _frame_order(f) for f in raw.get("frames", [])
           if isinstance(f.get("frame_id"), int)}
  items, notes = [], []
  for frame in frames:
    trial = index.trials[frame.trial_id]
    out_path = prior_path(frame)
    if out_path is None:
      notes.append(f"frame {frame.frame_id}: no hamer_path in frames.json; skipped")
      continue
    if frame.img_path is not None:
      items.append(Item(f"frame {frame.frame_id}", frame.img_path, out_path,
                        float(trial.K[0, 0]), trial.K, trial.d, frame.trial_id,
                        order.get(frame.frame_id, (frame.frame_id,))))
    elif frame.cropped_img_path is not None:  # precropped-only set: the crop is the image
      items.append(Item(f"frame {frame.frame_id}", frame.cropped_img_path, out_path,
                        float(trial.K[0, 0])))
    else:
      notes.append(f"frame {frame.frame_id}: neither img_path nor cropped_img_path; skipped")
  first_trial = {}
  for trial in sorted(index.trials.values(), key=lambda t: t.trial_id):
    first_trial.setdefault(trial.p_id, trial)
  for p_id, bases in sorted(index.bases.items()):
    trial = first_trial.get(p_id)
    if trial is None:
      notes.append(f"participant {p_id}: no trial, so no intrinsics: bases use fx {default_fx} "
                   "and no undistortion")
    for base in bases:
      items.append(Item(f"participant {p_id} base {base.base_id}", base.img_path,
                        prior_path(base), float(trial.K[0, 0]) if trial else default_fx,
                        trial.K if trial else None, trial.d if trial else None))
  return items, notes


def folder_items(root: str, default_fx: float = DEFAULT_FX) -> list[Item]:
  """Every image under `root` (not under hamer/ folders) -> hamer/<stem>.npy beside it."""
  items = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d != "hamer")
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() in IMAGE_EXTENSIONS:
        path = os.path.join(directory, name)
        items.append(Item(os.path.relpath(path, root), path,
                          os.path.join(directory, "hamer", stem + ".npy"), default_fx))
  return items


def list_items(root: str, default_fx: float = DEFAULT_FX) -> tuple[list[Item], list[str]]:
  root = os.path.abspath(root)
  if os.path.exists(os.path.join(root, "frames.json")):
    return egodorsal_items(root, default_fx)
  return folder_items(root, default_fx), []


def load_boxes(path: str, root: str) -> dict[str, tuple[np.ndarray, bool]]:
  """A boxes JSON: {"<image path, relative to the data folder or absolute>": {"box": [x0, y0,
  x1, y1], "is_right": true}, ...} -> {absolute path: (box, is_right)}."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected an object mapping image paths to boxes")
  boxes, problems = {}, []
  for key, value in data.items():
    try:
      box = np.asarray(value["box"], np.float64).reshape(4)
      boxes[os.path.normpath(os.path.join(root, key))] = (box, bool(value.get("is_right", True)))
    except (TypeError, KeyError, ValueError) as e:
      problems.append(f"{key!r}: {value!r:.80} ({type(e).__name__}: {e})")
  if problems:
    raise ValueError(f"{path}: {len(problems)} bad entries (expected {{\"box\": [x0, y0, x1, y1], "
                     "\"is_right\": true}):\n  " + "\n  ".join(problems))
  return boxes


@dataclasses.dataclass
class Plan:
  items: list[Item]  # every image, in a fixed order
  todo: list[int]  # indices of the images to run
  waves: list[list[int]]  # todo, grouped by tracking depth, each in a fixed order
  previous: dict[int, int]  # tracked image -> the image its box comes from
  skipped_existing: int


def make_plan(items: list[Item], boxes: dict, overwrite: bool) -> Plan:
  todo = [i for i, item in enumerate(items) if overwrite or not os.path.exists(item.out_path)]
  previous: dict[int, int] = {}
  sequences: dict[int, list[int]] = {}
  for i, item in enumerate(items):
    if item.sequence is not None:
      sequences.setdefault(item.sequence, []).append(i)
  for members in sequences.values():
    members.sort(key=lambda i: (items[i].order, i))
    for before, after in zip(members, members[1:]):
      if items[after].image_path not in boxes:
        previous[after] = before
  wave: dict[int, int] = {}
  pending = set(todo)
  for i in sorted(todo, key=lambda i: (items[i].sequence is None, items[i].sequence or 0,
                                       items[i].order, i)):
    prev = previous.get(i)
    wave[i] = wave[prev] + 1 if prev is not None and prev in pending else 0
  waves = [[] for _ in range(max(wave.values(), default=-1) + 1)]
  for i in todo:
    waves[wave[i]].append(i)
  return Plan(items, todo, waves, previous, len(items) - len(todo))


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def tracked_box(prior: dict | None) -> tuple[np.ndarray, bool] | None:
  """The box around a prior's keypoints_2d and its hand side, or None if unusable."""
  if prior is None:
    return None
  try:
    points = np.asarray(prior["keypoints_2d"], np.float64).reshape(21, 2)
  except (KeyError, TypeError, ValueError):
    return None
  if not np.all(np.isfinite(points)):
    return None
  box = np.concatenate([points.min(0), points.max(0)])
  if box[2] - box[0] < 1 or box[3] - box[1] < 1:
    return None
  return box, bool(np.asarray(prior.get("is_right", 1.0)).reshape(-1)[0] > 0.5)


def hand_crop(image: np.ndarray, box: tuple[np.ndarray, bool] | None, track_from: dict | None,
              options: Options, image_size: int
              ) -> tuple[np.ndarray, preprocess.CropBox, str]:
  """An (undistorted) RGB image -> (HaMeR's input crop, its CropBox, box source): the given
  (box, is_right); else the box around `track_from`'s keypoints_2d; else the whole image."""
  height, width = image.shape[:2]
  if box is not None:
    crop_box = preprocess.crop_box(box[0], box[1], options.rescale_factor)
    source = "boxes_json"
  elif (tracked := tracked_box(track_from)) is not None:
    crop_box = preprocess.crop_box(tracked[0], tracked[1], options.rescale_factor)
    source = "tracked"
  else:
    crop_box = preprocess.crop_box([0, 0, width, height], options.default_is_right, 1.0)
    source = "whole_image"
  return preprocess.hamer_input(image, crop_box, image_size), crop_box, source


def prepare(item: Item, boxes: dict, track_from: dict | None, options: Options,
            undistort: align.Undistorter, image_size: int
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Reads, undistorts and crops one image -> ({crops}, metadata); any problem raises
  sharded_job.Skip naming the image."""
  try:
    image = store.decode_image(store.read_file(item.image_path, None, "image"), item.image_path,
                               None)
    if item.K is not None and item.d is not None:
      image = undistort(image, item.K, item.d)
    crop, crop_box, source = hand_crop(image, boxes.get(item.image_path), track_from, options,
                                       image_size)
  except store.FrameLoadError as e:
    raise sharded_job.Skip(f"{item.name}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except  # cv2, a bad box: name it, go on
    raise sharded_job.Skip(f"{item.name}: {item.image_path}: {type(e).__name__}: {e}") from None
  height, width = image.shape[:2]
  return {"crops": crop}, _meta(width, height, crop_box, source)


def _meta(width: int, height: int, box: preprocess.CropBox | None, source: str
          ) -> dict[str, np.ndarray]:
  return {"width": np.int32(width), "height": np.int32(height),
          "center": (np.zeros(2, np.float32) if box is None
                     else np.asarray(box.center, np.float32)),
          "size": np.float32(0 if box is None else box.size),
          "is_right": np.bool_(box is not None and box.is_right),
          "source": np.int32(_SOURCES.index(source))}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  total: int = 0
  skipped_existing: int = 0
  written: int = 0
  by_source: dict[str, int] = dataclasses.field(
      default_factory=lambda: {s: 0 for s in writer.BOX_SOURCES})
  failed: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0


_SOURCES = ("",) + writer.BOX_SOURCES


def run(root: str, predictor: HamerPredictor, options: Options, *, boxes_path: str | None = None,
        default_fx: float = DEFAULT_FX, log: Callable[[str], None] = print) -> Report:
  """Makes every missing prior under `root`; returns the report (the same on every process)."""
  root = os.path.abspath(root)
  items, notes = list_items(root, default_fx)
  if boxes_path is None and os.path.exists(os.path.join(root, "boxes.json")):
    boxes_path = os.path.join(root, "boxes.json")
  boxes = load_boxes(boxes_path, root) if boxes_path else {}
  where = f"under {root}" + (f"; boxes from {boxes_path} ({len(boxes)})" if boxes_path else "")
  return make_priors(items, predictor, options, boxes=boxes, notes=notes, where=where, log=log)


def make_priors(items: list[Item], predictor: HamerPredictor, options: Options, *,
                boxes: dict | None = None, notes: list[str] | None = None, where: str = "",
                log: Callable[[str], None] = print) -> Report:
  """Writes the prior of every item whose out_path is missing (all with options.overwrite);
  returns the report (the same on every process)."""
  start = time.perf_counter()
  boxes = boxes or {}
  plan = make_plan(items, boxes, options.overwrite)
  report = Report(total=len(items), skipped_existing=plan.skipped_existing,
                  notes=list(notes or []))
  mesh = predictor.mesh
  global_batch = options.per_device_batch * mesh.size
  image_size = predictor.config.image_size
  first = jax.process_index() == 0
  if first:
    log(f"make_priors: {len(items)} images {where}: {len(plan.todo)} to do, "
        f"{plan.skipped_existing} already there; {len(plan.waves)} wave(s); global batch "
        f"{global_batch} over {mesh.size} device(s) of {jax.process_count()} process(es)")
  if plan.todo:
    predictor.compile(global_batch)
  undistort = align.Undistorter()
  tracked: dict[int, dict] = {}  # image -> its prior, kept while a later image tracks from it
  needed = set(plan.previous.values())

  def track_source(i: int) -> dict | None:
    prev = plan.previous.get(i)
    if prev is None:
      return None
    if prev in tracked:
      return tracked[prev]
    try:
      return writer.read_prior(items[prev].out_path)
    except (OSError, ValueError):  # missing (failed earlier) or unreadable: whole image
      return None

  def finish(batch: sharded_job.Batch) -> None:
    meta = batch.meta
    used = []  # rows this process writes or a later wave tracks from
    for r, i in enumerate(batch.items):
      tracked.pop(plan.previous.get(i), None)  # each image is tracked from at most once
      if batch.errors[r]:
        report.failed.append(batch.errors[r])
        if first:
          log(f"skipped: {batch.errors[r]}")
        continue
      report.by_source[_SOURCES[int(meta["source"][r])]] += 1
      report.written += 1
      if r in batch.mine or i in needed:
        used.append((r, i))
    if not used:
      return
    rs = [r for r, _ in used]
    priors = writer.prior_dicts(
        {k: batch.outputs[k][rs] for k in OUTPUT_KEYS},
        [preprocess.CropBox(meta["center"][r], np.float32(meta["size"][r]),
                            bool(meta["is_right"][r])) for r in rs],
        [_SOURCES[int(meta["source"][r])] for r in rs], meta["width"][rs],
        meta["height"][rs], np.array([items[i].fx for _, i in used]))
    for (r, i), prior in zip(used, priors):
      if i in needed:
        tracked[i] = prior
      if r in batch.mine:
        writer.write_prior(items[i].out_path, prior)

  blank = ({"crops": np.zeros((image_size, image_size, 3), np.float32)},
           _meta(0, 0, None, ""))
  sharded_job.run(
      plan.waves, mesh=mesh, global_batch=global_batch,
      prepare=lambda i: prepare(items[i], boxes, track_source(i), options, undistort,
                                image_size),
      blank=blank, compute=lambda inputs: predictor(inputs["crops"]), finish=finish,
      workers=options.workers, progress_every_s=options.progress_every_s, unit="images", log=log)
  report.seconds = time.perf_counter() - start
  return report


def write_report(path: str, report: Report) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
