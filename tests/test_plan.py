"""tools/plan.py: its memory estimate against a measured run, against compiles it only
extrapolated (deeper backbone, larger batch, accumulation), and its FSDP / accumulation advice."""

import os
import subprocess
import sys

import jax
import pytest

from dd_jax import default_config, parallel
from dd_jax.data import pipeline

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import plan  # noqa: E402  pylint: disable=g-import-not-at-top

GIB = plan.GIB


def small_config(**overrides):
  """The force model on a ViT of width 64 at 32 px (compiles of a few seconds), augmenting on
  the device (the augmentation's scratch is a good part of the temporaries)."""
  return tiny.config("force", "unused", **{
      "model.backbone.custom.dim": 64, "model.backbone.custom.depth": 5,
      "model.backbone.custom.num_heads": 2, "model.backbone.custom.ffn_hidden": 256,
      "model.backbone.n_unfrozen_blocks": 1, "data.batch_size": 16,
      "data.augment_on_device": True, **overrides})


def compiled_total(config, mesh) -> int:
  """Per-device peak of the compiled step at full depth: what the plan estimates."""
  m = plan.compile_memory(config, mesh)
  return m["argument"] + m["temp"] + m["output"] - m["alias"]


def quiet(_):
  pass


def test_batch_shapes_are_the_loaders(tiny_dataset):
  """plan compiles for samples.batch_shapes: the train loader's batches have those keys,
  shapes and dtypes (float32 images on the host path, uint8 with augment_on_device)."""
  for on_device in (False, True):
    config = tiny.config("pose", tiny_dataset, **{"data.augment_on_device": on_device,
                                                  "data.num_workers": 0})
    batch = next(iter(pipeline.make_train_loader(config.data, "pose", seed=0)))
    expected = plan.batch_shapes(config)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


@pytest.mark.slow
def test_extrapolation_and_advice_match_full_compiles():
  """The plan compiles 2 and 3 of 5 blocks at micro-batches 16 and 32. Its total equals the
  full-depth compile's; at the largest batch it says fits, a compile fits; with too little
  memory for the activations it names an accumulation that a compile of it confirms."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = small_config()
  e = plan.estimate(config, mesh, log=quiet)
  assert sorted(e.compiled) == ["depth2_micro16", "depth2_micro32", "depth3_micro16"]
  assert plan.plan(e, GIB)["bytes"]["total"] == pytest.approx(compiled_total(config, mesh),
                                                              rel=0.02)
  budget = 3 * e.peak(16)
  largest = plan.plan(e, budget, usable=1.0)["largest_per_device_batch"]
  assert 32 < largest < 128
  at_largest = compiled_total(plan.variant_config(config, per_device_batch=largest), mesh)
  assert 0.95 * budget < at_largest <= 1.02 * budget

  r = e.resident
  tight = r.total(16) + e.out_extra + 0.4 * e.temporaries(16)
  verdict = plan.plan(e, tight, usable=1.0)
  assert not verdict["fits"]
  advice = " ".join(verdict["advice"])
  assert "accumulate_steps=" in advice, advice
  k = int(advice.split("accumulate_steps=")[1].split()[0])
  assert k in (2, 4, 8)
  accumulated = plan.variant_config(config)
  with accumulated.unlocked():
    accumulated.optimizer.accumulate_steps = k
  assert compiled_total(accumulated, mesh) <= tight * 1.02


def test_fsdp_advice_and_shards():
  """Parameters and optimizer state larger than the memory: the advice is FSDP, under which a
  device of 8 holds between 1/8 and 1/4 of them (small ones stay whole)."""
  mesh = parallel.make_mesh(jax.devices()[:8])
  wide = small_config(**{"model.backbone.custom.dim": 512, "model.backbone.custom.num_heads": 8,
                         "model.backbone.custom.ffn_hidden": 2048,
                         "model.backbone.custom.depth": 2, "data.augment_on_device": False})
  e = plan.estimate(wide, mesh, log=quiet)
  params = e.resident.trainable + e.resident.optimizer
  starved = plan.plan(e, params * 0.8, usable=1.0)
  assert not starved["fits"] and "mesh.fsdp=True" in " ".join(starved["advice"])
  sharded = plan.resident_bytes(plan.variant_config(wide, fsdp=True), mesh)
  assert params / 8 < sharded.trainable + sharded.optimizer < params / 4


@pytest.mark.slow
def test_vits_224_estimate_within_25_percent_of_measured_peak():
  """ViT-S/16 at 224 (3 trained blocks, batch 16, host augmentation): plan.py's per-device total
  against the peak resident memory a real run of the same step adds on this CPU."""
  args = ["--config", "configs/pose.py:vits16", "--config.data.out_img_size=224",
          "--config.data.batch_size=16", "--config.data.augment_on_device=False",
          "--devices", "1"]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  measured = subprocess.run([sys.executable, "tools/plan.py", "--measure", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, check=True).stdout
  peak = float(measured.split("compiled step: ")[1].split()[0]) * GIB
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = default_config.pose_config("vits16")
  config.data.update(dict(out_img_size=224, batch_size=16, augment_on_device=False))
  r = plan.plan(plan.estimate(config, mesh, log=quiet), 16 * GIB)
  estimate = r["bytes"]["total"]
  print(f"ViT-S/224 batch 16: plan {estimate / GIB:.3f} GiB, measured {peak / GIB:.3f} GiB")
  assert abs(estimate - peak) <= 0.25 * peak
