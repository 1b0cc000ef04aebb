"""`python -m dd_jax.predict --data_dir` on an unlabelled EgoDorsal-layout set (no annotation
files; some priors missing, made on the fly with a tiny random HaMeR): every frame once, the
same predictions on 1 device, on 2 devices SIGKILLed and resumed, and in 2 processes; a bad
frame is listed and the others come out."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tiny_predict

from dd_jax.data import egodorsal
from dd_jax.full_frames import dataset

import tiny

pytest.importorskip("omegaconf")
CORRUPT_FRAME = 5  # trial 2's second frame
MISSING_PRIOR_TRIAL = 2  # its frames' priors (and participant 1's base 1's) are made here


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("predict_dataset_models"))
  return tiny_predict.hamer_folder(folder), tiny_predict.deltadorsal_folder(folder)


@pytest.fixture(scope="module")
def unlabelled(tiny_dataset, tmp_path_factory):
  """The tiny set without annotations, precrops or splits; trial 2 and one base without priors,
  one frame's JPEG truncated."""
  root = str(tmp_path_factory.mktemp("unlabelled") / "set")
  shutil.copytree(tiny_dataset, root)
  for pattern in ("trials/*/*/anns", "trials/*/*/cropped_*"):
    for path in glob.glob(os.path.join(root, pattern)):
      shutil.rmtree(path)
  for name in ("train.json", "val.json", "test.json"):
    os.remove(os.path.join(root, name))
  data = json.load(open(os.path.join(root, "frames.json")))
  for frame in data["frames"]:
    for key in ("ann_path", "cropped_img_path", "cropped_base_path", "cropped_base_idx"):
      frame.pop(key, None)
    if frame["trial_id"] == MISSING_PRIOR_TRIAL:
      os.remove(os.path.join(root, "trials", frame["hamer_path"]))
    if frame["frame_id"] == CORRUPT_FRAME:
      path = os.path.join(root, "trials", frame["img_path"])
      payload = open(path, "rb").read()
      open(path, "wb").write(payload[:len(payload) // 2])
  json.dump(data, open(os.path.join(root, "frames.json"), "w"))
  bases = json.load(open(os.path.join(root, "bases.json")))
  os.remove(os.path.join(root, "bases", bases["participants"][0]["bases"][1]["hamer_path"]))
  return root


def predict_set(data_dir, out, models, devices=1, processes=1, env=None,
                module=("-m", "dd_jax.predict")):
  args = [sys.executable, *module, f"--checkpoint={models[1]}", f"--hamer_weights={models[0]}",
          f"--data_dir={data_dir}", f"--out={out}", "--image_size=32", "--per_device_batch=2",
          "--base_choice=random"]
  port = tiny.free_port()
  running = []
  for i in range(processes):
    flags = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={i}"]
    running.append(subprocess.Popen(
        args + flags, cwd=tiny.ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
                 PYTHONPATH=os.pathsep.join([tiny.ROOT, os.path.join(tiny.ROOT, "tests")]),
                 **(env or {}))))
  outputs = [p.communicate(timeout=900)[0] for p in running]
  return [p.returncode for p in running], outputs


def _predictions(out):
  with np.load(os.path.join(out, dataset.NPZ_FILE)) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return arrays, open(os.path.join(out, dataset.JSONL_FILE), "rb").read()


def _assert_same(a, b):
  assert sorted(a[0]) == sorted(b[0])
  for key in a[0]:
    assert a[0][key].dtype == b[0][key].dtype, key
    np.testing.assert_array_equal(a[0][key], b[0][key], err_msg=key)  # NaN == NaN here
  assert a[1] == b[1]


@pytest.fixture(scope="module")
def reference_run(unlabelled, models, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("predict_one_device"))
  codes, outputs = predict_set(unlabelled, out, models)
  assert codes == [3], outputs[0][-4000:]  # 3: a frame failed, the others were predicted
  return out, _predictions(out), outputs[0]


def test_every_frame_once_with_priors_made_and_the_bad_frame_listed(reference_run, unlabelled):
  out, (arrays, jsonl), output = reference_run
  frames = egodorsal.select_frames(egodorsal.load_index(unlabelled), "all")
  assert arrays["frame_id"].tolist() == [f.frame_id for f in frames]
  bad = arrays["frame_id"] == CORRUPT_FRAME
  assert arrays["valid"].tolist() == (~bad).tolist()
  assert "truncated JPEG" in arrays["error"][bad][0] and f"frame {CORRUPT_FRAME}" in output
  assert arrays["pose"].shape == (len(frames), 45) and np.isfinite(arrays["pose"][~bad]).all()
  assert arrays["keypoints_2d"].shape == (len(frames), 21, 2)
  assert np.isfinite(arrays["keypoints_2d"][~bad]).all() and np.isnan(arrays["pose"][bad]).all()
  assert len(jsonl.splitlines()) == len(frames)
  # The missing priors were made into the output folder (frames tracked along their trial;
  # the bad frame has none); the set itself was not written.
  made = glob.glob(os.path.join(out, "priors", "frames", str(MISSING_PRIOR_TRIAL), "*.npy"))
  assert len(made) == tiny.DATASET["frames"] - 1
  assert len(glob.glob(os.path.join(out, "priors", "bases", "**", "*.npy"), recursive=True)) == 1
  assert "images/s, ETA" in output and "frames/s, ETA" in output
  report = json.load(open(os.path.join(out, dataset.REPORT_FILE)))
  assert report["predicted"] == len(frames) - 1 and len(report["failed"]) == 1


def test_two_devices_killed_and_resumed_give_the_same_predictions(reference_run, unlabelled,
                                                                  models, tmp_path):
  out = str(tmp_path / "out")
  codes, outputs = predict_set(unlabelled, out, models, devices=2,
                               env={"DD_JAX_SIGKILL_AFTER_RESULTS": "5"},
                               module=(os.path.join(tiny.ROOT, "tests", "predict_killed.py"),))
  assert codes == [-signal.SIGKILL], outputs[0][-4000:]
  assert "over 2 device(s)" in outputs[0]
  assert len(glob.glob(os.path.join(out, "frames", "*", "*.npz"))) == 5
  assert not os.path.exists(os.path.join(out, dataset.NPZ_FILE))
  codes, outputs = predict_set(unlabelled, out, models, devices=2)
  assert codes == [3], outputs[0][-4000:]
  assert "5 already done" in outputs[0]
  _assert_same(_predictions(out), reference_run[1])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_same_predictions(reference_run, unlabelled, models, tmp_path):
  out = str(tmp_path / "out")
  codes, outputs = predict_set(unlabelled, out, models, devices=1, processes=2)
  assert codes == [3, 3], outputs[0][-3000:] + outputs[1][-3000:]
  assert "over 2 device(s) of 2 process(es)" in outputs[0]
  _assert_same(_predictions(out), reference_run[1])
