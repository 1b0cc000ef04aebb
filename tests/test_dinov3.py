"""The NNX DINOv3 model: variant table, full-size parameter counts under eval_shape, RoPE against
the SPEC.md formula, attention against an explicit softmax, the masked k bias, bf16, extras.

Parity with transformers' DINOv3ViTModel through converted files is in test_convert_dinov3.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dd_jax import params as params_lib
from dd_jax.models import dinov3

SMALL = dict(dim=64, depth=3, num_heads=4, ffn="mlp", ffn_hidden=128, qkv_bias=True)


def small_model(dtype=jnp.float32, **overrides) -> dinov3.DinoV3:
  model = dinov3.DinoV3(dinov3.get_config("custom", **{**SMALL, **overrides}), dtype=dtype,
                        rngs=nnx.Rngs(0))
  # Random init has LayerScale 1e-5 and zero biases; make every part of the block matter.
  rng = np.random.default_rng(1)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32),
                                 state))
  return model


@nnx.jit
def forward(model, images):
  return model(images)


def test_variants_match_the_spec_table():
  # name: (dim, depth, heads, ffn, hidden, qkv bias) from SPEC.md §2.1
  table = {
      "dinov3_vits16": (384, 12, 6, "mlp", 1536, True),
      "dinov3_vits16plus": (384, 12, 6, "swiglu", 1536, True),
      "dinov3_vitb16": (768, 12, 12, "mlp", 3072, True),
      "dinov3_vitl16": (1024, 24, 16, "mlp", 4096, True),
      "dinov3_vitl16plus": (1024, 24, 16, "swiglu", 4096, True),
      "dinov3_vith16plus": (1280, 32, 20, "swiglu", 5120, True),
      "dinov3_vit7b16": (4096, 40, 32, "swiglu", 8192, False),
  }
  assert set(dinov3.VARIANTS) == set(table)
  for name, (dim, depth, heads, ffn, hidden, bias) in table.items():
    c = dinov3.VARIANTS[name]
    assert (c.dim, c.depth, c.num_heads, c.ffn, c.ffn_hidden, c.qkv_bias) == table[name], name
    assert (c.patch_size, c.num_storage_tokens, c.ln_eps, c.rope_base) == (16, 4, 1e-5, 100.0)
    assert dinov3.get_config(name.removeprefix("dinov3_")) == c
    assert dinov3.variant_name(c) == name
  assert dinov3.VARIANTS["dinov3_vit7b16"].head_dim == 128
  # int(100*6)=600 -> int(400)=400 -> 448 with align 64, 400 with align 8.
  assert dinov3.swiglu_hidden(100, 6, 64) == 448 and dinov3.swiglu_hidden(100, 6) == 400


def test_get_config_custom_and_errors():
  c = dinov3.get_config("custom", dim=96, depth=4, num_heads=4, ffn="mlp", ffn_hidden=384,
                        qkv_bias=True)
  assert c.head_dim == 24 and dinov3.variant_name(c) == "custom"
  assert dinov3.get_config("custom", dim=96, depth=1, num_heads=4).ffn_hidden == 384
  assert dinov3.get_config("vitl16", depth=2).depth == 2
  with pytest.raises(ValueError, match="unknown DINOv3 variant 'vitx'"):
    dinov3.get_config("vitx")
  with pytest.raises(ValueError, match=r"missing fields \['num_heads'\]"):
    dinov3.get_config("custom", dim=96, depth=4)
  with pytest.raises(ValueError, match=r"unknown fields \['width'\]"):
    dinov3.get_config("custom", dim=96, depth=4, num_heads=4, width=3)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    dinov3.get_config("custom", dim=96, depth=4, num_heads=5)


@pytest.mark.parametrize("name, torch_count, dropped", [
    ("dinov3_vits16", 21_601_152, 384),  # mask_token (1, 384)
    ("dinov3_vitl16", 303_154_176, 1024),  # mask_token
    ("dinov3_vit7b16", 6_716_043_264, 3 * 4096),  # mask_token + local_cls_norm weight and bias
])
def test_full_size_param_counts_under_eval_shape(name, torch_count, dropped):
  abstract = nnx.eval_shape(lambda: dinov3.DinoV3(dinov3.VARIANTS[name], rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert params_lib.count_params(nnx.state(abstract, nnx.Param)) == torch_count - dropped


def spec_rope(periods: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """SPEC.md §2.1 literally, in float64, one patch at a time."""
  rows = []
  for i in range(h):
    for j in range(w):
      y, x = 2 * (i + 0.5) / h - 1, 2 * (j + 0.5) / w - 1
      angles = 2 * np.pi * np.concatenate([y / periods, x / periods])
      rows.append(np.concatenate([angles, angles]))
  angles = np.array(rows)
  return np.cos(angles), np.sin(angles)


def test_rope_follows_the_spec_formula_non_square():
  head_dim, h, w = 16, 3, 5
  periods = dinov3.default_rope_periods(head_dim)
  np.testing.assert_allclose(periods, 100.0 ** (4 * np.arange(4) / head_dim), rtol=1e-6)
  cos, sin = dinov3.rope_cos_sin(jnp.asarray(periods), h, w, num_prefix_tokens=5)
  ref_cos, ref_sin = spec_rope(periods.astype(np.float64), h, w)
  np.testing.assert_array_equal(cos[:5], 1.0)
  np.testing.assert_array_equal(sin[:5], 0.0)
  np.testing.assert_allclose(cos[5:], ref_cos, atol=2e-6)
  np.testing.assert_allclose(sin[5:], ref_sin, atol=2e-6)
  # rotate-half, not interleaved: q' = q*cos + [-q2, q1]*sin
  q = np.random.default_rng(0).normal(size=(1, h * w + 5, 2, head_dim)).astype(np.float32)
  rotated = np.asarray(dinov3.apply_rope(jnp.asarray(q), cos[:, None], sin[:, None]))
  half = np.concatenate([-q[..., head_dim // 2:], q[..., :head_dim // 2]], axis=-1)
  ref = q * np.asarray(cos)[None, :, None] + half * np.asarray(sin)[None, :, None]
  np.testing.assert_allclose(rotated, ref, atol=1e-6)
  np.testing.assert_array_equal(rotated[:, :5], q[:, :5])  # prefix tokens untouched


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_attention_matches_explicit_softmax(implementation):
  model = small_model()
  attn = model.blocks[0].attn
  attn.attention_implementation = implementation
  x = jax.random.normal(jax.random.key(2), (2, 5 + 6, 64))
  cos, sin = dinov3.rope_cos_sin(model.rope_periods[...], 2, 3, 5)
  out = np.asarray(nnx.jit(lambda a, *args: a(*args))(attn, x, cos, sin), np.float64)
  # Independent reference in float64: fused qkv, masked k bias, rope, softmax, proj.
  kernel = np.asarray(attn.qkv.kernel[...], np.float64)
  bias = np.asarray(attn.qkv.bias[...], np.float64) * np.repeat([1, 0, 1], 64)
  qkv = (np.asarray(x, np.float64) @ kernel + bias).reshape(2, 11, 3, 4, 16)
  c, s = np.asarray(cos, np.float64)[None, :, None], np.asarray(sin, np.float64)[None, :, None]
  rot = lambda t: t * c + np.concatenate([-t[..., 8:], t[..., :8]], -1) * s
  q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 11, 64)
  ref = heads @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_k_bias_is_masked_in_output_and_gradient():
  model = small_model()
  images = jax.random.normal(jax.random.key(3), (1, 32, 48, 3))
  before = forward(model, images)
  qkv = model.blocks[1].attn.qkv
  qkv.bias[...] = qkv.bias[...].at[64:128].add(5.0)
  np.testing.assert_array_equal(forward(model, images), before)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(images) ** 2)))(model)
  bias_grad = grads["blocks"][1]["attn"]["qkv"]["bias"][...]
  assert np.all(bias_grad[64:128] == 0) and np.any(bias_grad[:64] != 0)


@pytest.mark.parametrize("ffn, qkv_bias", [("mlp", True), ("swiglu", False)])
def test_extras_and_non_square_input(ffn, qkv_bias):
  model = small_model(ffn=ffn, qkv_bias=qkv_bias)
  images = jax.random.normal(jax.random.key(4), (2, 32, 48, 3))
  extras = nnx.jit(lambda m, x: m(x, return_extras=True))(model, images)
  assert extras["patch"].shape == (2, 2, 3, 64) and extras["patch"].dtype == jnp.float32
  assert extras["cls"].shape == (2, 64) and extras["storage"].shape == (2, 4, 64)
  assert len(extras["blocks"]) == 3 and extras["blocks"][-1].shape == (2, 5 + 6, 64)
  np.testing.assert_allclose(forward(model, images), extras["patch"], atol=1e-5)
  normed = model.norm(extras["blocks"][-1])
  np.testing.assert_allclose(normed[:, 0], extras["cls"], atol=1e-5)
  np.testing.assert_allclose(normed[:, 5:].reshape(2, 2, 3, 64), extras["patch"], atol=1e-5)
  # Row-major patches: moving one 16x16 patch's pixels changes features everywhere (attention)
  # but the patch embedding of patch (1, 2) comes from pixels [16:32, 32:48].
  tokens = model.patch_embed(images)
  np.testing.assert_allclose(tokens[:, 5], model.patch_embed(images[:, 16:32, 32:48])[:, 0],
                             atol=1e-5)
  with pytest.raises(ValueError, match="multiples of the patch size 16"):
    model(jnp.zeros((1, 32, 40, 3)))


def test_bfloat16_compute_keeps_float32_params_and_output():
  f32, bf16 = small_model(), small_model(jnp.bfloat16)
  images = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  out32, out16 = forward(f32, images), forward(bf16, images)
  assert out16.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16)))
  err = float(jnp.abs(out32 - out16).max())
  assert 0 < err < 0.1, err  # bf16 matmuls, float32 norms/softmax/RoPE
  jaxpr = str(jax.make_jaxpr(lambda x: bf16(x))(images))
  assert "bf16" in jaxpr and "dot_general" in jaxpr


def test_state_layout_for_freezing_and_loading():
  model = small_model()
  paths = {path: v for path, v in nnx.to_flat_state(nnx.state(model))}
  assert isinstance(paths[("rope_periods",)], dinov3.RopePeriods)
  assert not isinstance(paths[("rope_periods",)], nnx.Param)
  assert isinstance(paths[("blocks", 2, "attn", "qkv", "kernel")], nnx.Param)
  assert {p[0] for p in paths} == {"patch_embed", "cls_token", "storage_tokens", "rope_periods",
                                   "blocks", "norm"}
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  params["blocks"][0]["ls1"]["gamma"] = np.zeros(64, np.float32)
  fresh = dinov3.DinoV3(model.config, rngs=nnx.Rngs(9))
  params_lib.assign_params(fresh, params)
  np.testing.assert_array_equal(fresh.blocks[0].ls1.gamma[...], 0)
  del params["norm"]["bias"]
  params["blocks"][1]["mlp"]["fc1"]["kernel"] = np.zeros((3, 3), np.float32)
  params["extra"] = np.zeros(1)
  with pytest.raises(ValueError) as error:
    params_lib.assign_params(fresh, params, source="x.ckpt")
  message = str(error.value)
  assert "missing: norm.bias" in message and "unexpected: extra" in message
  assert "blocks.1.mlp.fc1.kernel: shape (3, 3), model expects (64, 128)" in message
