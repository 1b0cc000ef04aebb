"""Train-time RoPE coordinate rescale (SPEC.md §2.1; Meta's `rescale_coords=2`): with given
factors the backbone equals transformers' DINOv3ViTModel in train mode with those factors forced
into its own draw; the train step draws them log-uniformly on [1/2, 2] per block and backbone call
(image, base; shared by the batch) from the step's seed; evaluation is unchanged bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTModel

from dd_jax import optim, parallel, tasks, train_state
from dd_jax import params as params_lib
from dd_jax.convert import dinov3 as convert_dinov3
from dd_jax.data import pipeline
from dd_jax.models import dinov3

import tiny
from reference import deltadorsal as tr

TOLERANCE = 5e-5
DEPTH = 3


@pytest.fixture(scope="module")
def models():
  """(transformers DINOv3ViTModel with pos_embed_rescale=2, the same network in dd_jax)."""
  config = dinov3.get_config("custom", dim=64, depth=DEPTH, num_heads=4, ffn="mlp",
                             ffn_hidden=128, qkv_bias=True)
  torch.manual_seed(0)
  hf = DINOv3ViTModel(tr.hf_config(config, attn_implementation="eager", rope_rescale=2.0))
  with torch.no_grad():
    for key, p in hf.named_parameters():
      if key.endswith("lambda1"):
        p.uniform_(0.2, 1.0)
      elif p.ndim >= 2 and "token" not in key:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  _, params = convert_dinov3.hf_state_dict_to_params(
      {k: v.numpy() for k, v in hf.state_dict().items()}, config)
  model = dinov3.DinoV3(config, rngs=nnx.Rngs(0))
  params_lib.assign_params(model, params)
  return hf, model


def _tokens(out):
  """dd_jax extras -> (B, 1 + patches, D): the class token and the patch tokens."""
  b, h, w, d = out["patch"].shape
  return np.concatenate([np.asarray(out["cls"])[:, None],
                         np.asarray(out["patch"]).reshape(b, h * w, d)], 1)


def _without_storage(last_hidden_state):
  return last_hidden_state.detach().numpy()[:, [0] + list(range(5, last_hidden_state.shape[1]))]


def _nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


def test_a_scale_forced_into_transformers_train_mode_gives_the_same_output(models):
  hf, model = models
  images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    eval_out = _without_storage(hf.eval()(pixel_values=images).last_hidden_state)
  for scale in (0.55, 1.8):
    with torch.no_grad(), tr.forced_rope_draws([scale]):  # transformers: one draw per forward
      want = _without_storage(hf.train()(pixel_values=images).last_hidden_state)
    got = _tokens(model(_nhwc(images), rope_scale=jnp.full((DEPTH, 1), scale),
                        return_extras=True))
    err = np.abs(got - want).max()
    print(f"scale {scale}: max abs {err:.1e} against DINOv3ViTModel in train mode "
          f"(rescaled vs eval output: {np.abs(want - eval_out).max():.2f})")
    assert err <= TOLERANCE
    assert np.abs(want - eval_out).max() > 100 * TOLERANCE  # the scale changed the output


def test_a_factor_per_block_and_per_backbone_call_as_meta_draws_them(models):
  """Meta's get_intermediate_layers (what the original calls) asks RoPE for new tables in every
  block, one factor for the whole batch (torch.empty(1)), and the original encodes image and
  base in two calls: factors (depth, 2), each shared by its stream's rows."""
  hf, model = models
  gen = torch.Generator().manual_seed(2)
  img, base = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
  scales = np.asarray(dinov3.draw_rope_scale(jax.random.key(3), (DEPTH, 2), 2.0))
  assert len(np.unique(scales)) == scales.size
  with torch.no_grad(), tr.forced_rope_draws(scales):  # drawn block by block: image, base
    want = _without_storage(tr.per_block_rope_forward(hf.train(), torch.cat([img, base]), 2))
  pair = jnp.stack([_nhwc(img), _nhwc(base)], 1).reshape(4, 32, 32, 3)  # as PoseNet interleaves
  got = _tokens(model(pair, rope_scale=scales, return_extras=True))
  got = np.concatenate([got[0::2], got[1::2]])  # back to [images; bases]
  err = np.abs(got - want).max()
  print(f"per-block factors {scales.round(3).tolist()}: max abs {err:.1e}")
  assert err <= TOLERANCE


