"""Crops packed at training size (tools/pack_array_record.py --image_size): the same samples as
the folder's online / precropped path (raw: exactly; jpeg: within its error), bad frames skipped
and listed, a killed pack resumed to the same files."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from dd_jax.data import crops, egodorsal, pipeline, samples, store, validation

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SIZE = PACK_SIZE = 32  # a run reads crops packed at its own size


@pytest.fixture(scope="module")
def packs(tiny_dataset, tmp_path_factory):
  out = {}
  for mode, codec in (("online", "raw"), ("precropped", "raw"), ("online", "jpeg")):
    path = str(tmp_path_factory.mktemp(f"crops_{mode}_{codec}"))
    summary = crops.pack(tiny_dataset, path, PACK_SIZE, mode=mode, codec=codec, chunk_frames=5,
                         log=lambda line: None)
    assert summary["frames"] == 24 and summary["bad_frames"] == 0 and summary["chunks"] == 5
    out[mode if codec == "raw" else f"{mode}_{codec}"] = path
  return out


def _reader(root, task="pose", **kw):
  config = tiny.pose_data_config(root, out_img_size=TRAIN_SIZE, **kw)
  return pipeline._reader(config, task, "all")  # pylint: disable=protected-access


@pytest.mark.parametrize("pack", ["online", "precropped", "online_jpeg"])
def test_packed_crops_give_the_folder_samples(tiny_dataset, packs, pack):
  """Network inputs (uint8, before augmentation) from the pack vs from the folder (aligned
  online / precropped, then resized to the training size): labels equal, keypoints to 1e-5 px,
  pixels equal with the default raw codec; with jpeg (quality 95, 4:4:4) within its error,
  measured here at mean 2.0 and max 20 intensity levels (the synthetic set's textured hands at
  32 px are nearly all edges; 384-px photo-like crops: mean 1.3, max 11)."""
  precropped = pack == "precropped"
  folder = _reader(tiny_dataset, precropped=precropped)
  packed = _reader(packs[pack], precropped=precropped, format="array_record")
  assert type(packed.store) is crops.CropStore
  finalize = samples.Finalize(TRAIN_SIZE, uint8=True)
  errors = []
  for number in range(24):
    # The same rng: the online mode's random base is drawn the same way from either store.
    a = finalize.map(folder.read(number, np.random.default_rng(number)))
    b = finalize.map(packed.read(number, np.random.default_rng(number)))
    assert a.keys() == b.keys()
    for key in a:
      if key in ("img", "base_img"):
        assert a[key].shape == b[key].shape == (TRAIN_SIZE, TRAIN_SIZE, 3)
        errors.append(np.abs(a[key].astype(int) - b[key]))
      elif key == "prior_kp2d":
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)
      else:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  errors = np.stack(errors)
  if pack.endswith("jpeg"):
    assert errors.mean() < 2.5 and errors.max() <= 24, (errors.mean(), errors.max())
  else:
    assert errors.max() == 0, (errors.mean(), errors.max())
  force = _reader(packs[pack], precropped=precropped, format="array_record", task="force")
  assert force.read(4, None)["valid"]


def test_pack_settings_are_checked(tiny_dataset, packs, tmp_path):
  with pytest.raises(ValueError, match="packed in online mode, but data.precropped=True"):
    _reader(packs["online"], precropped=True, format="array_record")
  for size in (16, 48):  # a second resize (down or up) would change the pixels
    with pytest.raises(ValueError, match=f"crops packed at 32 px, but data.out_img_size={size}"):
      pipeline._reader(tiny.pose_data_config(packs["online"], precropped=False,  # pylint: disable=protected-access
                                             out_img_size=size, format="array_record"),
                       "pose", "all")
  with pytest.raises(ValueError, match="other settings \\(image_size: 32 there, 48 asked\\)"):
    crops.pack(tiny_dataset, packs["online"], 48, chunk_frames=5, log=lambda line: None)
  with pytest.raises(ValueError, match="codec: 'raw' there, 'jpeg' asked, jpeg_quality: None "
                     "there, 95 asked"):
    crops.pack(tiny_dataset, packs["online"], PACK_SIZE, codec="jpeg", chunk_frames=5,
               log=lambda line: None)
  old = str(tmp_path / "old")  # packed before the codec was recorded
  shutil.copytree(packs["online"], old)
  meta = json.load(open(os.path.join(old, "packed.json")))
  del meta["codec"]
  json.dump(meta, open(os.path.join(old, "packed.json"), "w"))
  with pytest.raises(ValueError, match="codec None .* not one of"):
    _reader(old, precropped=False, format="array_record")
  assert "24 frames" in validation.validate_dataset(
      tiny.pose_data_config(packs["online"], precropped=False, format="array_record"),
      splits=["all"])


def test_bad_frames_are_skipped_and_listed(tiny_dataset, tmp_path):
  root = str(tmp_path / "broken")
  shutil.copytree(tiny_dataset, root)
  frames = {f.frame_id: f for f in egodorsal.select_frames(egodorsal.load_index(root), "all")}
  os.remove(frames[3].img_path)
  with open(frames[7].hamer_path, "wb") as f:
    f.write(b"not a numpy file")
  lines = []
  out = str(tmp_path / "packed")
  summary = crops.pack(root, out, PACK_SIZE, chunk_frames=10, log=lines.append)
  assert summary["frames"] == 22 and summary["bad_frames"] == 2
  assert any(f"skipped frame 3: {frames[3].img_path}: file not found" in line for line in lines)
  assert any("ETA" in line for line in lines)
  packed = _reader(out, precropped=False, format="array_record")
  with pytest.raises(store.FrameLoadError, match="frame 3: .*file not found \\(when packed\\)"):
    packed.read(3, None)
  with pytest.raises(store.FrameLoadError, match=f"frame 7: {frames[7].hamer_path}"):
    packed.read(7, None)
  assert packed.read(4, None)["valid"]
  skipping = _reader(out, precropped=False, format="array_record", skip_bad_frames=True)
  assert not skipping.read(3, None)["valid"]
  with pytest.raises(egodorsal.DatasetFormatError, match="frame 3: .*file not found"):
    validation.validate_dataset(tiny.pose_data_config(out, precropped=False,
                                                      format="array_record"), splits=["all"])


def _files(path):
  return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.mark.slow
def test_killed_pack_resumes_to_the_same_files(tiny_dataset, packs, tmp_path):
  """SIGKILLed after committing 2 of 5 chunks, then rerun with 2 worker processes: the files of
  the uninterrupted in-process pack, byte for byte."""
  out = str(tmp_path / "packed")
  command = ["--src", tiny_dataset, "--out", out, "--image_size", str(PACK_SIZE),
             "--chunk_frames", "5"]
  env = dict(os.environ, DD_JAX_SIGKILL_AFTER_CHUNKS="2")
  killed = subprocess.run([sys.executable, os.path.join("tests", "pack_killed.py"), *command,
                           "--workers", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) == [
      "crops-00000.array_record", "crops-00001.array_record"]
  resumed = subprocess.run([sys.executable, os.path.join("tools", "pack_array_record.py"),
                            *command, "--workers", "2"], cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming: 2 of 5 chunks already packed" in resumed.stdout + resumed.stderr
  reference = _files(packs["online"])
  assert sum(n.endswith(".array_record") for n in reference) == 5
  assert _files(out) == reference
