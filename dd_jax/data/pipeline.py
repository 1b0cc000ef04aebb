"""The EgoDorsal input pipeline on Grain: per-process numpy batches for training and evaluation.

Train: each process reads only its shard (Grain ShardOptions, equal shard sizes), reshuffled
every epoch from the seed, with whole batches built inside Grain's MapDataset so a batch's
content does not depend on the number of worker processes; the iterator state is checkpointable
(grain.checkpoint). Eval: ordered, no augmentation, every frame exactly once across processes,
the last batches padded (valid=False) so every process yields the same number of batches.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import grain
import numpy as np
from absl import logging

from dd_jax import host
from dd_jax.data import device_augment, egodorsal, samples, splits
from dd_jax.data.egodorsal import Frame

_MAX_EPOCHS = 10**9  # the train order is "infinite": the trainer counts steps_per_epoch


# ------------------------------------------------------------------ frame selection


def _json_stamp(data_dir: str) -> tuple:
  names = sorted(n for n in os.listdir(data_dir) if n.endswith(".json"))
  return tuple((n, os.stat(os.path.join(data_dir, n)).st_mtime_ns) for n in names)


@functools.lru_cache(maxsize=8)
def _cached_selection(data_dir: str, split: str, participants: tuple[int, ...],
                      sample_ratio: float, stamp: tuple):
  del stamp  # part of the cache key only: edited JSON files are read again
  index = egodorsal.load_index(data_dir)
  return index, egodorsal.select_frames(index, split, participants, sample_ratio)


def select(data_config, split: str) -> tuple[egodorsal.EgoDorsalIndex, list[Frame]]:
  """(index, frames) of a split of the run (a split file name or a leave-one-out role)."""
  data_dir = os.path.abspath(data_config.data_dir)
  index = egodorsal.load_index(data_dir)
  split_name, participants = splits.resolve_split(data_config, split, index)
  return _cached_selection(data_dir, split_name, participants,
                           float(data_config.sample_ratio), _json_stamp(data_dir))


def make_store(data_config, index: egodorsal.EgoDorsalIndex):
  fmt = data_config.format
  if fmt == "folder":
    from dd_jax.data.store import FolderStore  # pylint: disable=g-import-not-at-top
    return FolderStore(index, bool(data_config.allow_symlinks_outside_root))
  if fmt == "array_record":
    from dd_jax.data import array_record  # pylint: disable=g-import-not-at-top
    return array_record.open_store(data_config.data_dir, data_config)
  raise ValueError(f"data.format must be 'folder' or 'array_record', got {fmt!r}")


def _reader(data_config, task: str, split: str) -> samples.SampleReader:
  if task not in ("pose", "force"):
    raise ValueError(f"task must be 'pose' or 'force', got {task!r}")
  index, frames = select(data_config, split)
  if not frames:
    raise egodorsal.DatasetFormatError(f"split '{split}' of {data_config.data_dir}",
                                       ["the split selects no frame"])
  options = samples.SampleOptions(
      task=task, precropped=bool(data_config.precropped),
      random_base=bool(data_config.random_base),
      fsr_thresh=float(data_config.fsr_thresh),
      out_img_size=int(data_config.out_img_size),
      skip_bad_frames=bool(data_config.skip_bad_frames))
  return samples.SampleReader(index, frames, make_store(data_config, index), options)


def _per_process(batch_size: int, process_count: int, what: str) -> int:
  if batch_size % process_count:
    raise ValueError(f"data.{what}={batch_size} is not divisible by the {process_count} processes")
  return batch_size // process_count


def even_split(n: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
  """[start, end) of shard options.shard_index, as Grain splits a source over processes."""
  per_shard, extra = divmod(n, options.shard_count)
  i = options.shard_index
  if options.drop_remainder:
    return per_shard * i, per_shard * (i + 1)
  return per_shard * i + min(i, extra), per_shard * (i + 1) + min(i + 1, extra)


def _seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


# ------------------------------------------------------------------ orders of frame numbers


class TrainOrder:
  """Global position -> frame number: a fresh permutation of ALL frames each epoch.

  Each epoch keeps per_epoch = steps_per_epoch * global batch frames (drop remainder), as
  torch's DistributedSampler does. Randomness is keyed by global position, so the global batch
  (frames and augmentation) is the same whatever the number of processes.
  """

  def __init__(self, num_frames: int, per_epoch: int, seed: int):
    self.num_frames, self.per_epoch, self.seed = num_frames, per_epoch, seed
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.per_epoch * _MAX_EPOCHS

  def __repr__(self) -> str:
    return f"TrainOrder(num_frames={self.num_frames}, per_epoch={self.per_epoch}, seed={self.seed})"

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) > 2:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_frames)
    return self._cache[epoch]

  def __getitem__(self, i: int) -> int:
    epoch, position = divmod(int(i), self.per_epoch)
    return int(self.permutation(epoch)[position])

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}


class ProcessPositions:
  """This process's local index -> global position: its slice of every global batch."""

  def __init__(self, process_index: int, process_count: int, local_batch: int):
    self.process_index, self.process_count, self.local_batch = (process_index, process_count,
                                                                local_batch)

  def __len__(self) -> int:
    return _MAX_EPOCHS * 10**6

  def __getitem__(self, j: int) -> int:
    batch_index, k = divmod(int(j), self.local_batch)
    return (batch_index * self.process_count + self.process_index) * self.local_batch + k


