"""Packed crops: the alignment and the crop done once, at pack time, stored at training size.

`tools/pack_array_record.py --image_size S` reads an EgoDorsal folder the way a run would
(online mode: undistort the full frame and every base of the participant, align each base,
crop; precropped mode: the frame's crops), resizes every crop to S x S as the run's last
resize would, and stores them (codec "raw": the uint8 pixels, exact; "jpeg": smaller, lossy) in
ArrayRecord shards, with the labels and the prior's 2D keypoints already in the stored pixels. A
run at data.out_img_size = S then only reads (raw) or decodes (jpeg) two crops per sample: its
resize is the identity, so the network sees the folder path's pixels (raw: exactly).

Packing is parallel (worker processes, one chunk of frames each) and resumable: a chunk is
written to temporary files and committed by renaming (its summary first, its shard last), so
after a kill a rerun packs only the missing chunks and ends with the same files. Bad frames are
skipped, listed in packed.json and reported by the reader as the folder reader would.

Record (one per good frame): uint32 header length, the JSON header, then the encoded crops it
points to (frame crop; one base crop per base index that aligned).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import time
from typing import Callable

import cv2
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from dd_jax.data import align, egodorsal, samples
from dd_jax.data.egodorsal import Frame
from dd_jax.data.store import FolderStore, FrameLoadError, Prior, decode_image
from dd_jax.data.transforms import resize_square

KIND = "crops"
SETTINGS = "pack_settings.json"
CODECS = ("raw", "jpeg")  # raw: S*S*3 uint8 bytes (exact); jpeg: 4:4:4 at jpeg_quality (lossy)
WRITER_OPTIONS = "group_size:1"  # one record per chunk (random access), ArrayRecord's zstd


def encode_crop(image: np.ndarray, codec: str, quality: int) -> bytes:
  """A uint8 (S, S, 3) RGB crop -> its stored bytes."""
  if codec == "raw":
    return np.ascontiguousarray(image, np.uint8).tobytes()
  ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, quality,
                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
  if not ok:
    raise RuntimeError("JPEG encoding failed")
  return data.tobytes()


def decode_crop(data, codec: str, size: int, where: str, frame_id: int | None) -> np.ndarray:
  """Stored bytes (bytes or memoryview) -> uint8 (size, size, 3) RGB; raw is a read-only view."""
  if codec == "raw":
    if len(data) != size * size * 3:
      raise FrameLoadError(frame_id, where, f"raw crop of {len(data)} bytes, expected "
                           f"{size} x {size} x 3 = {size * size * 3}")
    return np.frombuffer(data, np.uint8).reshape(size, size, 3)
  return decode_image(bytes(data), where, frame_id)


def _error(e: Exception, frame: Frame) -> dict:
  if isinstance(e, FrameLoadError):
    return {"path": e.path, "reason": e.reason}
  if isinstance(e, align.AlignmentError):
    return {"path": frame.hamer_path or "<frame>", "reason": f"alignment: {e}"}
  return {"path": frame.img_path or "<frame>", "reason": f"OpenCV failed on this frame: {e}"}


_BAD = (FrameLoadError, align.AlignmentError, cv2.error)


# ------------------------------------------------------------------ packing one chunk


class _ChunkPacker:
  """Frames -> records, in a worker process (decoded, undistorted bases cached per worker)."""

  def __init__(self, source: str, mode: str, size: int, codec: str, quality: int):
    self.index = egodorsal.load_index(source)
    self.store = FolderStore(self.index)
    self.mode, self.size, self.codec, self.quality = mode, size, codec, quality
    self._undistort = align.Undistorter()
    self._bases: dict[tuple[int, int], np.ndarray] = {}

  def _base_image(self, trial, base_idx: int, frame_id: int) -> np.ndarray:
    key = (trial.trial_id, base_idx)
    if key not in self._bases:
      if len(self._bases) >= 8:
        self._bases.pop(next(iter(self._bases)))
      data, path = self.store.base_image(trial.p_id, base_idx, frame_id)
      self._bases[key] = self._undistort(decode_image(data, path, frame_id), trial.K, trial.d)
    return self._bases[key]

  def _stored_keypoints(self, keypoints, crop: np.ndarray):
    """Crop pixels -> pixels of the S x S stored crop (as Finalize maps them to the input)."""
    if keypoints is None:
      return None
    h, w = crop.shape[:2]
    scale = np.array([self.size / w, self.size / h])
    return ((np.asarray(keypoints, np.float64) + 0.5) * scale - 0.5).astype(np.float32).tolist()

  def _crops(self, frame: Frame, prior: Prior):
    """(frame crop, {base index: base crop or error}, keypoints); raises for the whole frame."""
    trial = self.index.trials[frame.trial_id]
    if self.mode == "precropped":
      if frame.cropped_base_idx is None:
        raise FrameLoadError(frame.frame_id, "<frames.json>",
                             "precropped mode needs 'cropped_base_idx'")
      img, base, kp = samples.precropped_crops(self.store, frame, prior)
      return img, {frame.cropped_base_idx: base}, kp
    data, path = self.store.frame_image(frame, "img")
    full = self._undistort(decode_image(data, path, frame.frame_id), trial.K, trial.d)
    n_bases = len(self.index.bases.get(trial.p_id, []))
    if n_bases == 0:
      raise FrameLoadError(frame.frame_id, "bases.json", f"participant {trial.p_id} has no base")
    crop, kp, bases, first_error = None, None, {}, None
    for k in range(n_bases):
      try:
        base_prior = self.store.base_prior(trial.p_id, k, frame.frame_id)
        crop, bases[k], kp = samples.online_crops(
            full, self._base_image(trial, k, frame.frame_id), trial.K, frame, prior, base_prior,
            self.store.base_name(trial.p_id, k))
      except _BAD as e:
        bases[k] = _error(e, frame)
        first_error = first_error or e
    if crop is None:
      raise first_error
    return crop, bases, kp

  def record(self, frame: Frame) -> bytes:
    """The frame's record; raises FrameLoadError / AlignmentError / cv2.error for a bad frame."""
    prior = self.store.frame_prior(frame)
    crop, bases, kp = self._crops(frame, prior)
    header = {"frame_id": frame.frame_id, "crop_size": [crop.shape[1], crop.shape[0]],
              "prior_kp2d": self._stored_keypoints(kp, crop),
              "hand_pose": None if prior.hand_pose is None else prior.hand_pose.tolist(),
              "bases": {}, "errors": {}}
    try:
      header["gt_pose"] = self.store.frame_ground_truth(frame).tolist()
    except FrameLoadError as e:  # force frames need none: raised only when a pose run asks
      header["gt_pose"], header["errors"]["ann"] = None, _error(e, frame)
    blobs = [encode_crop(resize_square(crop, self.size), self.codec, self.quality)]
    header["frame"] = len(blobs[0])
    for k, base in sorted(bases.items()):
      if isinstance(base, dict):
        header["bases"][str(k)] = base
      else:
        blobs.append(encode_crop(resize_square(base, self.size), self.codec, self.quality))
        header["bases"][str(k)] = len(blobs[-1])
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)

  def pack_chunk(self, frames: list[Frame], record_path: str, summary_path: str) -> dict:
    """Writes the chunk's shard and summary to their temporary names; returns the summary."""
    packed, errors = [], {}
    writer = array_record_module.ArrayRecordWriter(record_path + ".tmp", WRITER_OPTIONS)
    try:
      for frame in frames:
        try:
          record = self.record(frame)
        except _BAD as e:
          errors[str(frame.frame_id)] = _error(e, frame)
          continue
        writer.write(record)
        packed.append(frame.frame_id)
    finally:
      writer.close()
    summary = {"frames": packed, "errors": errors}
    with open(summary_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(summary, f)
    return summary


_WORKER: _ChunkPacker | None = None


def _init_worker(*args) -> None:
  global _WORKER
  cv2.setNumThreads(1)
  _WORKER = _ChunkPacker(*args)


def _pack_chunk(job: tuple[int, list[Frame], str, str]):
  number, frames, record_path, summary_path = job
  return number, len(frames), _WORKER.pack_chunk(frames, record_path, summary_path)


def _commit(record_path: str, summary_path: str) -> None:
  """Makes a chunk final: its summary first, its shard (what marks a chunk done) last."""
  os.replace(summary_path + ".tmp", summary_path)
  os.replace(record_path + ".tmp", record_path)


# ------------------------------------------------------------------ the whole pack


def pack(source: str, out_dir: str, image_size: int, *, mode: str = "online",
         codec: str = "raw", jpeg_quality: int = 95, workers: int = 0, chunk_frames: int = 256,
         log: Callable[[str], None] = print) -> dict:
  """Packs the frames of `source` (frames.json and every split file) as crops of
  image_size x image_size; resumes an interrupted pack of the same settings. workers=0 packs
  in this process. Returns a summary."""
  from dd_jax.data import array_record  # pylint: disable=g-import-not-at-top
  if mode not in ("online", "precropped"):
    raise ValueError(f"mode must be 'online' or 'precropped', got {mode!r}")
  if codec not in CODECS:
    raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
  start = time.perf_counter()
  source, out_dir = os.path.abspath(source), os.path.abspath(out_dir)
  index = egodorsal.load_index(source)
  ordered, names = array_record.collect_frames(source, index)
  settings = {"kind": KIND, "source": source, "mode": mode, "image_size": int(image_size),
              "codec": codec, "jpeg_quality": int(jpeg_quality) if codec == "jpeg" else None,
              "chunk_frames": int(chunk_frames), "frames": len(ordered)}
  os.makedirs(out_dir, exist_ok=True)
  settings_path = os.path.join(out_dir, SETTINGS)
  if os.path.exists(settings_path):
    with open(settings_path, encoding="utf-8") as f:
      before = json.load(f)
    if before != settings:
      differ = ", ".join(f"{k}: {before.get(k)!r} there, {settings.get(k)!r} asked"
                         for k in sorted(set(before) | set(settings))
                         if before.get(k) != settings.get(k))
      raise ValueError(f"{out_dir} holds a pack with other settings ({differ}); pack into a new "
                       "folder or delete this one")
  else:
    with open(settings_path, "w", encoding="utf-8") as f:
      json.dump(settings, f)
  array_record.copy_metadata(source, out_dir, names)

  chunks = [ordered[i:i + chunk_frames] for i in range(0, len(ordered), chunk_frames)]
  paths = [(os.path.join(out_dir, f"crops-{i:05d}.array_record"),
            os.path.join(out_dir, f"crops-{i:05d}.json")) for i in range(len(chunks))]
  todo = [(i, chunks[i], *paths[i]) for i in range(len(chunks)) if not os.path.exists(paths[i][0])]
  done_before = len(chunks) - len(todo)
  if done_before:
    log(f"resuming: {done_before} of {len(chunks)} chunks already packed")
  total = sum(len(job[1]) for job in todo)
  done_frames, bad, t0 = 0, 0, time.perf_counter()

  def progress(number, n_frames, summary):
    nonlocal done_frames, bad
    _commit(*paths[number])
    done_frames += n_frames
    bad += len(summary["errors"])
    rate = done_frames / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done_frames) / max(rate, 1e-9)
    log(f"chunk {number + 1}/{len(chunks)}: {done_frames}/{total} frames, {bad} bad, "
        f"{rate:.1f} frames/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")

  args = (source, mode, int(image_size), codec, int(jpeg_quality))
  if workers <= 0:
    _init_worker(*args)
    for job in todo:
      progress(*_pack_chunk(job))
  elif todo:
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(todo)), _init_worker, args) as pool:
      for result in pool.imap_unordered(_pack_chunk, todo):
        progress(*result)

  frames, errors = [], {}
  for _, summary_path in paths:
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    frames += summary["frames"]
    errors.update(summary["errors"])
  meta = dict(settings, shards=[os.path.basename(p) for p, _ in paths], frames=frames,
              errors=errors, bases=_base_betas(index))
  with open(os.path.join(out_dir, array_record.PACK_INDEX), "w", encoding="utf-8") as f:
    json.dump(meta, f)
  for number, frame_id in enumerate(sorted(errors, key=int)):
    if number < 20:
      log(f"skipped frame {frame_id}: {errors[frame_id]['path']}: {errors[frame_id]['reason']}")
  elapsed = time.perf_counter() - start
  return {"frames": len(frames), "bad_frames": len(errors), "chunks": len(chunks),
          "chunks_resumed": done_before, "seconds": round(elapsed, 2),
          "frames_per_second": round(total / max(time.perf_counter() - t0, 1e-9), 1)}


