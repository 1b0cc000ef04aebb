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

import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from dd_jax import parallel
from dd_jax.data import align, egodorsal, store
from dd_jax.priors import preprocess, writer
from dd_jax.priors.predictor import OUTPUT_KEYS, HamerPredictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_FX = 5000.0  # images without intrinsics: the readers' focal is then HaMeR's own
ERROR_BYTES = 400
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


def egodorsal_items(root: str, default_fx: float = DEFAULT_FX) -> tuple[list[Item], list[str]]:
  """Frames (frames.json) and bases (bases.json) of an EgoDorsal folder -> (items, notes)."""
  index = egodorsal.load_index(root)
  frames = egodorsal.select_frames(index, "all")
  raw = egodorsal.read_json(egodorsal.split_file(index.root, "all"), []) or {}
  order = {int(f["frame_id"]): _frame_order(f) for f in raw.get("frames", [])
           if isinstance(f.get("frame_id"), int)}
  items, notes = [], []
  for frame in frames:
    trial = index.trials[frame.trial_id]
    if frame.hamer_path is None:
      notes.append(f"frame {frame.frame_id}: no hamer_path in frames.json; skipped")
      continue
    if frame.img_path is not None:
      items.append(Item(f"frame {frame.frame_id}", frame.img_path, frame.hamer_path,
                        float(trial.K[0, 0]), trial.K, trial.d, frame.trial_id,
                        order.get(frame.frame_id, (frame.frame_id,))))
    elif frame.cropped_img_path is not None:  # precropped-only set: the crop is the image
      items.append(Item(f"frame {frame.frame_id}", frame.cropped_img_path, frame.hamer_path,
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
    for i, base in enumerate(bases):
      items.append(Item(f"participant {p_id} base {base.base_id}", base.img_path,
                        base.hamer_path, float(trial.K[0, 0]) if trial else default_fx,
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


class _Row:
  """What one image contributes to a batch."""

  def __init__(self, crop, valid, width=0, height=0, box=None, source="", error=""):
    self.crop, self.valid, self.width, self.height = crop, valid, width, height
    self.box, self.source, self.error = box, source, error


def prepare(item: Item, boxes: dict, track_from: dict | None, options: Options,
            undistort: align.Undistorter, image_size: int) -> _Row:
  """Reads, undistorts and crops one image; any problem makes an invalid row naming it."""
  blank = np.zeros((image_size, image_size, 3), np.float32)
  try:
    image = store.decode_image(store.read_file(item.image_path, None, "image"), item.image_path,
                               None)
    if item.K is not None and item.d is not None:
      image = undistort(image, item.K, item.d)
    height, width = image.shape[:2]
    if item.image_path in boxes:
      box, is_right = boxes[item.image_path]
      crop_box = preprocess.crop_box(box, is_right, options.rescale_factor)
      source = "boxes_json"
    elif (tracked := tracked_box(track_from)) is not None:
      crop_box = preprocess.crop_box(tracked[0], tracked[1], options.rescale_factor)
      source = "tracked"
    else:
      crop_box = preprocess.crop_box([0, 0, width, height], options.default_is_right, 1.0)
      source = "whole_image"
    crop = preprocess.hamer_input(image, crop_box, image_size)
    return _Row(crop, True, width, height, crop_box, source)
  except store.FrameLoadError as e:
    return _Row(blank, False, error=f"{item.name}: {e}")
  except Exception as e:  # pylint: disable=broad-except  # cv2, a bad box: name it, go on
    return _Row(blank, False, error=f"{item.name}: {item.image_path}: {type(e).__name__}: {e}")


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


def _encode(message: str) -> np.ndarray:
  data = message.encode("utf-8", "replace")[:ERROR_BYTES]
  return np.frombuffer(data.ljust(ERROR_BYTES, b"\0"), np.uint8).copy()


def _decode(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


_SOURCES = ("",) + writer.BOX_SOURCES


def local_rows(mesh: jax.sharding.Mesh, global_batch: int) -> list[int]:
  """The rows of a global batch that this process's devices hold (in order)."""
  index_map = parallel.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({r for index in index_map.values()
                 for r in range(*index[0].indices(global_batch))})
  return rows


def run(root: str, predictor: HamerPredictor, options: Options, *, boxes_path: str | None = None,
        default_fx: float = DEFAULT_FX, log: Callable[[str], None] = print) -> Report:
  """Makes every missing prior under `root`; returns the report (the same on every process)."""
  start = time.perf_counter()
  root = os.path.abspath(root)
  items, notes = list_items(root, default_fx)
  if boxes_path is None and os.path.exists(os.path.join(root, "boxes.json")):
    boxes_path = os.path.join(root, "boxes.json")
  boxes = load_boxes(boxes_path, root) if boxes_path else {}
  plan = make_plan(items, boxes, options.overwrite)
  report = Report(total=len(items), skipped_existing=plan.skipped_existing, notes=notes)
  mesh = predictor.mesh
  global_batch = options.per_device_batch * mesh.size
  mine = local_rows(mesh, global_batch)
  image_size = predictor.config.image_size
  first = jax.process_index() == 0
  if first:
    log(f"make_priors: {len(items)} images under {root}: {len(plan.todo)} to do, "
        f"{plan.skipped_existing} already there; {len(plan.waves)} wave(s); global batch "
        f"{global_batch} over {mesh.size} device(s) of {jax.process_count()} process(es)"
        + (f"; boxes from {boxes_path} ({len(boxes)})" if boxes_path else ""))
  if plan.todo:
    predictor.compile(global_batch)
  undistort = align.Undistorter()
  tracked: dict[int, dict] = {}  # image -> its prior, kept while a later image tracks from it
  needed = set(plan.previous.values())
  done = 0
  last_log = run_start = time.perf_counter()

  def track_source(i: int) -> dict | None:
    prev = plan.previous.get(i)
    if prev is None:
      return None
    if prev in tracked:
      return tracked[prev]
    try:
      return writer.read_prior(items[prev].out_path)
    except (OSError, ValueError) as e:  # missing (failed earlier) or unreadable: whole image
      del e
      return None

  with concurrent.futures.ThreadPoolExecutor(max(1, options.workers)) as pool:
    for wave in plan.waves:
      batches = [wave[s:s + global_batch] for s in range(0, len(wave), global_batch)]

      def submit(batch):
        rows = [batch[r] if r < len(batch) else None for r in mine]
        return [pool.submit(prepare, items[i], boxes, track_source(i), options, undistort,
                            image_size) if i is not None else None for i in rows]

      pending = submit(batches[0]) if batches else None
      for b, batch in enumerate(batches):
        futures = pending
        rows = [f.result() if f is not None else _Row(
            np.zeros((image_size, image_size, 3), np.float32), False) for f in futures]
        pending = submit(batches[b + 1]) if b + 1 < len(batches) else None
        outputs, meta = _run_batch(predictor, mesh, rows)
        used = []  # rows this process writes or a later wave tracks from
        for r, i in enumerate(batch):
          tracked.pop(plan.previous.get(i), None)  # each image is tracked from at most once
          if not meta["valid"][r]:
            message = _decode(meta["error"][r])
            report.failed.append(message)
            if first:
              log(f"skipped: {message}")
            continue
          report.by_source[_SOURCES[int(meta["source"][r])]] += 1
          report.written += 1
          if r in mine or i in needed:
            used.append((r, i))
        if used:
          rs = [r for r, _ in used]
          priors = writer.prior_dicts(
              {k: outputs[k][rs] for k in OUTPUT_KEYS},
              [preprocess.CropBox(meta["center"][r], np.float32(meta["size"][r]),
                                  bool(meta["is_right"][r])) for r in rs],
              [_SOURCES[int(meta["source"][r])] for r in rs], meta["width"][rs],
              meta["height"][rs], np.array([items[i].fx for _, i in used]))
        for (r, i), prior in zip(used, priors if used else []):
          if i in needed:
            tracked[i] = prior
          if r in mine:
            writer.write_prior(items[i].out_path, prior)
        done += len(batch)
        now = time.perf_counter()
        if first and (now - last_log >= options.progress_every_s or done == len(plan.todo)):
          rate = done / max(now - run_start, 1e-9)
          eta = (len(plan.todo) - done) / max(rate, 1e-9)
          log(f"{done}/{len(plan.todo)} images ({100 * done / len(plan.todo):.0f}%), "
              f"{rate:.1f} images/s, ETA {_duration(eta)}")
          last_log = now
  report.seconds = time.perf_counter() - start
  return report


def _run_batch(predictor: HamerPredictor, mesh, rows: list[_Row]):
  """This process's rows -> (outputs, metadata) of the whole global batch, on every process."""
  local = {
      "crops": np.stack([row.crop for row in rows]),
      "valid": np.array([row.valid for row in rows]),
      "width": np.array([row.width for row in rows], np.int32),
      "height": np.array([row.height for row in rows], np.int32),
      "center": np.stack([row.box.center if row.box else np.zeros(2, np.float32)
                          for row in rows]).astype(np.float32),
      "size": np.array([row.box.size if row.box else 0 for row in rows], np.float32),
      "is_right": np.array([row.box.is_right if row.box else False for row in rows]),
      "source": np.array([_SOURCES.index(row.source) for row in rows], np.int32),
      "error": np.stack([_encode(row.error) for row in rows]),
  }
  batch = parallel.global_batch(mesh, local)
  outputs = predictor(batch.pop("crops"))
  gathered = parallel.to_host({"outputs": outputs, "meta": batch})
  return gathered["outputs"], gathered["meta"]


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def write_report(path: str, report: Report) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(report), f, indent=1)
