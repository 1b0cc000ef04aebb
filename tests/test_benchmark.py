"""Smoke test of tools/benchmark.py on a tiny model: every row runs, both sides compute the same
loss, and the table renders. No timing assertions (benchmarks are scripts, not timed tests)."""

import dataclasses
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

benchmark = pytest.importorskip("benchmark")
pytest.importorskip("smplx")
pytest.importorskip("transformers")


def tiny_settings():
  return dataclasses.replace(benchmark.Settings.quick(), compile_depths=(1,), compile_unfrozen=(),
                             mano_batches=(1, 3), repeats=1)


def test_quick_rows_run_and_agree(tmp_path):
  s = tiny_settings()
  rows = ("train", "infer", "mano", "pipeline", "input", "compile")
  results = benchmark.run(s, rows, log=lambda message: None)
  got = results["rows"]
  assert set(rows) <= set(got)
  parity = got["train"]["parity"]
  # Same weights, same batch: dd_jax and the PyTorch original compute the same loss and the same
  # gradient norm (over the same trainable subset) in their first training step.
  assert parity["rel_loss_diff"] < 1e-4, parity
  assert parity["rel_grad_norm_diff"] < 1e-3, parity
  for name in ("train", "infer"):
    for fw in ("jax", "torch"):
      assert got[name][fw]["samples_per_s"] > 0
    assert got[name]["flops_per_sample_analytic"] > 0
  assert list(got["mano_sync"]) == ["1"]  # batch 1 again, synchronous dispatch (a child)
  for row in [*got["mano"].values(), *got["mano_sync"].values()]:
    assert row["max_abs_vertex_diff_m"] < 1e-5
    assert row["jax"]["hands_per_s"] > 0 and row["torch"]["hands_per_s"] > 0
  assert got["pipeline"]["jax"]["samples_per_s"] > 0
  for case in ("online", "precrop", "packed"):
    for fw in ("jax", "jax_device_augment", "torch"):
      assert got["input"][case][fw]["samples_per_s"] > 0, (case, fw)
  assert got["input"]["bytes_to_device"]["device_augment"] * 4 == (
      got["input"]["bytes_to_device"]["host_augment"])
  assert got["compile"]["by_depth"][0]["compile_s"] > 0
  text = benchmark.table(results)
  assert "pose train step" in text and "MANO forward, batch 3" in text
  # The ISA facts and the dots' kernels head the table and are in the JSON.
  isa = results["machine"]["isa"]
  assert {"cpu", "family", "model", "avx2", "avx512", "amx", "isa_caps"} <= set(isa)
  assert text.startswith(f"CPU: {isa['cpu']}") and "AVX-512 " in text
  assert sum(k["dots"] for k in got["train"]["compile"]["dot_kernels"].values()) > 0
  assert "XLA dots, train step: " in text
  assert "batch 1, synchronous CPU dispatch" in text
  assert "input, online from 480x270 JPEGs" in text and "crops packed at 64" in text


def test_memory_child_reports_peak_rss(tmp_path):
  """The child-process measurement, run in-process here (the script runs it as a subprocess)."""
  from reference import deltadorsal as torch_reference  # pylint: disable=import-outside-toplevel
  s = tiny_settings()
  torch_reference.make_mano(str(tmp_path))
  out = benchmark.child_memory("torch", s, str(tmp_path))
  assert out["peak_rss_mib"] >= out["after_import_mib"] > 0


def test_analytic_flops_match_a_hand_count():
  """ViT-S/16 at 224: 201 tokens; 24 T D^2 + 4 T^2 D per block (matmuls of one image)."""
  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel

  from reference import deltadorsal as torch_reference  # pylint: disable=import-outside-toplevel
  config = dinov3.get_config("dinov3_vits16")
  t, d = 201, 384
  per_image = torch_reference.matmul_flops_per_image(config, 224, 224)
  assert per_image["block"] == 24 * t * d * d + 4 * t * t * d
  infer = torch_reference.pose_step_flops(config, 224, 3, train=False)
  train = torch_reference.pose_step_flops(config, 224, 3)
  np.testing.assert_allclose(infer / 1e9, 20.3, atol=0.1)  # "about 19 GFLOP per sample"
  np.testing.assert_allclose(train / 1e9, 32.6, atol=0.1)  # "about 30 GFLOP per sample"


def test_hamer_row_runs_and_agrees():
  s = dataclasses.replace(tiny_settings(), hamer_batches=(2,))
  got = benchmark.run(s, ("hamer",), log=lambda message: None)["rows"]["hamer"]
  row = got["2"]
  assert row["max_abs_hand_pose_diff"] < 1e-4  # same weights, same outputs
  assert row["jax"]["images_per_s"] > 0 and row["torch"]["images_per_s"] > 0 and row["ratio"] > 0
  assert "HaMeR forward (tiny" in benchmark.table({"rows": {"hamer": got}})


def test_hamer_flops_match_a_hand_count():
  """ViT-H/16 on 256x192 (192 patch tokens): 24 T D^2 + 4 T^2 D per block, 32 blocks, plus the
  patch embedding and the decoder (~3.1 GFLOP, mostly cross-attention k, v over 192 tokens)."""
  config = benchmark.hamer_config("vith")
  t, d = 192, 1280
  blocks = 32 * (24 * t * d * d + 4 * t * t * d)
  total = benchmark.hamer_flops_per_image(config)
  assert blocks / 1e9 == pytest.approx(247.63, abs=0.01)
  assert 3.0e9 < total - blocks - 2 * t * 768 * d < 3.2e9


@pytest.mark.slow
def test_end_to_end_row_runs():
  """The raw-frames row: every synthetic frame predicted, the stage shares add up."""
  row = benchmark.bench_end_to_end(tiny_settings())
  assert row["predicted"] == row["frames"] == 3 and row["frames_per_s"] > 0
  assert abs(sum(row["share"].values()) - 1.0) < 1e-6 and row["share"]["network_compiled"] > 0
  assert "end to end, raw frames" in benchmark.table({"rows": {"e2e": row}, "settings": {}})
