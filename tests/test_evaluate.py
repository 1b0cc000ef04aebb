"""The evaluation entry points: dd_jax.evaluate on a run (tools/loso.py: tests/test_loso.py)."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_cli_requires_a_checkpoint(tiny_dataset):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run([sys.executable, "-m", "dd_jax.evaluate",
                           f"--config=tests/tiny_config.py:pose,{tiny_dataset}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "ckpt_path is required" in result.stderr


def test_metrics_do_not_depend_on_the_device_count(tiny_dataset):
  import jax

  from dd_jax import evaluation, parallel, train_state
  from dd_jax.data import pipeline

  import tiny

  # 16 rows for 8 test frames: half of every batch is padding that must not count.
  config = tiny.config("pose", tiny_dataset, **{"data.eval_batch_size": 16})
  results = {}
  for n in (1, 2, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    built = train_state.build(config, mesh)  # same seed: same parameters on every mesh
    loader = pipeline.make_eval_loader(config.data, "pose", "test")
    results[n] = evaluation.evaluate(built.eval_step, (built.state["params"], built.frozen,
                                                       built.task.consts), loader, mesh,
                                     built.task.finalize, keep_outputs=True)
  n_test = len(json.load(open(os.path.join(tiny_dataset, "test.json")))["frames"])
  for n in (2, 8):
    metrics, outputs = results[n].metrics, results[n].outputs
    assert metrics["count"] == n_test
    for key in ("mpjpe", "mpjpe-prior", "pa_mpjpe", "mpjae", "auc", "loss"):
      np.testing.assert_allclose(metrics[key], results[1].metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(outputs["frame_id"], results[1].outputs["frame_id"])
