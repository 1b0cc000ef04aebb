"""FSDP (mesh.fsdp=True) at the 7B backbone's width: one trained block of dinov3_vit7b16's
shape (4096 wide, 32 heads, SwiGLU 8192; ~151 M parameters) on 8 CPU devices. Each device holds
1/8 of every large parameter and of its Adam moments, read from the arrays' own shards, and one
train step gives what the same step gives unsharded on one device."""

import gc

import jax
import numpy as np
import pytest

from dd_jax import parallel, train_state
from dd_jax.models import dinov3

import tiny

WIDE = dinov3.VARIANTS["dinov3_vit7b16"]


def _config(fsdp: bool):
  return tiny.config("pose", "unused", **{
      "model.backbone.custom.dim": WIDE.dim, "model.backbone.custom.num_heads": WIDE.num_heads,
      "model.backbone.custom.ffn": WIDE.ffn, "model.backbone.custom.ffn_hidden": WIDE.ffn_hidden,
      "model.backbone.custom.qkv_bias": WIDE.qkv_bias, "model.backbone.custom.depth": 1,
      "model.backbone.n_unfrozen_blocks": 1, "model.backbone.dtype": "float32",
      "model.backbone.rope_rescale": 0.0, "data.batch_size": 8, "data.out_img_size": 32,
      "data.augment_on_device": True, "mesh.fsdp": fsdp})


def _batch(n: int = 8, size: int = 32):
  rng = np.random.default_rng(0)
  return {"img": rng.integers(0, 256, (n, size, size, 3), np.uint8),
          "base_img": rng.integers(0, 256, (n, size, size, 3), np.uint8),
          "hamer_pose": (0.3 * rng.standard_normal((n, 45))).astype(np.float32),
          "hamer_shape": rng.standard_normal((n, 10)).astype(np.float32),
          "gt_pose": (0.3 * rng.standard_normal((n, 45))).astype(np.float32),
          "prior_kp2d": np.full((n, 21, 2), np.nan, np.float32),
          "frame_id": np.arange(n, dtype=np.int64), "p_id": np.zeros(n, np.int32),
          "valid": np.ones(n, bool)}


def _per_device_bytes(tree) -> dict[jax.Device, int]:
  held: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def _step(fsdp: bool, devices):
  """(host copies of the trainable parameters and Adam moments after one step, the bytes each
  device held of them before it, their total bytes, whether every large one was split over
  all the devices)."""
  mesh = parallel.make_mesh(devices)
  if fsdp:  # checked on the abstract state first: replicated, it would need ~16 GB of host RAM
    planned = train_state.build(_config(fsdp), mesh, abstract=True).state
    for path, x in jax.tree_util.tree_flatten_with_path(
        {"params": planned["params"], "opt_state": planned["opt_state"]})[0]:
      if x.size >= parallel.FSDP_MIN_SIZE:
        assert x.sharding.shard_shape(x.shape) != x.shape, jax.tree_util.keystr(path)
  setup = train_state.build(_config(fsdp), mesh)
  state = setup.state
  held_arrays = {"params": state["params"], "opt_state": state["opt_state"]}
  held = _per_device_bytes(held_arrays)
  total = sum(x.nbytes for x in jax.tree.leaves(held_arrays))
  large = [x for x in jax.tree.leaves(held_arrays) if x.size >= parallel.FSDP_MIN_SIZE]
  split = all(s.data.size * len(devices) == x.size for x in large for s in x.addressable_shards)
  batch = parallel.global_batch(mesh, _batch())
  state, metrics = setup.train_step(state, setup.frozen, batch, setup.task.consts)
  assert np.isfinite(float(metrics["loss"]))
  after = jax.tree.map(np.asarray, {"params": state["params"], "opt_state": state["opt_state"]})
  del setup, state, batch, held_arrays, large
  gc.collect()
  return after, held, total, split


@pytest.mark.slow
def test_fsdp_holds_an_eighth_and_steps_as_unsharded():
  devices = jax.devices()[:8]
  assert len(devices) == 8
  sharded, held, total, split = _step(True, devices)
  assert split  # every parameter / moment of >= FSDP_MIN_SIZE elements is cut 8 ways
  assert set(held) == set(devices)
  assert total > 3 * 151e6 * 4  # the 7B-wide block, float32, with its two moments
  for device, nbytes in held.items():
    # Only small arrays (norms, biases, the heads) are whole on every device.
    assert total / 8 <= nbytes <= 1.01 * total / 8, (device, nbytes / total)
  print(f"FSDP: {total / 2**20:,.0f} MiB of trainable parameters + Adam moments, "
        f"{max(held.values()) / 2**20:,.1f} MiB on the fullest device "
        f"({max(held.values()) / total:.4f} of them)")

  whole, held_one, _, _ = _step(False, devices[:1])
  assert list(held_one.values()) == [total]
  worst = 0.0
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                               jax.tree.leaves(whole)):
    if not np.issubdtype(got.dtype, np.floating):
      continue
    scale = max(float(np.linalg.norm(want)), 1e-30)
    error = float(np.linalg.norm(np.float64(got) - want)) / scale
    worst = max(worst, error)
    assert error <= 1e-5, (jax.tree_util.keystr(path), error)
  print(f"FSDP step vs unsharded: worst relative error of a parameter / moment {worst:.2e}")
