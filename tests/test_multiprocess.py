"""Several jax.distributed processes on this machine (gloo collectives on 127.0.0.1).

2 processes x 2 CPU devices train, validate and test exactly as 1 process x 4 devices, and a
process that dies makes the other exit with an error instead of hanging.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _start(workdir, data_dir, processes, devices, extra=(), env_per_process=None):
  args = [sys.executable, "-m", "dd_jax.train", f"--config=tests/tiny_config.py:pose,{data_dir}",
          f"--workdir={workdir}", "--config.max_epochs=3", "--config.data.batch_size=8",
          "--config.data.eval_batch_size=8", *extra]
  port = tiny.free_port()
  running = []
  for i in range(processes):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), **(env_per_process or {}).get(i, {}))
    flags = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",
                                       f"--num_processes={processes}", f"--process_id={i}",
                                       "--heartbeat_timeout_s=10"]
    running.append(subprocess.Popen(args + flags, cwd=tiny.ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
  return running


def _finish(running, timeout=420):
  outputs = [p.communicate(timeout=timeout)[0] for p in running]
  for p, out in zip(running, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _results(workdir):
  losses = tiny.train_losses(workdir)
  metrics_file, test = tiny.read_test_metrics(workdir)
  record = np.load(metrics_file.replace("test_metrics", "test_outputs").replace(".json", ".npy"),
                   allow_pickle=True).item()
  return losses, test, record


def test_two_processes_match_one_process_with_the_same_devices(tiny_dataset, tmp_path):
  single = str(tmp_path / "single")
  _finish(_start(single, tiny_dataset, processes=1, devices=4))
  multi = str(tmp_path / "multi")
  _finish(_start(multi, tiny_dataset, processes=2, devices=2))
  (loss1, test1, rec1), (loss2, test2, rec2) = _results(single), _results(multi)
  assert sorted(loss1) == sorted(loss2) == [1, 2, 3]
  np.testing.assert_allclose([loss2[s] for s in loss1], list(loss1.values()), rtol=1e-5)
  for key in ("test/mpjpe", "test/mpjpe-prior", "test/pa_mpjpe", "test/mpjae", "test/auc",
              "test/count"):
    np.testing.assert_allclose(test2[key], test1[key], rtol=1e-5, err_msg=key)
  n_test = len(json.load(open(os.path.join(tiny_dataset, "test.json")))["frames"])
  assert test2["test/count"] == n_test  # every test frame exactly once, padding masked
  np.testing.assert_array_equal(rec2["frame_id"], rec1["frame_id"])
  assert list(rec2["frame_id"]) == sorted(set(rec2["frame_id"].tolist()))
  np.testing.assert_allclose(rec2["pred_kp_3d"], rec1["pred_kp_3d"], atol=1e-6)


def test_a_dying_process_makes_the_others_exit(tiny_dataset, tmp_path):
  workdir = str(tmp_path / "dying")
  running = _start(workdir, tiny_dataset, processes=2, devices=2,
                   extra=["--config.max_epochs=50", "--config.checkpoint_every_steps=0"],
                   env_per_process={1: {"DD_JAX_SIGKILL_AT_STEP": "2"}})
  start = time.monotonic()
  survivor_out = running[0].communicate(timeout=180)[0]
  elapsed = time.monotonic() - start
  running[1].wait(timeout=30)
  assert running[1].returncode == -9
  assert running[0].returncode != 0, survivor_out[-3000:]
  assert elapsed < 150