def _base_betas(index: egodorsal.EgoDorsalIndex) -> list:
  """[p_id, base index, betas (10,) or None, error or None] of every base."""
  store, rows = FolderStore(index), []
  for p_id in sorted(index.bases):
    for k in range(len(index.bases[p_id])):
      try:
        betas = store.base_prior(p_id, k, None).betas
        rows.append([p_id, k, None if betas is None else betas.tolist(), None])
      except FrameLoadError as e:
        rows.append([p_id, k, None, {"path": e.path, "reason": e.reason}])
  return rows


# ------------------------------------------------------------------ reading


class CropStore:
  """Reads a crops pack (data.format="array_record" on a folder packed with --image_size):
  the store API of FolderStore plus `crops`, which SampleReader uses instead of aligning."""

  def __init__(self, packed_dir: str, meta: dict, data_config):
    self.packed_dir = os.path.abspath(packed_dir)
    self.image_size = int(meta["image_size"])
    where = os.path.join(self.packed_dir, "packed.json")
    if bool(data_config.precropped) != (meta["mode"] == "precropped"):
      raise ValueError(f"{where}: packed in {meta['mode']} mode, but data.precropped="
                       f"{bool(data_config.precropped)}; pack again with --crops_mode")
    if int(data_config.out_img_size) != self.image_size:
      raise ValueError(f"{where}: crops packed at {self.image_size} px, but data.out_img_size="
                       f"{data_config.out_img_size}; pack again with --image_size "
                       f"{data_config.out_img_size} (a second resize would change the pixels)")
    self.codec = meta.get("codec")  # packs made before codecs were recorded have none
    if self.codec not in CODECS:
      raise ValueError(f"{where}: codec {self.codec!r} (none: packed by an older dd_jax) is not "
                       f"one of {CODECS}; pack again")
    self._record = {fid: i for i, fid in enumerate(meta["frames"])}
    self._errors = meta["errors"]
    self._betas = {(p, k): (b, e) for p, k, b, e in meta["bases"]}
    self._shards = [os.path.join(self.packed_dir, s) for s in meta["shards"]]
    self._source = None
    self._cache: tuple[int, tuple[dict, bytes]] | None = None

  def __repr__(self) -> str:
    return f"CropStore({self.packed_dir!r}, {self.image_size} px)"

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_cache": None}

  def _get(self, frame: Frame) -> tuple[dict, bytes]:
    fid = frame.frame_id
    if self._cache is not None and self._cache[0] == fid:
      return self._cache[1]
    if str(fid) in self._errors:  # skipped when packed: the reason the folder reader gives
      error = self._errors[str(fid)]
      raise FrameLoadError(fid, error["path"], error["reason"] + " (when packed)")
    if fid not in self._record:
      raise FrameLoadError(fid, os.path.join(self.packed_dir, "packed.json"), "not packed")
    if self._source is None:
      self._source = array_record_data_source.ArrayRecordDataSource(self._shards)
    data = memoryview(self._source[self._record[fid]])  # slices below copy nothing
    n = struct.unpack("<I", data[:4])[0]
    entry = (json.loads(bytes(data[4:4 + n])), data[4 + n:])
    self._cache = (fid, entry)
    return entry

  def frame_prior(self, frame: Frame) -> Prior:
    header, _ = self._get(frame)
    pose = header["hand_pose"]
    return Prior(None if pose is None else np.asarray(pose, np.float32), None, None, None)

  def frame_ground_truth(self, frame: Frame) -> np.ndarray:
    header, _ = self._get(frame)
    if header["gt_pose"] is None:
      error = header["errors"]["ann"]
      raise FrameLoadError(frame.frame_id, error["path"], error["reason"])
    return np.asarray(header["gt_pose"], np.float32)

  def base_name(self, p_id: int, base_idx: int) -> str:
    return f"packed base {base_idx} of participant {p_id}"

  def base_prior(self, p_id: int, base_idx: int, frame_id: int) -> Prior:
    if (p_id, base_idx) not in self._betas:
      raise FrameLoadError(frame_id, os.path.join(self.packed_dir, "bases.json"),
                           f"participant {p_id} has no base #{base_idx}")
    betas, error = self._betas[p_id, base_idx]
    if error:
      raise FrameLoadError(frame_id, error["path"], error["reason"])
    return Prior(None, None if betas is None else np.asarray(betas, np.float32), None, None)

  def crops(self, frame: Frame, base_idx: int):
    """(frame crop, base crop) uint8 (S, S, 3) and the prior's keypoints in their pixels."""
    header, blobs = self._get(frame)
    fid = frame.frame_id
    where = f"{self.packed_dir} (frame {fid})"
    base = header["bases"].get(str(base_idx))
    if base is None:
      raise FrameLoadError(fid, where, f"base #{base_idx} was not packed")
    if isinstance(base, dict):
      raise FrameLoadError(fid, base["path"], base["reason"] + " (when packed)")
    offset = header["frame"]
    for k, length in header["bases"].items():
      if int(k) == base_idx:
        break
      if isinstance(length, int):
        offset += length
    img = decode_crop(blobs[:header["frame"]], self.codec, self.image_size, where, fid)
    base_img = decode_crop(blobs[offset:offset + base], self.codec, self.image_size, where, fid)
    kp = header["prior_kp2d"]
    return img, base_img, None if kp is None else np.asarray(kp, np.float32)


def packed_problems(meta: dict, frames: list[Frame], task: str, precropped: bool,
                    where: str) -> list[str]:
  """Validation of a crops pack: the run's mode, every frame packed and usable."""
  if precropped != (meta["mode"] == "precropped"):
    return [f"{where}: packed in {meta['mode']} mode, the run has data.precropped={precropped}"]
  packed, errors, problems = set(meta["frames"]), meta["errors"], []
  for f in frames:
    if str(f.frame_id) in errors:
      error = errors[str(f.frame_id)]
      problems.append(f"frame {f.frame_id}: {error['path']}: {error['reason']} (when packed)")
    elif f.frame_id not in packed:
      problems.append(f"frame {f.frame_id}: not in the packed records ({where})")
  del task  # a missing annotation is only known per record; the reader reports it
  return problems
