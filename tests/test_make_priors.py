"""tools/make_priors.py and dd_jax.priors.job on the synthetic EgoDorsal set with a converted
random-weight HaMeR: 1 device, 2 devices (SIGKILLed and rerun) and 4 devices in 2 processes
write byte-identical files, bad images are named and skipped, nothing in a crafted checkpoint
runs, and the trainer runs on the priors made."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from dd_jax import parallel
from dd_jax.convert import hamer as convert_hamer
from dd_jax.data import egodorsal, store, validation
from dd_jax.models import hamer, hamer_weights
from dd_jax.priors import job, writer
from dd_jax.priors import predictor as predictor_lib
from dd_jax.synthetic import hand as mano_synthetic

import tiny
from reference import hamer as ref

pytest.importorskip("omegaconf")
CORRUPT_FRAME = 6  # trial 2's third frame: its successor falls back to the whole image


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny random HaMeR saved as HaMeR's .ckpt and converted (folder, ckpt, model)."""
  folder = tmp_path_factory.mktemp("make_priors_hamer")
  model = ref.tiny_model(str(folder / "mano"), seed=7)
  ckpt = folder / "hamer.ckpt"
  ref.save_checkpoint(str(ckpt), model, ref.omegaconf_hyper_parameters())
  config, params, notes = convert_hamer.convert(ckpt, hamer.get_config("custom", **ref.TINY_CUSTOM))
  hamer_weights.save_converted(folder / "converted", config, params, notes=notes)
  return folder / "converted", ckpt, model


def fresh_copy(tiny_dataset, target):
  """The tiny synthetic set without its prior files, one frame's JPEG corrupted."""
  shutil.copytree(tiny_dataset, target)
  for path in glob.glob(os.path.join(target, "**", "hamer", "*.npy"), recursive=True):
    os.remove(path)
  frames = json.load(open(os.path.join(target, "frames.json")))["frames"]
  bad = next(f for f in frames if f["frame_id"] == CORRUPT_FRAME)
  path = os.path.join(target, "trials", bad["img_path"])
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])  # truncated: no end-of-image marker
  return str(target)


def prior_files(root):
  return {os.path.relpath(p, root): open(p, "rb").read()
          for p in sorted(glob.glob(os.path.join(root, "**", "hamer", "*.npy"), recursive=True))}


def make_priors(data_dir, weights, devices=1, extra=(), env=None, processes=1,
                script=os.path.join("tools", "make_priors.py")):
  args = [sys.executable, os.path.join(tiny.ROOT, script),
          f"--data_dir={data_dir}", f"--hamer={weights}", "--mano=synthetic",
          "--per_device_batch=2", *extra]
  running = []
  port = tiny.free_port()
  for i in range(processes):
    flags = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={i}"]
    running.append(subprocess.Popen(
        args + flags, cwd=tiny.ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=tiny.ROOT,
                 **(env or {}))))
  outputs = [p.communicate(timeout=600)[0] for p in running]
  return [p.returncode for p in running], outputs


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, converted, tmp_path_factory):
  """One process, one device: the files every other way of running must reproduce."""
  root = fresh_copy(tiny_dataset, tmp_path_factory.mktemp("priors") / "one_device")
  codes, outputs = make_priors(root, converted[0])
  assert codes == [3], outputs[0][-3000:]  # 3: some image was skipped
  return root, prior_files(root), outputs[0]


