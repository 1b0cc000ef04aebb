"""On-device augmentation (data.augment_on_device) against the host path of dd_jax/data/transforms.py:
each operation pixel for pixel with the same draws, the distributions by their moments, the
batch independent of its sharding, and the uint8 loaders and steps end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dd_jax import optim, parallel, train_state
from dd_jax.data import device_augment, pipeline, transforms

import tiny

AugmentConfig = transforms.AugmentConfig
# Each operation alone (blur_kernel 1 = no blur, zero ranges = identity), then all together.
ONE_AT_A_TIME = {
    "brightness": AugmentConfig(contrast=0, gamma=0, noise_std=0, blur_kernel=1),
    "contrast": AugmentConfig(brightness=0, gamma=0, noise_std=0, blur_kernel=1),
    "gamma": AugmentConfig(brightness=0, contrast=0, noise_std=0, blur_kernel=1),
    "noise": AugmentConfig(brightness=0, contrast=0, gamma=0, noise_std=0.05, blur_kernel=1),
    "blur": AugmentConfig(brightness=0, contrast=0, gamma=0, noise_std=0),
    "all": AugmentConfig(),
    "strong": AugmentConfig(brightness=0.5, contrast=0.5, gamma=0.4, noise_std=0.05),
}


def _image(seed, shape=(20, 18, 3)):
  rng = np.random.default_rng(seed)
  smooth = np.linspace(0, 255, shape[0] * shape[1]).reshape(shape[:2])[..., None]
  return np.clip(smooth + rng.normal(0, 40, shape), 0, 255).astype(np.uint8)


def _device_params(draw: transforms.AugmentDraw):
  return {k: jnp.asarray(v) for k, v in dataclasses.asdict(draw).items() if k != "noise_seed"}


@pytest.mark.parametrize("name", list(ONE_AT_A_TIME))
def test_each_operation_matches_the_host_pixel_for_pixel(name):
  """Same parameters and the same noise field: the device result is the host's (float32)."""
  config = ONE_AT_A_TIME[name]
  apply = jax.jit(device_augment.apply, static_argnums=3)
  for seed in range(4):
    image = _image(seed)
    draw = transforms.draw_augment(np.random.default_rng(seed), config)
    host = transforms.apply_augment(image, draw, config)
    noise = None
    if draw.noise_seed is not None:  # the host's noise, back in [0, 1] units
      noise = transforms.noise_field(image.shape, draw, config) * transforms.IMAGENET_STD
    device = np.asarray(apply(image, _device_params(draw), noise, config))
    # 1e-4 in normalised units is ~0.006 of an intensity level.
    np.testing.assert_allclose(device, host, atol=1e-4, err_msg=f"{name}, seed {seed}")
    if name != "blur":  # every operation changes the image (the blur's sigma can be ~0.1)
      assert np.abs(host - transforms.normalise(image / 255.0)).max() > 1e-3


def test_draws_follow_the_host_distribution():
  config = AugmentConfig()
  n = 4000
  rng = np.random.default_rng(0)
  host = [transforms.draw_augment(rng, config) for _ in range(n)]
  device = jax.jit(jax.vmap(lambda k: device_augment.draw(k, config)))(
      jax.random.split(jax.random.key(0), n))
  for field in ("brightness", "contrast", "gamma", "blur_sigma", "brightness_first"):
    h = np.array([getattr(d, field) for d in host], np.float64)
    d = np.asarray(device[field], np.float64)
    assert h.min() >= d.min() - 0.01 * np.ptp(h) and h.max() <= d.max() + 0.01 * np.ptp(h), field
    assert d.min() >= h.min() - 0.01 * np.ptp(h) and d.max() <= h.max() + 0.01 * np.ptp(h), field
    se = np.sqrt((h.var() + d.var()) / n)
    assert abs(h.mean() - d.mean()) < 5 * se, (field, h.mean(), d.mean())
    np.testing.assert_allclose(d.std(), h.std(), rtol=0.06, err_msg=field)