def test_drawn_factors_are_log_uniform_on_half_to_two():
  factors = np.asarray(dinov3.draw_rope_scale(jax.random.key(0), (200_000,), 2.0), np.float64)
  assert factors.min() >= 0.5 and factors.max() <= 2.0
  logs = np.sort(np.log(factors))
  uniform_cdf = (logs + np.log(2)) / (2 * np.log(2))
  ks = np.abs(np.arange(1, logs.size + 1) / logs.size - uniform_cdf).max()
  print(f"Kolmogorov-Smirnov distance of ln(factor) to U(-ln 2, ln 2): {ks:.4f}")
  assert ks < 0.006  # 1% critical value at n = 200k: 0.0036; a log-normal fails by far
  assert np.mean(factors < 1) == pytest.approx(0.5, abs=0.005)


def test_training_draws_from_the_step_and_evaluation_is_unchanged_bit_for_bit(tiny_dataset):
  # Force: its fresh head depends on the features (the demo pose head starts AT the prior).
  config = tiny.config("force", tiny_dataset)
  assert config.model.backbone.rope_rescale == 2.0  # on by default
  built = train_state.build(config, parallel.make_mesh(jax.devices()[:1]))
  local = next(iter(pipeline.make_train_loader(config.data, config.task, seed=config.seed)))
  batch = parallel.global_batch(built.mesh, local)
  # A fresh backbone's LayerScale (1e-5) hides its blocks: randomise every parameter.
  model = built.model()
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32),
                                 nnx.state(model, nnx.Param)))
  _, trainable, frozen = nnx.split(model, optim.trainable_filter(
      config.model.backbone.custom.depth, config.model.backbone.n_unfrozen_blocks), ...)
  consts, graphdef = built.task.consts, built.graphdef

  # Evaluation is the same with the rescale on and off, bit for bit.
  off_task = tasks.make_task(tiny.config("force", tiny_dataset,
                                         **{"model.backbone.rope_rescale": 0.0}))
  off_eval_step = jax.jit(train_state.make_eval_step(graphdef, off_task.evaluate))
  on_eval, off_eval = (jax.device_get(step(trainable, frozen, batch, consts))
                       for step in (built.eval_step, off_eval_step))
  for a, b in zip(jax.tree.leaves(on_eval), jax.tree.leaves(off_eval)):
    np.testing.assert_array_equal(a, b)

  def loss(task, key):
    return jax.jit(lambda k: task.loss(nnx.merge(graphdef, trainable, frozen), batch, consts,
                                       k)[0])(key)

  keys = [train_state.step_rng(config.seed, step, train_state.NETWORK) for step in (0, 1)]
  on_losses = [float(loss(built.task, k)) for k in keys]
  off_loss = float(loss(off_task, keys[0]))
  _, metrics = built.train_step(dict(built.state, params=trainable), frozen, batch, consts)
  # The compiled step at step 0 computes the loss of step_rng(seed, 0)'s factors, which differ
  # from step 1's, and from no rescale at all.
  assert float(metrics["loss"]) == pytest.approx(on_losses[0], rel=1e-6)
  assert on_losses[0] != on_losses[1] and on_losses[0] != off_loss
  scale = model.draw_rope_scale(keys[0], 2.0)
  assert scale.shape == (config.model.backbone.custom.depth, 2)  # per block, [image, base]
  assert model.draw_rope_scale(keys[0], 0.0) is None
