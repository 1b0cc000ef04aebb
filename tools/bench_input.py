"""The `input` row of tools/benchmark.py: one core's samples/s at real sizes, dd_jax beside the
original's data path, timed alternately in one process.

- online: 3840x2160 frame + base JPEGs -> decode, undistort, align, crop (~1200 px) -> 384;
- precrop: 1200x1200 JPEG pair -> 384;
- packed: the crops stored at 384 with the packer's default codec (tools/pack_array_record.py
  --image_size 384: raw uint8 pixels) -> 384.
dd_jax runs each with host augmentation, and with data.augment_on_device (the host then only
decodes and resizes; the augmentation's cost moves to the accelerator). The original has no
packed format: its precrop path is the comparison there. Its online mode is emulated as its
code lays it out (full-image cv2.undistort and warp; the released one never runs, SPEC.md §4).
JPEGs (quality 95) are generated into a temporary folder and read from files on every sample.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import cv2
import numpy as np


@dataclasses.dataclass
class InputSizes:
  frame: tuple[int, int] = (3840, 2160)
  crop: int = 1200
  out: int = 384
  samples: int = 2  # per timed call


def _photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
  """Photo-like RGB: smooth shading, mid-scale texture and sensor noise."""
  low = cv2.resize(rng.uniform(40, 220, (6, 10, 3)).astype(np.float32), (width, height),
                   interpolation=cv2.INTER_CUBIC)
  mid = cv2.resize(rng.normal(0, 20, (max(height // 16, 2), max(width // 16, 2), 3)).astype(
      np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
  return np.clip(low + mid + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)


def _write_jpeg(path: str, rgb: np.ndarray, quality: int = 95) -> str:
  ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  with open(path, "wb") as f:
    f.write(data.tobytes())
  return path


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def scene(sizes: InputSizes, seed: int = 0) -> dict[str, Any]:
  """Camera, distortion and a hand's keypoints whose crop is about sizes.crop pixels, as
  pixels (the original's inputs) and as HaMeR 3D keypoints (dd_jax's Prior)."""
  from dd_jax.data import align, egodorsal, store  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  w, h = sizes.frame
  K = np.array([[0.47 * w, 0, w / 2], [0, 0.47 * w, h / 2], [0, 0, 1]], np.float64)
  d = np.array([-0.08, 0.02, 0.0, 0.0, 0.0])
  span = sizes.crop - 150  # the crop adds 151 px of margin on each axis
  frame_kp = np.array([w / 2, h / 2]) + rng.uniform(-span / 2, span / 2, (21, 2))
  for i, corner in zip(egodorsal.CROP_KEYPOINTS[:2], ((-1, -1), (1, 1))):
    frame_kp[i] = np.array([w / 2, h / 2]) + np.array(corner) * span / 2
  angle = np.deg2rad(4.0)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  base_kp = (frame_kp - [w / 2, h / 2]) @ rotation.T + [w / 2 + 25, h / 2 - 15]
  focal = align.hamer_focal(K, w, h)

  def prior(pixels):
    xyz = np.concatenate([(pixels - [w / 2, h / 2]) / focal, np.ones((21, 1))], 1)
    return store.Prior(np.zeros(45, np.float32), np.zeros(10, np.float32), xyz, np.zeros(3))

  frame = egodorsal.Frame(0, 0, 0, None, None, None, None, None, "frame.npy", None, None)
  return {"K": K, "d": d, "frame_kp": frame_kp, "base_kp": base_kp, "frame": frame,
          "prior": prior(frame_kp), "base_prior": prior(base_kp)}


def run_row(sizes: InputSizes, repeats: int, compare, median) -> dict[str, Any]:
  """{online, precrop, packed}: samples/s per core of dd_jax (host / device augmentation) and
  the original, plus the bytes a sample sends to the devices."""
  import torch  # pylint: disable=import-outside-toplevel
  from array_record.python import array_record_data_source, array_record_module

  from dd_jax.data import align, crops, samples, store  # pylint: disable=import-outside-toplevel
  from dd_jax.data.transforms import resize_square  # pylint: disable=import-outside-toplevel

  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
  threads = (cv2.getNumThreads(), torch.get_num_threads())
  cv2.setNumThreads(1)  # per core: one OpenCV and one torch thread
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  s = scene(sizes)
  n, out = sizes.samples, sizes.out
  augment, finalize = samples.Augment(), samples.Finalize(out)
  finalize_uint8 = samples.Finalize(out, uint8=True)
  transform = tr.TorchvisionStyleTransform(out, generator=torch.Generator().manual_seed(0))
  undistort = align.Undistorter()
  results: dict[str, Any] = {"frame": list(sizes.frame), "crop": sizes.crop, "out": out,
                             "threads": 1}
  with tempfile.TemporaryDirectory(prefix="dd_jax_bench_input_") as tmp:
    write = lambda name, image, **kw: _write_jpeg(os.path.join(tmp, name), image, **kw)
    full = [write(f"frame{i}.jpg", _photo(*sizes.frame, rng)) for i in range(2)]
    precrops = [write(f"crop{i}.jpg", _photo(sizes.crop, sizes.crop, rng)) for i in range(2)]
    # Two records in an ArrayRecord shard written as the packer writes them (its codec and
    # options), read back through ArrayRecord on every sample.
    codec = crops.CODECS[0]  # the packer's default
    shard = os.path.join(tmp, "crops.array_record")
    writer = array_record_module.ArrayRecordWriter(shard, crops.WRITER_OPTIONS)
    for i in range(2):
      writer.write(crops.encode_crop(resize_square(_photo(sizes.crop, sizes.crop, rng), out),
                                     codec, 95))
    writer.close()
    packed = array_record_data_source.ArrayRecordDataSource([shard])

    def online_crops(i):
      img, base = (undistort(store.decode_image(_read(p), p, i), s["K"], s["d"])
                   for p in (full[i % 2], full[(i + 1) % 2]))
      crop, base_crop, _ = samples.online_crops(img, base, s["K"], s["frame"], s["prior"],
                                                s["base_prior"], "base")
      return {"img": crop, "base_img": base_crop, "valid": True}

    def decoded(paths, i):
      return {"img": store.decode_image(_read(paths[i % 2]), "img", i),
              "base_img": store.decode_image(_read(paths[(i + 1) % 2]), "base", i), "valid": True}

    def unpacked(i):
      return {"img": crops.decode_crop(packed[i % 2], codec, out, "img", i),
              "base_img": crops.decode_crop(packed[(i + 1) % 2], codec, out, "base", i),
              "valid": True}

    def host(make):
      def run():
        for i in range(n):
          finalize.map(augment.random_map(make(i), np.random.default_rng(i)))
      return run

    def device(make):
      def run():
        for i in range(n):
          assert finalize_uint8.map(make(i))["img"].dtype == np.uint8
      return run

    def original_online():
      for i in range(n):
        tr.original_online_sample(_read(full[i % 2]), _read(full[(i + 1) % 2]), s["K"], s["d"],
                                  s["frame_kp"], s["base_kp"], transform)

    def original_precrop():
      for i in range(n):
        tr.original_sample(_read(precrops[i % 2]), _read(precrops[(i + 1) % 2]), transform)

    cases = {
        "online": {"torch": original_online, "jax": host(online_crops),
                   "jax_device_augment": device(online_crops)},
        "precrop": {"torch": original_precrop, "jax": host(lambda i: decoded(precrops, i)),
                    "jax_device_augment": device(lambda i: decoded(precrops, i))},
        "packed": {"jax": host(unpacked), "jax_device_augment": device(unpacked)},
    }
    crop_size = online_crops(0)["img"].shape[:2]
    for name, fns in cases.items():
      times = compare(fns, 1, repeats)
      row = {fw: {"samples_per_s": n / median(ts)} for fw, ts in times.items()}
      if "torch" not in row:  # the original reads precrops: the row to beat
        row["torch"] = dict(results["precrop"]["torch"], what="original precrop path")
      for fw in ("jax", "jax_device_augment"):
        row[f"ratio_{fw}"] = row[fw]["samples_per_s"] / row["torch"]["samples_per_s"]
      results[name] = row
  results["online_crop_hw"] = list(crop_size)
  results["packed_codec"] = codec
  results["bytes_to_device"] = {"host_augment": 2 * out * out * 3 * 4,
                                "device_augment": 2 * out * out * 3}
  cv2.setNumThreads(threads[0])
  torch.set_num_threads(threads[1])
  return results


def table_lines(r: dict[str, Any]) -> list[str]:
  """Rows of the benchmark table."""
  w, h = r["frame"]
  titles = {"online": f"input, online from {w}x{h} JPEGs (crop {r['online_crop_hw'][1]}x"
                      f"{r['online_crop_hw'][0]})",
            "precrop": f"input, {r['crop']}x{r['crop']} precrops",
            "packed": f"input, crops packed at {r['out']} ({r['packed_codec']})"}
  lines = []
  for name, title in titles.items():
    row = r[name]
    torch_note = " (its precrop path)" if "what" in row["torch"] else ""
    lines.append(
        f"| {title} -> {r['out']}, per core | {row['jax']['samples_per_s']:.1f} samples/s host "
        f"aug; {row['jax_device_augment']['samples_per_s']:.1f} device aug | "
        f"{row['torch']['samples_per_s']:.1f} samples/s{torch_note} | "
        f"{row['ratio_jax']:.2f}x / {row['ratio_jax_device_augment']:.2f}x | "
        + {"online": "no slower", "precrop": "", "packed": ">= 250 / >= 400 samples/s"}[name]
        + " |")
  b = r["bytes_to_device"]
  lines.append(f"| bytes to the devices per sample | {b['device_augment'] / 1e6:.2f} MB (uint8, "
               f"device aug) | {b['host_augment'] / 1e6:.2f} MB (float32) | "
               f"{b['device_augment'] / b['host_augment']:.2f}x | <= 0.3x |")
  return lines