def test_augmented_pixels_have_the_host_moments():
  """Per-pixel mean and spread over many draws of the whole augmentation, host vs device."""
  config, n = AugmentConfig(), 600
  image = _image(3, (8, 8, 3))
  rng = np.random.default_rng(1)
  host = np.stack([transforms.augment(image, rng, config) for _ in range(n)])
  device = np.asarray(jax.jit(jax.vmap(lambda k: device_augment.augment(k, image, config)))(
      jax.random.split(jax.random.key(1), n)))
  se = np.sqrt((host.var(0) + device.var(0)) / n)
  z = np.abs(host.mean(0) - device.mean(0)) / se
  assert z.max() < 5.5, z.max()
  spread_h, spread_d = host.std(0), device.std(0)
  np.testing.assert_allclose(spread_d.mean(), spread_h.mean(), rtol=0.05)
  np.testing.assert_allclose(spread_d, spread_h, rtol=0.25)


def _uint8_batch(n=8, size=12, seed=0):
  rng = np.random.default_rng(seed)
  valid = np.ones(n, bool)
  valid[3] = False
  return {"img": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "base_img": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "valid": valid, "frame_id": np.arange(n, dtype=np.int64)}


def test_augmented_batch_is_independent_of_the_sharding():
  """8 devices vs 1: the same global batch gets the same pixels (per-sample keys by position)."""
  local = _uint8_batch()
  key = train_state.step_rng(42, 3)
  step = jax.jit(lambda b, k: device_augment.model_inputs(
      b, device_augment.image_keys(k, b["img"].shape[0]), AugmentConfig()))
  outs = []
  for devices in (jax.devices()[:8], jax.devices()[:1]):
    out = step(parallel.global_batch(parallel.make_mesh(devices), local), key)
    assert len(out["img"].sharding.device_set) == len(devices)
    outs.append(jax.tree.map(np.asarray, out))
  assert len(jax.devices()) == 8
  for k in ("img", "base_img"):
    np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)
  img, base = outs[0]["img"], outs[0]["base_img"]
  assert img.dtype == np.float32 and (img[3] == 0).all() and (base[3] == 0).all()  # masked
  # Every image gets its own draw: the same picture in every slot comes out different.
  same = dict(local, img=np.repeat(local["img"][:1], 8, 0), base_img=np.repeat(local["img"][:1], 8, 0))
  out = np.asarray(step(same, key)["img"])
  out_base = np.asarray(step(same, key)["base_img"])
  assert not np.allclose(out[0], out[1]) and not np.allclose(out[0], out_base[0])
  assert not np.allclose(out[0], np.asarray(step(same, train_state.step_rng(42, 4))["img"])[0])


_PROCESS = """
import sys
import jax, numpy as np
from dd_jax import parallel, train_state
from dd_jax.data import device_augment, transforms
from test_device_augment import _uint8_batch

out_dir, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
parallel.join_processes(f"127.0.0.1:{port}", 2, pid, False, 30)
mesh = parallel.make_mesh()
local = {k: v[4 * pid:4 * (pid + 1)] for k, v in _uint8_batch().items()}  # this host's loader
step = jax.jit(lambda b, k: device_augment.model_inputs(
    b, device_augment.image_keys(k, b["img"].shape[0]), transforms.AugmentConfig()))
out = step(parallel.global_batch(mesh, local), train_state.step_rng(42, 3))
rows = {}
for name in ("img", "base_img"):
  for shard in out[name].addressable_shards:
    for offset, row in enumerate(np.asarray(shard.data)):
      rows[f"{name}_{shard.index[0].start + offset}"] = row
np.savez(f"{out_dir}/p{pid}.npz", **rows)
"""


@pytest.mark.multiprocess
def test_augmented_batch_is_independent_of_the_process_count(tmp_path):
  """2 processes x 2 devices, each feeding its half of the global batch (as each host's loader
  does), augment every image exactly as one process with 8 devices does."""
  tiny.run_processes(_PROCESS, str(tmp_path))
  rows = {}
  for i in range(2):
    with np.load(tmp_path / f"p{i}.npz") as f:
      rows.update({k: f[k] for k in f.files})
  local = _uint8_batch()
  one = jax.jit(lambda b, k: device_augment.model_inputs(
      b, device_augment.image_keys(k, b["img"].shape[0]), AugmentConfig()))(
          parallel.global_batch(parallel.make_mesh(jax.devices()[:8]), local),
          train_state.step_rng(42, 3))
  for name in ("img", "base_img"):
    want = np.asarray(one[name])
    assert sorted(int(k.rsplit("_", 1)[1]) for k in rows if k.startswith(name + "_")) == \
        list(range(8))
    for i in range(8):
      np.testing.assert_array_equal(rows[f"{name}_{i}"], want[i], err_msg=f"{name}[{i}]")


