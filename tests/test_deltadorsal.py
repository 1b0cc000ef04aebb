"""DeltaDorsal heads and networks against the PyTorch implementation of SPEC.md §2 in
tests/reference/deltadorsal.py (the one the benchmark times)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from dd_jax.models import deltadorsal

from reference import deltadorsal as tr

torch.manual_seed(0)
D, Z, HW, B, HIDDEN = 24, 32, (4, 5), 3, 40
# torch layer -> dd_jax kernel/bias, the benchmark's weight export.
conv, lin = tr._conv, tr._lin  # pylint: disable=protected-access


# ------------------------------------------------------------------ helpers

def load(module, params):
  state = nnx.state(module, nnx.Param)
  expected = jax.tree.map(np.shape, nnx.to_pure_dict(state))
  assert jax.tree.map(np.shape, params) == expected
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)


def randomise(module):
  """Non-zero last layers etc.: every parameter random so every path is exercised."""
  with torch.no_grad():
    for p in module.parameters():
      p.uniform_(-0.3, 0.3)


def nhwc(t):
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b.detach().numpy())))


# ------------------------------------------------------------------ tests

def test_cosine_similarity_matches_torch_including_tiny_norms():
  a = torch.randn(6, 7, dtype=torch.float64)
  b = torch.randn(6, 7, dtype=torch.float64)
  a[0] *= 1e-4  # product of norms < eps, each norm > eps
  b[0] *= 1e-4
  a[1] *= 1e-8                  # one norm < eps
  b[2] = 0.0                    # zero vector
  a[3] *= 3e-7  # both below eps
  b[3] *= 3e-7
  ref = F.cosine_similarity(a, b, dim=1, eps=1e-6).numpy()
  ours = deltadorsal.cosine_similarity(jnp.asarray(a.numpy(), jnp.float32),
                                      jnp.asarray(b.numpy(), jnp.float32), eps=1e-6)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)
  # Row 0 tells the formulas apart: per-norm clamping gives 1-ish, a clamped product far less.
  assert abs(ref[0]) > 0.05


@pytest.mark.parametrize("use_delta,use_orig_feat", [(True, True), (True, False), (False, True)])
def test_change_encoder_matches_torch(use_delta, use_orig_feat):
  ref = tr.ChangeEncoder(D, Z, use_delta=use_delta, use_orig_feat=use_orig_feat)
  ours = deltadorsal.ChangeEncoder(D, Z, use_delta=use_delta, use_orig_feat=use_orig_feat,
                                   rngs=nnx.Rngs(0))
  load(ours, {"conv1": conv(ref.conv[0]), "conv2": conv(ref.conv[2])})
  ft, f0 = torch.randn(B, D, *HW), torch.randn(B, D, *HW)
  f0[0, :, 0, 0] = ft[0, :, 0, 0]  # identical features somewhere: cos = 1, delta = 0
  err = max_err(ours(nhwc(ft), nhwc(f0)), ref(ft, f0).permute(0, 2, 3, 1))
  assert err < 1e-5, err
  assert ours.in_channels == {(True, True): 3 * D + 1, (True, False): D + 1,
                              (False, True): D}[(use_delta, use_orig_feat)]


@pytest.mark.parametrize("pool", ["avg", "attn"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("use_film", [False, True])
@pytest.mark.parametrize("use_prior", [False, True])
def test_pose_head_matches_torch(use_prior, use_film, gated, pool):
  ref = tr.PoseHead(Z, 45, HIDDEN, use_prior=use_prior, use_film=use_film, gated=gated,
                    pool_kind=pool)
  randomise(ref)
  ours = deltadorsal.ResidualPoseHead(Z, 45, 45, HIDDEN, use_prior=use_prior, use_film=use_film,
                                      gated=gated, pool=pool, rngs=nnx.Rngs(1))
  params = {"neck": conv(ref.neck[0]), "mlp1": lin(ref.mlp[0]), "mlp2": lin(ref.mlp[2]),
            "mlp3": lin(ref.mlp[4])}
  if use_film and use_prior:
    params["film"] = lin(ref.film[0])
  if pool == "attn":
    params["attn_pool"] = {"score": conv(ref.attn)}
  load(ours, params)
  x, prior = torch.randn(B, Z, *HW), torch.randn(B, 45) * 0.5
  got = ours(nhwc(x), jnp.asarray(prior.numpy()))
  want = ref(x, prior)
  for g, w in zip(got, want):
    assert g.shape == (B, 45)
    err = max_err(g, w)
    assert err < 1e-5, err


@pytest.mark.parametrize("pool", ["avg", "attn"])
@pytest.mark.parametrize("out_dim", [1, 2])
def test_force_head_matches_torch(pool, out_dim):
  ref = tr.ForceHead(Z, out_dim, 7, HIDDEN, pool_kind=pool)
  randomise(ref)
  ours = deltadorsal.ForceHead(Z, out_dim, 7, HIDDEN, pool=pool, rngs=nnx.Rngs(2))
  params = {"neck": conv(ref.neck[0]), "trunk1": lin(ref.trunk[0]), "trunk2": lin(ref.trunk[2]),
            "out": lin(ref.head)}
  if pool == "attn":
    params["attn_pool"] = {"score": conv(ref.attn)}
  load(ours, params)
  x = torch.randn(B, Z, *HW)
  got = ours(nhwc(x))
  assert got.shape == (B, out_dim, 7)
  err = max_err(got, ref(x))
  assert err < 1e-5, err


@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_pose_head_initialisation(use_prior, gated):
  head = deltadorsal.ResidualPoseHead(Z, 45, 45, HIDDEN, use_prior=use_prior, gated=gated,
                                      rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(head.mlp3.kernel[...], 0.0)
  bias = np.asarray(head.mlp3.bias[...])
  np.testing.assert_array_equal(bias[:45], 0.0)
  if gated:
    np.testing.assert_array_equal(bias[45:], -2.0 if use_prior else 2.0)
  x, prior = jnp.ones((2, *HW, Z)), jnp.full((2, 45), 0.3)
  theta, _, gate = head(x, prior)
  # A fresh head predicts the prior (or zero): training starts from HaMeR's pose.
  np.testing.assert_allclose(theta, prior if use_prior else 0.0, atol=0)
  expected_gate = 1 / (1 + math.exp(2.0 if use_prior else -2.0)) if gated else 1.0
  np.testing.assert_allclose(gate, expected_gate, rtol=1e-6)


def _uniform_bound_ok(values, bound):
  values = np.asarray(values).ravel()
  assert np.all(np.abs(values) <= bound * (1 + 1e-6))
  assert np.abs(values).max() > 0.9 * bound   # really that wide
  # std of U(-b, b) is b/sqrt(3); small vectors (biases) only roughly.
  np.testing.assert_allclose(values.std(), bound / math.sqrt(3),
                             rtol=0.05 if values.size > 4000 else 0.3)


def test_torch_default_and_xavier_initialisation():
  head = deltadorsal.ForceHead(64, 1, 7, 128, pool="attn", rngs=nnx.Rngs(4))
  _uniform_bound_ok(head.neck.kernel[...], 1 / math.sqrt(64 * 9))
  _uniform_bound_ok(head.neck.bias[...], 1 / math.sqrt(64 * 9))
  _uniform_bound_ok(head.trunk1.kernel[...], 1 / math.sqrt(64))
  _uniform_bound_ok(head.trunk2.bias[...], 1 / math.sqrt(128))
  assert np.all(np.abs(head.attn_pool.score.kernel[...]) <= 1 / math.sqrt(64))
  _uniform_bound_ok(head.out.kernel[...], math.sqrt(6 / (128 + 7)))
  np.testing.assert_array_equal(head.out.bias[...], 0.0)
  # Same bounds as torch builds for the same layer.
  torch_conv = nn.Conv2d(64, 64, 3)
  assert abs(torch_conv.weight.abs().max().item() - 1 / math.sqrt(64 * 9)) < 2e-3


def test_bad_pool_is_an_error():
  with pytest.raises(ValueError, match="pool"):
    deltadorsal.ForceHead(8, 1, 7, 8, pool="max", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ whole networks (tiny backbone)

def tiny_config(task):
  from dd_jax import default_config  # pylint: disable=import-outside-toplevel
  c = (default_config.pose_config if task == "pose" else default_config.force_config)("demo")
  c.model.backbone.custom.update(dict(dim=32, depth=2, num_heads=2, ffn="mlp", ffn_hidden=64))
  c.model.change.out_dim = 16
  c.model.head.hidden = 24
  return c


def test_pose_net_one_backbone_batch_and_jit():
  config = tiny_config("pose")
  config.model.head.use_prior = True
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(0))
  assert isinstance(model, deltadorsal.PoseNet)
  img, base = jax.random.normal(jax.random.key(1), (2, 2, 32, 48, 3))
  prior = jax.random.normal(jax.random.key(2), (2, 45))
  calls = []
  original = type(model.backbone).__call__

  def spy(self, x, **kw):
    calls.append(x.shape)
    return original(self, x, **kw)

  type(model.backbone).__call__ = spy
  try:
    out = model(img, base, prior)
  finally:
    type(model.backbone).__call__ = original
  assert calls == [(4, 32, 48, 3)]  # current and base as ONE batch
  np.testing.assert_allclose(out["theta"], prior, atol=0)  # zero last layer
  # The same features as two separate backbone passes.
  ft, f0 = model.backbone(img), model.backbone(base)
  x = model.change(ft, f0)
  np.testing.assert_allclose(model.features(img, base), x, atol=1e-5)
  jitted = nnx.jit(lambda m, a, b, p: m(a, b, p)["theta"])
  np.testing.assert_allclose(jitted(model, img, base, prior), prior, atol=0)


def test_force_net_shapes():
  model = deltadorsal.build_model(tiny_config("force"), rngs=nnx.Rngs(0))
  assert isinstance(model, deltadorsal.ForceNet)
  img = jnp.zeros((3, 32, 32, 3))
  assert model(img, img).shape == (3, 1, 7)
  assert model.change.in_channels == 32 + 1


def test_pose_net_moves_no_data_between_devices_under_batch_sharding():
  """Pairing current and base image must keep each device's rows local (no collectives)."""
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model = deltadorsal.build_model(tiny_config("pose"), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))
  batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
  img = jax.device_put(jnp.zeros((2 * n, 32, 32, 3)), batch)
  prior = jax.device_put(jnp.zeros((2 * n, 45)), batch)
  forward = jax.jit(lambda s, a, b, p: nnx.merge(graphdef, s)(a, b, p)["theta"])
  hlo = forward.lower(state, img, img, prior).compile().as_text()
  for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
    assert op not in hlo, op
