"""Predictions for a whole EgoDorsal-layout set (bases.json, trials.json, frames.json; no
annotations needed): every frame exactly once over every device of every process, batched,
resumable, as the online mode of the data pipeline reads it.

Priors are read where the set has them (a frame's or base's hamer_path) and made where it does
not, by the make-priors job (HaMeR, tracked along each trial) into the output folder; the data
folder is never written. Then the frames run in global batches through sharded_job: each
process decodes, undistorts, aligns and crops its rows, the network and MANO run as one
compiled function over the mesh, and each process writes its rows' result files. When all are
done, process 0 writes predictions.npz and predictions.jsonl with every frame in frames.json
order, failed ones marked with their reason.

  OUT/priors/frames/<trial_id>/<frame_id>.npy, OUT/priors/bases/<p_id>_<base_id>.npy (made)
  OUT/frames/<trial_id>/<frame_id>.npz   one per predicted frame: the resume point
  OUT/predictions.npz, OUT/predictions.jsonl, OUT/predict_report.json
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from dd_jax import inference, sharded_job
from dd_jax.data import align, egodorsal, store
from dd_jax.full_frames import stages
from dd_jax.priors import job as priors_job
from dd_jax.priors.predictor import HamerPredictor

NPZ_FILE, JSONL_FILE, REPORT_FILE = "predictions.npz", "predictions.jsonl", "predict_report.json"
POSE_KEYS = {"pose": (45,), "betas": (10,), "keypoints_3d": (21, 3), "keypoints_cam": (21, 3),
             "keypoints_2d": (21, 2)}
PRIOR_KEYS = {"prior_pose": (45,), "prior_keypoints_2d": (21, 2)}
BASE_CACHE = 16  # undistorted base images kept in memory (per process)


@dataclasses.dataclass(frozen=True)
class Options:
  split: str = "all"  # frames.json, or a split file's frames
  base_choice: str = "first"  # first usable base of the participant, or "random" per frame
  per_device_batch: int = 8
  workers: int = 4
  overwrite: bool = False  # redo frames that have a result file
  progress_every_s: float = 10.0
  priors: priors_job.Options = priors_job.Options()


@dataclasses.dataclass
class Report:
  total: int = 0
  skipped_existing: int = 0
  predicted: int = 0
  failed: list[str] = dataclasses.field(default_factory=list)
  priors: dict | None = None  # the make-priors report, when priors were made
  notes: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0


def result_path(out_dir: str, frame: egodorsal.Frame) -> str:
  return os.path.join(out_dir, "frames", str(frame.trial_id), f"{frame.frame_id}.npz")


def prior_locations(data_dir: str, out_dir: str) -> Callable[[Any], str]:
  """frame or base -> its prior file: the set's own hamer_path where that file exists, else
  the file the job makes under OUT/priors (frames by trial and id, bases by image path)."""

  def where(x) -> str:
    if x.hamer_path is not None and os.path.isfile(x.hamer_path):
      return x.hamer_path
    if isinstance(x, egodorsal.Frame):
      return os.path.join(out_dir, "priors", "frames", str(x.trial_id), f"{x.frame_id}.npy")
    relative = os.path.relpath(os.path.splitext(x.img_path)[0], data_dir)
    if relative.startswith(".."):
      relative = relative.replace(os.sep, "_").lstrip("._")
    return os.path.join(out_dir, "priors", "bases", relative + ".npy")
  return where


class _Bases:
  """Each participant's bases as the frames use them: priors, hand checks, undistorted images
  (a few kept), shared by the loading threads."""

  def __init__(self, index: egodorsal.EgoDorsalIndex, where: Callable[[Any], str]):
    self.index, self.where = index, where
    self._lock = threading.Lock()
    self._priors: dict[tuple[int, int], stages.HandPrior | str] = {}
    self._images: collections.OrderedDict = collections.OrderedDict()

  def image(self, p_id: int, base_idx: int, K: np.ndarray, d: np.ndarray,
            undistort: align.Undistorter) -> np.ndarray:
    key = (p_id, base_idx, K.tobytes(), d.tobytes())
    with self._lock:
      if key in self._images:
        self._images.move_to_end(key)
        return self._images[key]
    base = self.index.bases[p_id][base_idx]
    try:
      image = undistort(store.decode_image(store.read_file(base.img_path, None, "base image"),
                                           base.img_path, None), K, d)
    except store.FrameLoadError as e:
      raise stages.PredictionError(f"base {base_idx} of participant {p_id}: {e}") from None
    with self._lock:
      self._images[key] = image
      while len(self._images) > BASE_CACHE:
        self._images.popitem(last=False)
    return image

  def prior(self, p_id: int, base_idx: int) -> stages.HandPrior:
    with self._lock:
      cached = self._priors.get((p_id, base_idx))
    if cached is None:
      base = self.index.bases[p_id][base_idx]
      try:
        cached = stages.read_prior(self.where(base))
      except stages.PredictionError as e:
        cached = f"base {base_idx} of participant {p_id}: {e}"
      with self._lock:
        self._priors[(p_id, base_idx)] = cached
    if isinstance(cached, str):
      raise stages.PredictionError(cached)
    return cached

  def usable(self, p_id: int, base_idx: int, K, d, undistort) -> tuple[np.ndarray,
                                                                        stages.HandPrior]:
    prior = self.prior(p_id, base_idx)
    image = self.image(p_id, base_idx, K, d, undistort)
    problem = stages.hand_problem(prior, K, image)
    if problem:
      raise stages.PredictionError(f"base {base_idx} of participant {p_id}: no usable hand: "
                                   f"{problem}")
    return image, prior

  def choose(self, frame: egodorsal.Frame, choice: str, K, d, undistort
             ) -> tuple[int, np.ndarray, stages.HandPrior]:
    """(base index, undistorted image, prior) of a frame: the participant's first usable base,
    or (random) the base the data pipeline's random_base draws at evaluation."""
    n = len(self.index.bases.get(frame.p_id, []))
    if n == 0:
      raise stages.PredictionError(f"participant {frame.p_id} has no base in bases.json")
    if choice == "random":
      idx = int(np.random.default_rng(frame.frame_id).integers(n))
      return (idx, *self.usable(frame.p_id, idx, K, d, undistort))
    problems = []
    for idx in range(n):
      try:
        return (idx, *self.usable(frame.p_id, idx, K, d, undistort))
      except stages.PredictionError as e:
        problems.append(str(e))
    raise stages.PredictionError("no usable base: " + "; ".join(problems))