def test_normalisation_only_equals_the_host_lookup_table():
  local = _uint8_batch()
  out = jax.tree.map(np.asarray, jax.jit(device_augment.model_inputs)(local))
  for i in range(8):
    expected = transforms.to_model_input(local["img"][i], 12) if local["valid"][i] else 0
    np.testing.assert_allclose(out["img"][i], expected, atol=1e-6)
  floats = dict(local, img=out["img"], base_img=out["base_img"])
  assert device_augment.model_inputs(floats) is floats  # the host path's batches pass as they are


def test_enabled_defaults_to_the_backend():
  config = tiny.pose_data_config("/nonexistent")
  assert config.augment_on_device is None and not device_augment.enabled(config)  # CPU here
  config.augment_on_device = True
  assert device_augment.enabled(config)


def test_uint8_loaders_give_the_host_path_batches(tiny_dataset):
  """augment_on_device sends uint8 (a quarter of the bytes) that normalise to the host's floats."""
  batches = {}
  for on_device in (False, True):
    config = tiny.pose_data_config(tiny_dataset, augment_on_device=on_device, augment=False,
                                   train_split="all")
    batches[on_device] = (next(iter(pipeline.make_train_loader(config, "pose", seed=1))),
                          next(iter(pipeline.make_eval_loader(config, "pose", "all"))))
  for host, device in zip(batches[False], batches[True]):
    assert device["img"].dtype == np.uint8 and host["img"].dtype == np.float32
    assert device["img"].nbytes * 4 == host["img"].nbytes
    normalised = jax.tree.map(np.asarray, device_augment.model_inputs(device))
    for key in host:
      np.testing.assert_allclose(normalised[key], host[key], atol=1e-6, err_msg=key)


def test_steps_prepare_uint8_batches():
  """The train step augments uint8 images (data.augment) or only normalises them, seeded by the
  step; the eval step normalises; float32 batches pass as before (a stand-in loss shows what
  the network would see)."""
  config = tiny.config("pose", "/nonexistent")
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(0.1)
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               plateau=optim.plateau_init(config))

  def loss_fn(model, batch, consts, rng):
    del consts, rng
    return jnp.sum(model.kernel) + jnp.mean(batch["img"]), {"img": batch["img"],
                                                            "base_img": batch["base_img"]}

  local = _uint8_batch()
  floats = jax.tree.map(np.asarray, device_augment.model_inputs(local))
  seen = {}
  for name, augment in (("plain", None), ("augment", AugmentConfig())):
    step = jax.jit(train_state.make_train_step(graphdef, optim.make_update(config, tx), loss_fn,
                                               seed=5, augment=augment))
    for kind, batch in (("uint8", local), ("float", floats)):
      for step_number in (0, 1):
        _, aux = step(dict(state, step=jnp.int32(step_number)), rest, batch, {})
        seen[name, kind, step_number] = np.asarray(aux["img"])
  keys = device_augment.image_keys(train_state.step_rng(5, 1), len(local["img"]))
  expected = device_augment.model_inputs(local, keys, AugmentConfig())
  # (Fused into another program, the float rounding may differ.)
  np.testing.assert_allclose(seen["augment", "uint8", 1], np.asarray(expected["img"]), atol=2e-6)
  assert not np.array_equal(seen["augment", "uint8", 0], seen["augment", "uint8", 1])
  for key in (("plain", "uint8", 0), ("plain", "float", 0), ("augment", "float", 1)):
    np.testing.assert_allclose(seen[key], floats["img"], atol=2e-6, err_msg=str(key))
  eval_step = jax.jit(train_state.make_eval_step(
      graphdef, lambda model, batch, consts: ({}, {"img": batch["img"]})))
  np.testing.assert_allclose(np.asarray(eval_step(params, rest, local, {})[1]["img"]),
                             floats["img"], atol=2e-6)
