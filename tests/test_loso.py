"""tools/loso.py (every fold in turn, --fold / --merge, --evaluate_only), the analysis fields of
its test outputs, tools/report.py on its folder and on a force run, and W&B offline logging.

One 3-participant LOSO of the tiny synthetic set serves the whole module. The subprocesses share
a persistent XLA cache: every fold compiles the same programs, so only the first one compiles.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from absl import app

from dd_jax import safe_pickle
from dd_jax.analysis import pose_errors, report

import tiny

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("loso", os.path.join(ROOT, "tools", "loso.py"))
loso = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loso)
SEQUENTIAL = ("loso_table.md", "loso_results.json")
ORIGINAL_POSE_FIELDS = ("frame_id", "pose", "shape", "pred_kp_3d", "gt_kp_3d", "hamer_kp_3d")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(args, env_extra, check=True):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", **env_extra)
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def _loso(dataset, root, env, *extra, check=True):
  return _run(["tools/loso.py", f"--config=tests/tiny_config.py:pose,{dataset}",
               "--config.max_epochs=2", f"--workdir={root}", "--participants=1,2,3", *extra],
              env, check=check)


@pytest.fixture(scope="module")
def loso_root(tiny_dataset, tmp_path_factory, cache_env):
  root = str(tmp_path_factory.mktemp("sequential") / "loso")
  _loso(tiny_dataset, root, cache_env)
  for name in SEQUENTIAL:  # before --evaluate_only rewrites them
    shutil.copyfile(os.path.join(root, name), os.path.join(root, f"sequential_{name}"))
  return root


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_loso_runs_every_fold_and_tabulates(loso_root, tiny_dataset, cache_env):
  summary = _json(os.path.join(loso_root, "loso_results.json"))
  rows = summary["per_participant"]
  assert sorted(rows) == ["1", "2", "3"]
  frames = _json(os.path.join(tiny_dataset, "frames.json"))["frames"]
  trials = {t["trial_id"]: t for t in _json(os.path.join(tiny_dataset, "trials.json"))["trials"]}
  for p, row in rows.items():
    # Each fold tested exactly its participant's frames.
    (outputs,) = glob.glob(os.path.join(loso_root, f"fold_{p}", "test_outputs_epoch*.npy"))
    test = safe_pickle.load_npy(outputs)
    expected = sorted(f["frame_id"] for f in frames if trials[f["trial_id"]]["p_id"] == int(p))
    assert test["frame_id"].tolist() == expected and row["count"] == len(expected)
    # The original's fields, and beside them the analysis fields of each frame.
    assert set(ORIGINAL_POSE_FIELDS) <= set(test)
    by_id = {f["frame_id"]: f for f in frames}
    np.testing.assert_array_equal(test["p_id"], int(p))
    assert test["motion_type"].tolist() == [trials[by_id[i]["trial_id"]]["motion_type"]
                                            for i in expected]
    np.testing.assert_allclose(test["fsr_reading"], [by_id[i]["fsr_reading"] for i in expected])
    np.testing.assert_allclose(test["angle_error"], pose_errors.angle_errors(
        test["pred_kp_3d"], test["gt_kp_3d"]), rtol=1e-12)
    assert test["finger_visibility"].shape == (len(expected), 5)
    assert np.all((test["finger_visibility"] >= 0) & (test["finger_visibility"] <= 1))
  np.testing.assert_allclose(summary["mean"]["mpjpe"],
                             np.mean([r["mpjpe"] for r in rows.values()]), rtol=1e-9)
  table = open(os.path.join(loso_root, "loso_table.md")).read()
  assert "| mean |" in table and "| all frames |" in table

  # Re-test the folds' checkpoints only: the same numbers.
  _loso(tiny_dataset, loso_root, cache_env, "--evaluate_only")
  again = _json(os.path.join(loso_root, "loso_results.json"))
  for p in rows:
    np.testing.assert_allclose(again["per_participant"][p]["mpjpe"], rows[p]["mpjpe"], rtol=1e-5)


def test_fold_runs_and_merge_equal_the_sequential_table(loso_root, tiny_dataset, cache_env,
                                                        tmp_path, monkeypatch):
  root = str(tmp_path / "loso")
  # Fold 1 dies in its second epoch (kill -9) and resumes when it is run again.
  killed = _loso(tiny_dataset, root, dict(cache_env, DD_JAX_SIGKILL_AT_STEP="3"), "--fold=1",
                 check=False)
  assert killed.returncode != 0
  assert not os.path.exists(os.path.join(root, "fold_1", "fold_results.json"))
  with pytest.raises(app.UsageError, match=r"participants \[1, 2, 3\]"):
    loso.merge(root, [1, 2, 3], False, loso.POSE_COLUMNS)
  resumed = _loso(tiny_dataset, root, cache_env, "--fold=1")
  assert "restored" in resumed.stderr
  _loso(tiny_dataset, root, cache_env, "--fold=2")
  _loso(tiny_dataset, root, cache_env, "--fold=3", "--config.logger=wandb",
        "--config.wandb.mode=offline")
  _loso(tiny_dataset, root, cache_env, "--merge")
  assert (open(os.path.join(root, "loso_table.md")).read()
          == open(os.path.join(loso_root, "sequential_loso_table.md")).read())
  merged = _json(os.path.join(root, "loso_results.json"))
  sequential = _json(os.path.join(loso_root, "sequential_loso_results.json"))
  for p, row in sequential["per_participant"].items():
    for key, value in row.items():
      if key == "inference_ms_per_frame":  # wall time
        continue
      np.testing.assert_allclose(merged["per_participant"][p][key], value, rtol=1e-6, atol=1e-9,
                                 err_msg=f"fold {p} {key}")

  # A finished fold is not run again (the trainer is not called); with other settings it is an
  # error, not a silent reuse. The settings are those of the subprocesses' --config.
  config = tiny.config("pose", tiny_dataset, max_epochs=2)
  monkeypatch.setattr(loso.experiment, "train_and_evaluate", None)
  test = loso.run_fold(config, [1, 2, 3], 2, root, False)
  assert test == _json(os.path.join(root, "fold_2", loso.FOLD_RESULTS))["test"]
  config.seed = 7
  with pytest.raises(ValueError, match=r"other settings \(seed\)"):
    loso.run_fold(config, [1, 2, 3], 2, root, False)

  # The W&B offline run of fold 3: its files, the logged keys, and no error anywhere.
  (run_dir,) = glob.glob(os.path.join(root, "fold_3", "wandb", "offline-run-*"))
  (events,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  data = open(events, "rb").read()
  for key in (b"train/loss", b"val/mpjpe", b"test/mpjpe", b"n_unfrozen_blocks", b"trainer/step"):
    assert key in data, key
  assert glob.glob(os.path.join(run_dir, "files", "media", "images", "val", "*.png"))
  for log_file in glob.glob(os.path.join(run_dir, "logs", "*.log")):
    text = open(log_file).read()
    assert '"level":"ERROR"' not in text and " ERROR " not in text, log_file
  assert not glob.glob(os.path.join(root, "fold_3", "tensorboard"))


TABLES = ("per_joint", "per_motion_type", "per_hand_position", "visibility_bins", "occluded",
          "visibility_fit", "occluded_taps", "occluded_pinches", "per_participant", "anova",
          "pck_auc")


def _check_png(path):
  image = cv2.imread(path)
  assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, path
  assert image.std() > 5, f"{path} is blank"


def test_report_of_the_loso_folder(loso_root, tmp_path, cache_env):
  out = str(tmp_path / "report")
  _run(["tools/report.py", loso_root, f"--out={out}"], cache_env)
  text = open(os.path.join(out, "report.md")).read()
  assert "from 3 LOSO folds" in text and "Not available" not in text
  assert "Notes:" not in text  # the test phase wrote every field the report needs
  for section in ("## 1. Per joint", "## 2.", "## 3. Finger visibility", "## 4.",
                  "## 6. Per participant", "## 7. PCK"):
    assert section in text
  for name in TABLES:
    assert f"`{name}.csv`" in text
    lines = open(os.path.join(out, f"{name}.csv")).read().strip().split("\n")
    assert len(lines) >= 2, name
  for name in ("pck.png", "mpjae_vs_visibility.png"):
    assert f"]({name})" in text
    _check_png(os.path.join(out, name))
  # Mean ± SD across participants of the per-joint table from the folds' own outputs.
  records = [safe_pickle.load_npy(max(glob.glob(os.path.join(loso_root, f"fold_{p}", "**",
                                                              "test_outputs_epoch*.npy"),
                                            recursive=True), key=os.path.getmtime))
             for p in (1, 2, 3)]
  per = [pose_errors.angle_errors(r["pred_kp_3d"], r["gt_kp_3d"]).mean(0) for r in records]
  header, *rows = [line.split(",") for line in open(os.path.join(out, "per_joint.csv")).read()
                   .strip().split("\n")]
  mean, sd = header.index("DeltaDorsal error mean"), header.index("DeltaDorsal error sd")
  for j in range(15):
    np.testing.assert_allclose([float(rows[j][mean]), float(rows[j][sd])],
                               [np.mean(per, 0)[j], np.std(per, 0, ddof=1)[j]], rtol=1e-9)


def test_report_of_a_force_run(tiny_dataset, tmp_path, cache_env):
  workdir = str(tmp_path / "force")
  tiny.run_train([f"--config=tests/tiny_config.py:force,{tiny_dataset}", f"--workdir={workdir}",
                  "--config.max_epochs=1"], env_extra=cache_env)
  out = str(tmp_path / "report")
  text = open(report.write_report(workdir, out)).read()
  assert "from one run" in text and "## 5. Force" in text
  for name in ("force_frames", "force_clicks", "force_per_participant"):
    assert f"`{name}.csv`" in text and os.path.exists(os.path.join(out, f"{name}.csv"))
  confusions = glob.glob(os.path.join(out, "confusion_*.png"))
  assert confusions
  for path in confusions:
    _check_png(path)
  # The click count: runs of frames above 20% of their trial's maximum reading.
  test = safe_pickle.load_npy(glob.glob(os.path.join(workdir, "test_outputs_epoch*.npy"))[0])
  expected = 0
  for trial in np.unique(test["trial_id"]):
    rows = np.flatnonzero(test["trial_id"] == trial)
    fsr = test["fsr_reading"][rows[np.argsort(test["timestamp"][rows])]]
    above = fsr > 0.2 * fsr.max()
    expected += int(above[0]) + int(np.sum(above[1:] & ~above[:-1]))
  header, *rows = [line.split(",") for line in open(os.path.join(out, "force_clicks.csv"))
                   .read().strip().split("\n")]
  assert int(rows[-1][1]) == expected and rows[-1][0] == "all"


def test_wandb_mode_without_credentials_is_offline(monkeypatch, tmp_path):
  from dd_jax import wandb_logger
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.delenv("WANDB_MODE", raising=False)
  assert wandb_logger.choose_mode("") == "offline"
  assert wandb_logger.choose_mode("online") == "online"
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert wandb_logger.choose_mode("") == "disabled"