def run(data_dir: str, out_dir: str, network: inference.Predictor, mesh: jax.sharding.Mesh,
        hamer: HamerPredictor | None, options: Options = Options(),
        log: Callable[[str], None] = print) -> Report:
  """Predicts every frame of the set without a result file; returns the report (process 0's
  is complete)."""
  start = time.perf_counter()
  data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)
  first = jax.process_index() == 0
  index = egodorsal.load_index(data_dir)
  frames = egodorsal.select_frames(index, options.split)
  where = prior_locations(data_dir, out_dir)
  report = Report(total=len(frames))

  # ------------------------------------------------------------------ priors where missing
  items, notes = priors_job.egodorsal_items(data_dir, split=options.split, prior_path=where)
  participants = {f.p_id for f in frames}
  items = [it for it in items if not it.name.startswith("participant ")
           or int(it.name.split()[1]) in participants]
  missing = [it for it in items if not os.path.exists(it.out_path)]
  prior_failures: dict[str, str] = {}  # item name ("frame 5") -> why its prior was not made
  if missing:
    if hamer is None:
      raise ValueError(f"{len(missing)} frames / bases have no prior (e.g. {missing[0].name}: "
                       f"{missing[0].image_path}); give the HaMeR weights to make them")
    priors = priors_job.make_priors(items, hamer, options.priors, notes=notes,
                                    where=f"of {data_dir} (missing priors into {out_dir}/priors)",
                                    log=log)
    report.priors = dataclasses.asdict(priors)
    prior_failures = {message.split(":", 1)[0]: message for message in priors.failed}

  # ------------------------------------------------------------------ predictions
  todo = [i for i, f in enumerate(frames)
          if options.overwrite or not os.path.exists(result_path(out_dir, f))]
  report.skipped_existing = len(frames) - len(todo)
  global_batch = options.per_device_batch * mesh.size
  size = network.image_size
  if first:
    log(f"predict: {len(frames)} frames of {data_dir}: {len(todo)} to do, "
        f"{report.skipped_existing} already done; global batch {global_batch} over {mesh.size} "
        f"device(s) of {jax.process_count()} process(es)")
  bases = _Bases(index, where)
  undistort = align.Undistorter()
  pose = network.task == "pose"

  def prepare(i: int):
    frame = frames[i]
    trial = index.trials[frame.trial_id]
    try:
      if f"frame {frame.frame_id}" in prior_failures:  # its reason, not "file not found"
        raise stages.PredictionError(f"no prior: {prior_failures[f'frame {frame.frame_id}']}")
      prior = stages.read_prior(where(frame))
      image = undistort(store.decode_image(store.read_file(frame.img_path, None, "img_path"),
                                           frame.img_path or "<frames.json>", None),
                        trial.K, trial.d)
      base_idx, base_image, base_prior = bases.choose(frame, options.base_choice, trial.K,
                                                      trial.d, undistort)
      problem = stages.hand_problem(prior, trial.K, image)
      if problem:
        raise stages.PredictionError(f"no usable hand: {problem}")
      inputs = stages.pair_inputs(image, base_image, trial.K, prior, base_prior, size)
    except (stages.PredictionError, store.FrameLoadError) as e:
      raise sharded_job.Skip(f"frame {frame.frame_id}: {e}") from None
    height, width = image.shape[:2]
    place, placeable = stages.placement([prior], [trial.K], [(width, height)])
    return ({"img": inputs.img, "base_img": inputs.base_img, "prior_pose": inputs.prior_pose,
             "betas": inputs.betas, "orient": place.orient[0], "wrist": place.wrist[0],
             "focal": place.focal[0], "centre": place.centre[0]},
            {"base_idx": np.int32(base_idx), "placeable": placeable[0],
             "prior_pose": inputs.prior_pose, "betas": inputs.betas,
             "prior_keypoints_2d": stages.prior_keypoints_2d(prior, trial.K, width,
                                                             height).astype(np.float32)})

  blank = ({"img": np.zeros((size, size, 3), np.float32),
            "base_img": np.zeros((size, size, 3), np.float32),
            "prior_pose": np.zeros(45, np.float32), "betas": np.zeros(10, np.float32),
            "orient": np.eye(3, dtype=np.float32), "wrist": np.array([0, 0, 1], np.float32),
            "focal": np.float32(1), "centre": np.zeros(2, np.float32)},
           {"base_idx": np.int32(-1), "placeable": np.bool_(False),
            "prior_pose": np.zeros(45, np.float32), "betas": np.zeros(10, np.float32),
            "prior_keypoints_2d": np.zeros((21, 2), np.float32)})

  def compute(inputs):
    place = stages.Placement(inputs["orient"], inputs["wrist"], inputs["focal"], inputs["centre"])
    return network.full_forward(inputs["img"], inputs["base_img"], inputs["prior_pose"],
                                inputs["betas"], place)

  results: dict[int, dict[str, Any]] = {}  # this run's, kept by process 0 for the merge
  errors: dict[int, str] = {}

  def finish(batch: sharded_job.Batch) -> None:
    for r, i in enumerate(batch.items):
      frame = frames[i]
      if batch.errors[r]:
        errors[frame.frame_id] = batch.errors[r]
        report.failed.append(batch.errors[r])
        if first:
          log(f"failed: {batch.errors[r]}")
        continue
      report.predicted += 1
      if not first and r not in batch.mine:
        continue
      record = _record(frame, index.trials[frame.trial_id], batch, r, pose)
      if r in batch.mine:
        sharded_job.atomic_write(result_path(out_dir, frame),
                                 lambda f, record=record: np.savez(f, **record))
      if first:
        results[frame.frame_id] = record

  sharded_job.run([todo], mesh=mesh, global_batch=global_batch, prepare=prepare, blank=blank,
                  compute=compute, finish=finish, workers=options.workers,
                  progress_every_s=options.progress_every_s, unit="frames", log=log)
  if jax.process_count() > 1:  # every process's files are on disk before process 0 reads them
    multihost_utils.sync_global_devices("dd_jax predictions written")
  report.seconds = time.perf_counter() - start
  if first:
    _merge(out_dir, frames, results, errors, pose)
    with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(report), f, indent=1)
  return report


