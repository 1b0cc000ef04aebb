"""model.backbone.frozen_dtype="bfloat16": the parameters that do not train are stored in bf16
(half their bytes), everything that trains (parameters, optimizer state) stays float32; the
network computes what the float32 one does up to bf16 rounding, trains only what trains, and
checkpoints keep (or cast to) the bf16 storage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax import checkpointing, default_config, inference, kernels, parallel, train_state
from dd_jax.data import pipeline
from dd_jax.models import deltadorsal, dinov3_weights

import tiny


def _config(data_dir, frozen_dtype, **overrides):
  return tiny.config("pose", data_dir, **{"model.backbone.frozen_dtype": frozen_dtype,
                                          **overrides})


def _build(config):
  return train_state.build(config, parallel.make_mesh(jax.devices()[:1]))


def _flat(state):
  return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _relative(a, b):
  a, b = np.float64(a), np.float64(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def built(tiny_dataset, tmp_path_factory):
  """Float32 and bf16-frozen builds; the bf16 one (another seed) loads the float32 one's
  backbone as a converted DINOv3 folder, so its frozen part is the float32 values, cast."""
  b32 = _build(_config(tiny_dataset, "float32"))
  weights = str(tmp_path_factory.mktemp("backbone") / "vit")
  dinov3_weights.save_converted(weights, deltadorsal.backbone_config_from(b32.config),
                                nnx.to_pure_dict(nnx.state(b32.model().backbone, nnx.Param)))
  b16 = _build(_config(tiny_dataset, "bfloat16", seed=7, **{"model.backbone.weights": weights}))
  return {"float32": b32, "bfloat16": b16}


def test_frozen_params_are_bf16_and_the_rest_float32(built):
  b32, b16 = built["float32"], built["bfloat16"]
  frozen = _flat(b16.frozen)
  assert "backbone/blocks/0/attn/qkv/kernel" in frozen and "backbone/patch_embed/proj/kernel" in frozen
  for name, variable in frozen.items():
    want = jnp.bfloat16 if isinstance(variable, nnx.Param) else jnp.float32  # RoPE periods
    assert variable.get_value().dtype == want, name
  assert not any(isinstance(v, nnx.Param) for v in _flat(b32.frozen).values()
                 if v.get_value().dtype != jnp.float32)
  for leaf in jax.tree.leaves((b16.state, b16.abstract_state)):  # params, moments, plateau
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  param_bytes = lambda state: sum(v.get_value().nbytes for v in _flat(state).values()
                                  if isinstance(v, nnx.Param))
  assert param_bytes(b16.frozen) * 2 == param_bytes(b32.frozen)
  assert param_bytes(b16.state["params"]) == param_bytes(b32.state["params"])
  # The loaded backbone, rounded: the frozen values are the float32 ones cast.
  f32 = _flat(b32.frozen)
  for name, variable in frozen.items():
    np.testing.assert_array_equal(variable.get_value(),
                                  f32[name].get_value().astype(variable.get_value().dtype))


def _two_steps_train_only_the_trainable(setup):
  config = setup.config
  local = next(iter(pipeline.make_train_loader(config.data, config.task, seed=config.seed)))
  batch = parallel.global_batch(setup.mesh, local)
  frozen_before = jax.tree.map(np.array, setup.frozen)
  trainable_before = jax.tree.map(np.array, setup.state["params"])
  state = jax.tree.map(jnp.copy, setup.state)  # the step donates it
  for _ in range(2):  # the head's zero last layer passes no gradient back in the first
    state, metrics = setup.train_step(state, setup.frozen, batch, setup.task.consts)
    assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, setup.frozen),
               frozen_before)
  after = jax.tree.map(np.asarray, state["params"])
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), after,
                                          trainable_before)))
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state))


def test_bf16_frozen_computes_like_float32_and_trains_only_the_trainable(built):
  """Float32 compute (the tiny config's): the bf16 frozen values are upcast; the features
  differ by bf16 rounding only."""
  b32, b16 = built["float32"], built["bfloat16"]
  config = b16.config
  images = next(iter(pipeline.make_train_loader(config.data, config.task, seed=0)))["img"]

  def features(setup):
    network = lambda trainable, frozen: nnx.merge(setup.graphdef, trainable,
                                                  frozen).backbone(images)
    return np.asarray(jax.jit(network)(setup.state["params"], setup.frozen))

  f32, f16 = features(b32), features(b16)
  error = _relative(f16, f32)
  print(f"backbone features, bf16 against float32 frozen: relative difference {error:.2e}")
  assert 0 < error < 1e-2
  _two_steps_train_only_the_trainable(b16)


@pytest.mark.slow
def test_bf16_frozen_trains_with_bf16_compute_and_either_backward(tiny_dataset):
  """The default bf16 compute, with the implementation of the blocks' backward passes that the
  tiny config's auto choice does not take on this machine."""
  impl = "autodiff" if kernels.resolve_dinov3_impl() == "custom_vjp" else "custom_vjp"
  setup = _build(_config(tiny_dataset, "bfloat16", **{"model.backbone.impl": impl,
                                                       "model.backbone.dtype": "bfloat16"}))
  _two_steps_train_only_the_trainable(setup)


def _save(workdir, setup):
  manager = checkpointing.make_manager(workdir, setup.config.best_metric, setup.config.best_mode)
  checkpointing.save(manager, 1, setup.state, setup.frozen, None,
                     {"epoch": 1, "config": setup.config.to_json_best_effort()},
                     {setup.config.best_metric: 1.0})
  manager.wait_until_finished()
  manager.close()


def test_checkpoints_keep_bf16_and_float32_ones_are_cast(built, tmp_path):
  b32, b16 = built["float32"], built["bfloat16"]
  run16, run32 = str(tmp_path / "bf16"), str(tmp_path / "f32")
  _save(run16, b16)
  _save(run32, b32)
  # Resuming restores the bf16 arrays as saved.
  state, frozen, _ = checkpointing.restore_training(run16, 1, b16.abstract_state, b16.frozen)
  for (name, got), want in zip(_flat(frozen).items(), _flat(b16.frozen).values()):
    assert got.get_value().dtype == want.get_value().dtype, name
    np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=name)
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state))
  # Fine-tuning a bf16-frozen network from a float32 run casts its frozen arrays.
  _, frozen = checkpointing.initial_state(run32, b16)
  for (name, got), want in zip(_flat(frozen).items(), _flat(b16.frozen).values()):
    assert got.get_value().dtype == want.get_value().dtype, name
    np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=name)
  # Inference of the bf16 run: its (bf16-valued) parameters, computed as the run computes.
  saved_config = json.loads(checkpointing.read_meta(run16, 1)["config"])
  assert saved_config["model"]["backbone"]["frozen_dtype"] == "bfloat16"
  predictor = inference.load(run16)
  loaded = _flat(predictor.states[1])
  for name, want in _flat(b16.frozen).items():
    np.testing.assert_array_equal(np.float32(loaded[name].get_value()),
                                  np.float32(want.get_value()), err_msg=name)


def test_frozen_dtype_is_checked():
  config = default_config.pose_config()
  config.model.backbone.frozen_dtype = "float16"
  with pytest.raises(ValueError, match="model.backbone.frozen_dtype must be 'float32' or "
                                       "'bfloat16', got 'float16'"):
    default_config.check(config)