class _FromGlobal(grain.transforms.Map):
  """Global position -> the finished sample of the global (seeded-by-position) dataset."""

  def __init__(self, dataset: grain.MapDataset):
    self._dataset = dataset

  def map(self, position: int) -> dict[str, Any]:
    return self._dataset[position]


# ------------------------------------------------------------------ iterators


class BatchIterator:
  """Numpy batches from a Grain iterator; counts skipped bad frames and reports them per epoch.

  Checkpointable like grain.DataLoaderIterator (get_state() -> bytes, set_state(bytes),
  start_prefetch()), so grain.checkpoint.CheckpointSave/Restore accept it.
  """

  def __init__(self, dataset: grain.IterDataset, epoch_steps: int, name: str,
               limit: int | None = None):
    self._dataset = dataset
    self._iterator = None
    self.epoch_steps = epoch_steps
    self.name = name
    self._limit = limit
    self.step = 0
    self.skipped: list[tuple[int, str]] = []  # (frame_id, error) of the current epoch
    self.last_report: list[tuple[int, str]] = []  # the previous epoch's, once reported
    self.skipped_total = 0

  def _grain_iterator(self):
    if self._iterator is None:
      self._iterator = iter(self._dataset)
    return self._iterator

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._limit is not None and self.step >= self._limit:
      raise StopIteration
    batch = dict(next(self._grain_iterator()))
    errors = batch.pop("load_error")
    bad = np.flatnonzero(~batch["valid"] & (batch["frame_id"] >= 0))
    for i in bad:
      self.skipped.append((int(batch["frame_id"][i]), samples.decode_error(errors[i])))
    self.step += 1
    if self.step % self.epoch_steps == 0:
      self.report()
    return batch

  def report(self) -> None:
    """Logs the bad frames skipped since the last report (end of an epoch / of an eval pass)."""
    if self.skipped:
      self.skipped_total += len(self.skipped)
      lines = "\n".join(f"  frame {f}: {e}" for f, e in self.skipped)
      logging.warning("%s: skipped %d bad frame(s) in epoch %d (data.skip_bad_frames=True):\n%s",
                      self.name, len(self.skipped), (self.step - 1) // self.epoch_steps + 1, lines)
      self.last_report = list(self.skipped)
      self.skipped = []

  def get_state(self) -> bytes:
    state = {"grain": self._grain_iterator().get_state(), "step": self.step}
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    state = json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
    self._grain_iterator().set_state(state["grain"])
    self.step = int(state["step"])
    self.skipped = []

  def start_prefetch(self) -> None:
    iterator = self._grain_iterator()
    if hasattr(iterator, "start_prefetch"):
      iterator.start_prefetch()

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()


class Loader:
  """An iterable of per-process batches; iter() starts a fresh BatchIterator."""

  def __init__(self, dataset: grain.IterDataset, *, steps_per_epoch: int, batch_size: int,
               name: str, finite: bool):
    self.dataset = dataset
    self.steps_per_epoch = steps_per_epoch
    self.batch_size = batch_size  # per process
    self.name = name
    self._finite = finite

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self.dataset, self.steps_per_epoch, self.name,
                         limit=self.steps_per_epoch if self._finite else None)