def _record(frame: egodorsal.Frame, trial: egodorsal.Trial, batch: sharded_job.Batch, r: int,
            pose: bool) -> dict[str, np.ndarray]:
  """One predicted frame's arrays (its result file), 2D keypoints in the raw frame's pixels."""
  camera = stages.Camera(trial.K, trial.d, f"trial {trial.trial_id}")
  meta, out = batch.meta, batch.outputs
  record = {"frame_id": np.int64(frame.frame_id), "trial_id": np.int64(frame.trial_id),
            "p_id": np.int64(frame.p_id), "base_idx": np.int64(meta["base_idx"][r]),
            "prior_pose": meta["prior_pose"][r],
            "prior_keypoints_2d": stages.to_raw_pixels(meta["prior_keypoints_2d"][r],
                                                       camera).astype(np.float32)}
  if pose:
    record.update(pose=out["pose"][r], betas=meta["betas"][r], keypoints_3d=out["keypoints_3d"][r],
                  keypoints_cam=out["keypoints_cam"][r],
                  keypoints_2d=stages.to_raw_pixels(out["keypoints_2d"][r],
                                                    camera).astype(np.float32))
    if not meta["placeable"][r]:  # no HaMeR orientation: nothing to place the hand with
      record["keypoints_cam"] = np.full((21, 3), np.nan, np.float32)
      record["keypoints_2d"] = np.full((21, 2), np.nan, np.float32)
  else:
    logits = np.asarray(out["logits"][r], np.float32)
    record.update(logits=logits, probabilities=np.asarray(jax.nn.softmax(logits, axis=-1)),
                  label=np.argmax(logits, -1))
  return {k: np.asarray(v) for k, v in record.items()}


