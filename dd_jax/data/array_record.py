"""EgoDorsal packed into ArrayRecord shards with a TFDS builder (no TensorFlow needed).

A packed folder holds copies of the JSON metadata, `packed.json` (frame id -> record, pack-time
problems) and a TFDS dataset (`egodorsal_packed/1.0.0/*.array_record-*`) with two splits:
"frames" (one record per frame: JPEG bytes kept encoded, HaMeR and ground-truth arrays already
parsed) and "bases". With data.format="array_record" the pipeline reads the same samples from
it as from the folder: a few large files instead of 170k small ones.

  python tools/pack_array_record.py --src /data/egodorsal --out /data/egodorsal_packed
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dd_jax.data import egodorsal
from dd_jax.data.egodorsal import Frame
from dd_jax.data.store import FolderStore, FrameLoadError, Prior

PACK_INDEX = "packed.json"
BUILDER_NAME = "egodorsal_packed"
_IMAGE_FIELDS = ("img", "cropped_img", "cropped_base")
_PRIOR_FIELDS = (("hand_pose", (45,), np.float32), ("betas", (10,), np.float32),
                 ("keypoints_3d", (21, 3), np.float64), ("cam_t", (3,), np.float64),
                 ("keypoints_2d", (21, 2), np.float32))  # packs made before it lack the last
_JSON_FILES = ("bases.json", "trials.json", "frames.json")


def _features() -> tfds.features.FeaturesDict:
  spec = {
      "frame_id": np.int64, "p_id": np.int32, "base_index": np.int32,
      "errors": tfds.features.Tensor(shape=(), dtype=np.object_),  # JSON {field: message}
      "gt_pose": tfds.features.Tensor(shape=(45,), dtype=np.float32),
      "prior_present": tfds.features.Tensor(shape=(len(_PRIOR_FIELDS),), dtype=np.bool_),
  }
  for field in _IMAGE_FIELDS:
    spec[field] = tfds.features.Tensor(shape=(), dtype=np.object_)  # encoded JPEG bytes
  for name, shape, dtype in _PRIOR_FIELDS:
    spec[f"prior_{name}"] = tfds.features.Tensor(shape=shape, dtype=dtype)
  return tfds.features.FeaturesDict(spec)


def _read_bytes(path: str | None) -> tuple[bytes, dict | None]:
  """(bytes, None) or (b"", {path, reason}) as the folder reader would report it."""
  if path is None:
    return b"", None
  try:
    with open(path, "rb") as f:
      return f.read(), None
  except FileNotFoundError:
    return b"", {"path": path, "reason": "file not found"}
  except OSError as e:
    return b"", {"path": path, "reason": f"unreadable ({e})"}


def _error(e: FrameLoadError) -> dict:
  return {"path": e.path, "reason": e.reason}


def _prior_record(read, record: dict, errors: dict) -> None:
  try:
    prior = read()
  except FrameLoadError as e:
    errors["prior"] = _error(e)
    prior = Prior(None, None, None, None)
  present = []
  for name, shape, dtype in _PRIOR_FIELDS:
    value = getattr(prior, name)
    present.append(value is not None)
    record[f"prior_{name}"] = np.zeros(shape, dtype) if value is None else value.astype(dtype)
  record["prior_present"] = np.asarray(present)


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Packs one EgoDorsal folder (given at construction) into ArrayRecord."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version("1.0.0")

  # TFDS 4.9.10 looks a package builder's file up through `importlib_resources`, which it does
  # not install on Python >= 3.9; this builder's file is simply this module.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def __init__(self, *, source: str, frames: list[Frame], index: egodorsal.EgoDorsalIndex,
               **kwargs):
    self._source, self._frames, self._index = source, frames, index
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps records in key order, so packed.json can map frame ids to records.
    return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                 description="EgoDorsal frames packed by dd_jax")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"frames": self._generate_examples("frames"), "bases": self._generate_examples("bases")}

  def _generate_examples(self, split: str):
    return self._generate_frames() if split == "frames" else self._generate_bases()

  def _empty(self) -> dict:
    return {"frame_id": -1, "p_id": -1, "base_index": -1, "gt_pose": np.zeros(45, np.float32),
            **{f: b"" for f in _IMAGE_FIELDS}}

  def _generate_frames(self):
    store = FolderStore(self._index)
    for position, frame in enumerate(self._frames):
      record, errors = self._empty(), {}
      record.update(frame_id=frame.frame_id, p_id=frame.p_id)
      for field in _IMAGE_FIELDS:
        record[field], error = _read_bytes(getattr(frame, f"{field}_path"))
        if error:
          errors[field] = error
      _prior_record(lambda f=frame: store.frame_prior(f), record, errors)
      if frame.ann_path is not None:
        try:
          record["gt_pose"] = store.frame_ground_truth(frame)
        except FrameLoadError as e:
          errors["ann"] = _error(e)
      else:
        errors["ann"] = {"path": "<frames.json>", "reason": "no ann_path for this frame"}
      record["errors"] = json.dumps(errors).encode()
      yield position, record

  def _generate_bases(self):
    store = FolderStore(self._index)
    position = 0
    for p_id in sorted(self._index.bases):
      for i, base in enumerate(self._index.bases[p_id]):
        record, errors = self._empty(), {}
        record.update(p_id=p_id, base_index=i)
        record["img"], error = _read_bytes(base.img_path)
        if error:
          errors["img"] = error
        _prior_record(lambda p=p_id, k=i: store.base_prior(p, k, None), record, errors)
        record["errors"] = json.dumps(errors).encode()
        yield position, record
        position += 1


def collect_frames(source: str, index: egodorsal.EgoDorsalIndex) -> tuple[list[Frame], list[str]]:
  """(every frame of frames.json and the split files, by frame id; those JSON files' names)."""
  frames: dict[int, Frame] = {}
  problems = []
  names = []
  for name in sorted(os.listdir(source)):  # frames.json and every split file
    if not name.endswith(".json") or name in ("bases.json", "trials.json", PACK_INDEX,
                                              "pack_settings.json"):
      continue
    with open(os.path.join(source, name), encoding="utf-8") as f:
      if not isinstance(json.load(f).get("frames"), list):
        continue
    names.append(name)
    for frame in egodorsal.select_frames(index, name[:-5] if name != "frames.json" else "all"):
      if frame.frame_id in frames and frames[frame.frame_id] != frame:
        problems.append(f"{name}: frame {frame.frame_id} differs from its entry in another file")
      frames.setdefault(frame.frame_id, frame)
  egodorsal.check(f"packing {source}", problems)
  return [frames[k] for k in sorted(frames)], names


def copy_metadata(source: str, out_dir: str, names: list[str]) -> None:
  """The JSON metadata (frames, splits, bases, trials) next to the packed records."""
  for name in names + ["bases.json", "trials.json"]:
    shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))