def _read_options(num_workers: int) -> grain.ReadOptions:
  # Elements are whole batches (a 96 x 384 x 384 pair is 340 MB): small buffers; threads
  # only in-process, worker processes give the parallelism otherwise.
  return grain.ReadOptions(num_threads=1 if num_workers else 2,
                           prefetch_buffer_size=1 if num_workers else 2)


def _finish(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  it = ds.to_iter_dataset(_read_options(num_workers))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=1),
                        worker_init_fn=host.one_opencv_thread)
  return it


# ------------------------------------------------------------------ public API


def make_train_loader(data_config, task: str, *, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Loader:
  """Shuffled, augmented, fixed-size batches of data.batch_size // process_count frames.

  `iter(loader)` is infinite (epochs follow each other); loader.steps_per_epoch batches make an
  epoch. Batches: img, base_img (B, S, S, 3) float32 (uint8 and not yet augmented with
  data.augment_on_device: the train step augments and normalises them), hamer_pose (B, 45),
  hamer_shape (B, 10), gt_pose (B, 45) [pose] or tap_label (B,), force (B, 5), fsr (B,)
  [force], frame_id (B,) int64, p_id (B,) int32, valid (B,) bool (False only for skipped bad
  frames).
  """
  reader = _reader(data_config, task, data_config.train_split)
  global_batch = int(data_config.batch_size)
  batch = _per_process(global_batch, process_count, "batch_size")
  steps = len(reader) // global_batch
  if steps == 0:
    raise ValueError(f"train split: {len(reader)} frames, fewer than one batch of {global_batch}")
  # The whole run's sample stream, keyed by global position; this process computes only the
  # positions of its slice of each global batch.
  order = TrainOrder(len(reader), steps * global_batch, _seed(seed, 0))
  samples_ds = grain.MapDataset.source(order).random_map(samples.ReadSampleRandom(reader),
                                                         seed=_seed(seed, 1))
  on_device = device_augment.enabled(data_config)
  if data_config.augment and not on_device:
    samples_ds = samples_ds.random_map(samples.Augment(), seed=_seed(seed, 2))
  samples_ds = samples_ds.map(samples.Finalize(int(data_config.out_img_size), uint8=on_device))
  positions = ProcessPositions(process_index, process_count, batch)
  ds = grain.MapDataset.source(positions).map(_FromGlobal(samples_ds))
  ds = ds.batch(batch, drop_remainder=True)
  return Loader(_finish(ds, int(data_config.num_workers)), steps_per_epoch=steps,
                batch_size=batch, name=f"{task} train", finite=False)


def make_eval_loader(data_config, task: str, split: str, *, process_index: int = 0,
                     process_count: int = 1) -> Loader:
  """Ordered, unaugmented batches of data.eval_batch_size // process_count frames.

  Every frame of the split appears exactly once over all processes; every process yields
  len(loader) batches, padded at the end with valid=False (frame_id -1).
  """
  reader = _reader(data_config, task, split)
  batch = _per_process(int(data_config.eval_batch_size),
                       process_count, "eval_batch_size")
  shard_options = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=False)
  start, end = even_split(len(reader), shard_options)
  steps = math.ceil(math.ceil(len(reader) / process_count) / batch)
  numbers = list(range(start, end)) + [samples.PADDING] * (steps * batch - (end - start))
  ds = grain.MapDataset.source(numbers).map(samples.ReadSample(reader))
  ds = ds.map(samples.Finalize(int(data_config.out_img_size),
                               uint8=device_augment.enabled(data_config))).batch(batch)
  return Loader(_finish(ds, int(data_config.num_workers)), steps_per_epoch=steps,
                batch_size=batch, name=f"{task} {split}", finite=True)


def class_counts(data_config, split: str, n_classes: int) -> tuple[int, ...]:
  """Frames per force class in a split, from the JSON metadata alone (no image is read)."""
  index, frames = select(data_config, split)
  thresh = float(data_config.fsr_thresh)
  labels = [samples.tap_label(f, index.trials[f.trial_id], thresh) for f in frames]
  return tuple(int(c) for c in np.bincount(labels, minlength=n_classes)[:n_classes])
