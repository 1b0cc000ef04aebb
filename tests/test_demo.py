"""The README's demos, as a new user runs them: pose beats the prior, force beats the majority."""

import json
import os

import pytest

import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo") / "synthetic_egodorsal")  # generated on first use


def _results(workdir, best_metric, best_mode):
  """(val metrics of the best epoch, test metrics) of a finished run."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    vals = [r for r in map(json.loads, f) if best_metric in r]
  pick = min if best_mode == "min" else max
  val = pick(vals, key=lambda r: r[best_metric])  # first of equals, as the trainer keeps it
  return val, tiny.read_test_metrics(workdir)[1]


def test_pose_demo_beats_the_prior_by_15_percent(demo_data, tmp_path):
  result = tiny.run_train(["--config=configs/pose.py:demo", f"--workdir={tmp_path}",
                           f"--config.data.data_dir={demo_data}"])
  val, test = _results(str(tmp_path), "val/mpjpe", "min")
  for split, m in (("val", val), ("test", test)):
    prior = m[f"{split}/mpjpe-prior"]
    assert 8 < prior < 25, (split, prior)  # a realistic prior
    assert m[f"{split}/mpjpe"] < 0.85 * prior, (split, m[f"{split}/mpjpe"], prior)
  assert "% vs prior" in result.stderr + result.stdout


def test_force_demo_beats_the_majority_class(demo_data, tmp_path):
  tiny.run_train(["--config=configs/force.py:demo", f"--workdir={tmp_path}",
                  f"--config.data.data_dir={demo_data}"])
  val, test = _results(str(tmp_path), "val/acc", "max")
  for split, m in (("val", val), ("test", test)):
    assert m[f"{split}/f1_w"] > m[f"{split}/f1_w_majority"] + 0.1, (split, m)