def pack(source: str, out_dir: str) -> dict:
  """Packs the EgoDorsal folder `source` into `out_dir`; returns a summary."""
  start = time.perf_counter()
  source, out_dir = os.path.abspath(source), os.path.abspath(out_dir)
  index = egodorsal.load_index(source)
  ordered, names = collect_frames(source, index)
  os.makedirs(out_dir, exist_ok=True)
  copy_metadata(source, out_dir, names)
  builder = _Builder(source=source, frames=ordered, index=index, data_dir=out_dir,
                     file_format="array_record")
  builder.download_and_prepare()
  bases = [[p, i] for p in sorted(index.bases) for i in range(len(index.bases[p]))]
  ds = builder.as_data_source(split="frames")
  errors = {}
  for position, frame in enumerate(ordered):
    record = ds[position]
    if int(record["frame_id"]) != frame.frame_id:
      raise RuntimeError(f"packed record {position} holds frame {record['frame_id']}, expected "
                         f"{frame.frame_id}: TFDS did not keep the generation order")
    err = json.loads(record["errors"])
    if err:
      errors[str(frame.frame_id)] = err
  meta = {"source": source, "frames": [f.frame_id for f in ordered], "bases": bases,
          "errors": errors, "dataset_dir": os.path.relpath(builder.data_dir, out_dir)}
  with open(os.path.join(out_dir, PACK_INDEX), "w", encoding="utf-8") as f:
    json.dump(meta, f)
  return {"frames": len(ordered), "bases": len(bases), "frames_with_errors": len(errors),
          "dataset_dir": builder.data_dir, "seconds": round(time.perf_counter() - start, 2)}


def read_pack_index(packed_dir: str) -> dict:
  path = os.path.join(os.path.abspath(packed_dir), PACK_INDEX)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: not a packed EgoDorsal folder (run "
                            "tools/pack_array_record.py)") from None


def open_store(packed_dir: str, data_config):
  """The store of a packed folder: whole files (ArrayRecordStore) or crops (crops.CropStore)."""
  meta = read_pack_index(packed_dir)
  if meta.get("kind") == "crops":
    from dd_jax.data import crops  # pylint: disable=g-import-not-at-top
    return crops.CropStore(packed_dir, meta, data_config)
  return ArrayRecordStore(packed_dir)