def test_every_image_gets_a_prior_and_the_bad_one_is_named(reference_run):
  root, files, output = reference_run
  index = egodorsal.load_index(root)
  frames = egodorsal.select_frames(index, "all")
  bases = [b for bs in index.bases.values() for b in bs]
  assert len(files) == len(frames) + len(bases) - 1
  bad = next(f for f in frames if f.frame_id == CORRUPT_FRAME)
  assert f"frame {CORRUPT_FRAME}: {bad.img_path}: truncated JPEG" in output
  report = json.load(open(os.path.join(root, job.REPORT_FILE)))
  assert len(report["failed"]) == 1 and f"frame {CORRUPT_FRAME}" in report["failed"][0]
  written = {p: writer.read_prior(os.path.join(root, p)) for p in files}
  counted = {s: sum(d["box_source"] == s for d in written.values()) for s in writer.BOX_SOURCES}
  assert report["by_source"] == counted and counted["boxes_json"] == 0
  # Bases and each trial's first frame use the whole image, the frame after the bad one too;
  # a tracked frame's box is the box around its predecessor's keypoints_2d (random weights
  # shrink the hand until its box is under a pixel: then the whole image again).
  by_frame = {f.frame_id: writer.read_prior(f.hamer_path) for f in frames
              if f.frame_id != CORRUPT_FRAME}
  assert by_frame[CORRUPT_FRAME + 1]["box_source"] == "whole_image"
  trial_frames = tiny.DATASET["frames"]
  assert all(by_frame[i]["box_source"] == "whole_image" for i in by_frame if i % trial_frames == 0)
  tracked = [i for i, d in by_frame.items() if d["box_source"] == "tracked"]
  assert len(tracked) >= len(index.trials)
  for i in tracked:
    before = by_frame[i - 1]["keypoints_2d"][0]
    np.testing.assert_allclose(by_frame[i]["box_center"][0],
                               (before.min(0) + before.max(0)) / 2, rtol=1e-6)
  assert not glob.glob(os.path.join(root, "**", "*.tmp"), recursive=True)
  # The priors load through the normal readers.
  folder = store.FolderStore(index)
  for frame in frames:
    if frame.frame_id != CORRUPT_FRAME:
      prior = folder.frame_prior(frame)
      assert prior.hand_pose.shape == (45,) and prior.keypoints_3d.shape == (21, 3)
  assert folder.base_prior(1, 0, 0).betas.shape == (10,)


def test_two_devices_killed_and_rerun_give_the_same_files(reference_run, converted,
                                                          tiny_dataset, tmp_path):
  """2 devices, SIGKILLed after 7 files (mid-batch, mid-wave), then rerun: every file as the
  1-device run wrote it."""
  root = fresh_copy(tiny_dataset, tmp_path / "data")
  codes, outputs = make_priors(root, converted[0], devices=2,
                               env={"DD_JAX_SIGKILL_AFTER_PRIORS": "7"},
                               script=os.path.join("tests", "make_priors_killed.py"))
  assert codes == [-signal.SIGKILL], outputs[0][-3000:]
  assert "over 2 device(s)" in outputs[0]
  partial = prior_files(root)
  assert len(partial) == 7 and all(reference_run[1][k] == v for k, v in partial.items())
  codes, outputs = make_priors(root, converted[0], devices=2)
  assert codes == [3], outputs[0][-3000:]
  assert "7 already there" in outputs[0]
  assert prior_files(root) == reference_run[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_four_devices_in_two_processes_write_the_same_files(reference_run, converted,
                                                            tiny_dataset, tmp_path):
  root = fresh_copy(tiny_dataset, tmp_path / "data")
  codes, outputs = make_priors(root, converted[0], devices=2, processes=2)
  assert codes == [3, 3], outputs[0][-3000:] + outputs[1][-3000:]
  assert "over 4 device(s) of 2 process(es)" in outputs[0]
  assert prior_files(root) == reference_run[1]


@pytest.mark.slow
def test_trainer_runs_on_the_priors_made(reference_run, tmp_path):
  root = str(tmp_path / "data")
  shutil.copytree(reference_run[0], root)
  # Precropped training needs every frame's prior: give the skipped frame its neighbour's.
  frames = json.load(open(os.path.join(root, "frames.json")))["frames"]
  bad = next(f for f in frames if f["frame_id"] == CORRUPT_FRAME)
  shutil.copy(os.path.join(root, "trials", next(
      f for f in frames if f["frame_id"] == CORRUPT_FRAME + 1)["hamer_path"]),
              os.path.join(root, "trials", bad["hamer_path"]))
  config = tiny.config("pose", root)
  print(validation.validate_dataset(config.data, "pose"))
  workdir = str(tmp_path / "run")
  tiny.run_train([f"--config=tests/tiny_config.py:pose,{root}", f"--workdir={workdir}",
                  "--config.max_epochs=1", "--config.test=False"])
  assert tiny.train_losses(workdir)


# ------------------------------------------------------------------ in-process: plans and folders


@pytest.fixture(scope="module")
def predictor(converted):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))
  return predictor_lib.HamerPredictor.from_weights(
      str(converted[0]), mano_synthetic.synthetic_mano_model(), mesh)[0]