def _read_result(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    data = f.read()
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def _merge(out_dir: str, frames: list[egodorsal.Frame], results: dict[int, dict],
           errors: dict[int, str], pose: bool) -> None:
  """predictions.npz and predictions.jsonl: every frame in order, this run's results and the
  result files of earlier runs; frames without either are marked with their reason."""
  records, reasons = [], []
  for frame in frames:
    record, reason = results.get(frame.frame_id), errors.get(frame.frame_id, "")
    if record is None and not reason:
      try:
        record = _read_result(result_path(out_dir, frame))
      except (OSError, ValueError) as e:
        reason = f"frame {frame.frame_id}: no result ({e})"
    records.append(record)
    reasons.append(reason if record is None else "")
  keys = dict(PRIOR_KEYS, **(POSE_KEYS if pose else {}))
  if not pose:
    sample = next((r for r in records if r is not None), None)
    classes = sample["probabilities"].shape if sample is not None else (0,)
    keys.update(logits=classes, probabilities=classes)
  arrays = {"frame_id": np.array([f.frame_id for f in frames], np.int64),
            "trial_id": np.array([f.trial_id for f in frames], np.int64),
            "p_id": np.array([f.p_id for f in frames], np.int64),
            "valid": np.array([r is not None for r in records]),
            "error": np.array(reasons, dtype=str),
            "base_idx": np.array([-1 if r is None else int(r["base_idx"]) for r in records])}
  for key, shape in keys.items():
    arrays[key] = np.full((len(frames),) + tuple(shape), np.nan, np.float32)
    for i, r in enumerate(records):
      if r is not None:
        arrays[key][i] = r[key]
  if not pose:
    arrays["label"] = np.array([-1 if r is None else r["label"] for r in records], np.int64)
  sharded_job.atomic_write(os.path.join(out_dir, NPZ_FILE), lambda f: np.savez(f, **arrays))

  def lines(f):
    for i, frame in enumerate(frames):
      row: dict[str, Any] = {"frame_id": frame.frame_id, "trial_id": frame.trial_id,
                             "p_id": frame.p_id, "valid": bool(arrays["valid"][i]),
                             "error": reasons[i]}
      if row["valid"]:
        row["base_idx"] = int(arrays["base_idx"][i])
        row.update({k: arrays[k][i].tolist() for k in keys})
        if not pose:
          row["label"] = arrays["label"][i].tolist()
      f.write((json.dumps(row) + "\n").encode("utf-8"))
  sharded_job.atomic_write(os.path.join(out_dir, JSONL_FILE), lines)