class ArrayRecordStore:
  """Reads frames from a packed folder (data.format="array_record"); same API as FolderStore."""

  def __init__(self, packed_dir: str):
    self.packed_dir = os.path.abspath(packed_dir)
    meta = read_pack_index(packed_dir)
    self._record = {fid: i for i, fid in enumerate(meta["frames"])}
    self._base_record = {(p, i): k for k, (p, i) in enumerate(meta["bases"])}
    self._dataset_dir = os.path.join(self.packed_dir, meta["dataset_dir"])
    self._sources = None
    self._cache: tuple[tuple, dict] | None = None

  def __repr__(self) -> str:
    return f"ArrayRecordStore({self.packed_dir!r})"

  def __getstate__(self):
    return {**self.__dict__, "_sources": None, "_cache": None}

  def _get(self, split: str, key, who: int | None) -> dict:
    if self._cache is not None and self._cache[0] == (split, key):
      return self._cache[1]
    table = self._record if split == "frames" else self._base_record
    if key not in table:
      raise FrameLoadError(who, os.path.join(self.packed_dir, PACK_INDEX),
                           f"no packed record for {split} {key}")
    if self._sources is None:
      builder = tfds.builder_from_directory(self._dataset_dir)
      self._sources = builder.as_data_source()
    record = self._sources[split][table[key]]
    self._cache = ((split, key), record)
    return record

  @staticmethod
  def _check(record: dict, field: str, who: int | None) -> None:
    error = json.loads(record["errors"]).get(field)
    if error:  # recorded when packing, exactly as the folder reader reports it
      raise FrameLoadError(who, error["path"], error["reason"])

  def frame_image(self, frame: Frame, field: str) -> tuple[bytes, str]:
    record = self._get("frames", frame.frame_id, frame.frame_id)
    path = getattr(frame, f"{field}_path")
    if path is None:
      raise FrameLoadError(frame.frame_id, "<frames.json>", f"no {field}_path for this frame")
    self._check(record, field, frame.frame_id)
    return bytes(record[field]), path

  @staticmethod
  def _prior(record: dict) -> Prior:
    present = np.asarray(record["prior_present"], bool)
    values = {name: (np.asarray(record[f"prior_{name}"], dtype) if ok else None)
              for (name, _, dtype), ok in zip(_PRIOR_FIELDS, present)}
    return Prior(**values)

  def frame_prior(self, frame: Frame) -> Prior:
    record = self._get("frames", frame.frame_id, frame.frame_id)
    self._check(record, "prior", frame.frame_id)
    return self._prior(record)

  def frame_ground_truth(self, frame: Frame) -> np.ndarray:
    record = self._get("frames", frame.frame_id, frame.frame_id)
    self._check(record, "ann", frame.frame_id)
    return np.asarray(record["gt_pose"], np.float32)

  def base_name(self, p_id: int, base_idx: int) -> str:
    return f"packed base {base_idx} of participant {p_id}"

  def base_image(self, p_id: int, base_idx: int, frame_id: int) -> tuple[bytes, str]:
    record = self._get("bases", (p_id, base_idx), frame_id)
    self._check(record, "img", frame_id)
    return bytes(record["img"]), self.base_name(p_id, base_idx)

  def base_prior(self, p_id: int, base_idx: int, frame_id: int) -> Prior:
    record = self._get("bases", (p_id, base_idx), frame_id)
    self._check(record, "prior", frame_id)
    return self._prior(record)


def packed_problems(root: str, frames: list[Frame], task: str, precropped: bool) -> list[str]:
  """Validation of a packed folder: every frame packed, no pack-time error in a needed field."""
  path = os.path.join(root, PACK_INDEX)
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    return [f"{path}: not a packed EgoDorsal folder ({e}); run tools/pack_array_record.py"]
  if meta.get("kind") == "crops":
    from dd_jax.data import crops  # pylint: disable=g-import-not-at-top
    return crops.packed_problems(meta, frames, task, precropped, path)
  packed = set(meta["frames"])
  errors = meta.get("errors", {})
  needed = ["prior"] + (["cropped_img", "cropped_base"] if precropped else ["img"])
  needed += ["ann"] if task == "pose" else []
  problems = []
  for f in frames:
    if f.frame_id not in packed:
      problems.append(f"frame {f.frame_id}: not in the packed records ({path})")
      continue
    for field in needed:
      if field in errors.get(str(f.frame_id), {}):
        error = errors[str(f.frame_id)][field]
        problems.append(f"frame {f.frame_id}: {error['path']}: {error['reason']} (when packed)")
  return problems