def test_plan_follows_each_trial(tiny_dataset):
  items, notes = job.list_items(tiny_dataset)
  assert not notes
  frames = [i for i, item in enumerate(items) if item.sequence is not None]
  plan = job.make_plan(items, {}, overwrite=True)
  per_trial = tiny.DATASET["frames"]
  assert len(plan.waves) == per_trial
  assert len(plan.waves[0]) == len(items) - len(frames) + len(frames) // per_trial
  for after, before in plan.previous.items():
    assert items[after].sequence == items[before].sequence
    assert items[after].order > items[before].order
  boxes = {items[i].image_path: (np.array([0, 0, 10, 10]), True) for i in frames}
  assert len(job.make_plan(items, boxes, overwrite=True).waves) == 1


def test_precropped_only_frames_use_their_crops(tiny_dataset, tmp_path):
  root = tmp_path / "precropped"
  shutil.copytree(tiny_dataset, root)
  data = json.load(open(root / "frames.json"))
  for frame in data["frames"]:
    del frame["img_path"]
  json.dump(data, open(root / "frames.json", "w"))
  items, _ = job.list_items(str(root))
  frames = [item for item in items if item.name.startswith("frame")]
  assert frames and all("cropped_images" in item.image_path and item.sequence is None
                        and item.K is None for item in frames)


def test_folder_of_images_with_boxes_and_a_bad_file(tmp_path, predictor):
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "clips" / "a")
  for name in ("one", "two", "three"):
    image = rng.integers(0, 255, (120, 160, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "clips" / "a" / f"{name}.jpg"), image)
  (tmp_path / "clips" / "a" / "broken.png").write_bytes(b"not an image")
  json.dump({"a/one.jpg": {"box": [20, 30, 70, 90], "is_right": False},
             "a/two.jpg": {"box": [60, 10, 100, 60]}},
            open(tmp_path / "clips" / "boxes.json", "w"))
  messages = []
  report = job.run(str(tmp_path / "clips"), predictor, job.Options(per_device_batch=1),
                   log=messages.append)
  assert report.by_source == {"boxes_json": 2, "tracked": 0, "whole_image": 1}
  assert len(report.failed) == 1 and "a/broken.png" in report.failed[0]
  assert any("skipped: a/broken.png" in m for m in messages)
  one = writer.read_prior(str(tmp_path / "clips" / "a" / "hamer" / "one.npy"))
  assert one["box_source"] == "boxes_json" and one["is_right"] == 0
  np.testing.assert_allclose(one["box_center"][0], [45, 60])
  three = writer.read_prior(str(tmp_path / "clips" / "a" / "hamer" / "three.npy"))
  assert three["box_source"] == "whole_image" and tuple(three["image_size"]) == (160, 120)
  # A rerun finds everything done (the bad file is tried again and skipped again).
  again = job.run(str(tmp_path / "clips"), predictor, job.Options(per_device_batch=1),
                  log=messages.append)
  assert again.skipped_existing == 3 and again.written == 0 and len(again.failed) == 1


def test_crafted_checkpoint_runs_nothing(converted, tmp_path):
  marker = tmp_path / "executed"

  class Exploit:

    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  ckpt = tmp_path / "crafted.ckpt"
  ref.save_checkpoint(str(ckpt), converted[2], {"cfg": Exploit()}, callbacks=Exploit())
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))
  predictor, notes = predictor_lib.HamerPredictor.from_weights(
      str(ckpt), mano_synthetic.synthetic_mano_model(), mesh, variant="custom",
      custom=ref.TINY_CUSTOM)
  assert not marker.exists()
  assert any("system" in note for note in notes)
  assert predictor.predict(np.zeros((1, 256, 256, 3), np.float32))["betas"].shape == (1, 10)
