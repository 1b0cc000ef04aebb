"""dd_jax.kernels: CPU facts from /proc/cpuinfo text and the dot-kernel census of compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import kernels

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni avx512f
"""

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_facts_from_cpuinfo_text(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(ZEN3)
  facts = kernels.cpu_facts(str(path), environ={})
  # Only the first processor's block counts (the second one's avx512f is ignored).
  assert facts == {"cpu": "AMD EPYC 7763 64-Core Processor", "vendor": "AuthenticAMD",
                   "family": 25, "model": 1, "avx2": True, "avx512": False, "amx": False,
                   "flags_from": str(path), "isa_caps": {}}
  path.write_text(SAPPHIRE_RAPIDS)
  facts = kernels.cpu_facts(str(path), environ={})
  assert (facts["family"], facts["model"], facts["avx512"], facts["amx"]) == (6, 143, True, True)
  assert kernels.describe_cpu(facts) == ("Intel(R) Xeon(R) Platinum 8481C (family 6, model 143): "
                                         "AVX2 yes, AVX-512 yes, AMX yes; ISA caps: none")


def test_cpu_facts_fallback_and_caps(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2",
         "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": ""}
  facts = kernels.cpu_facts(str(tmp_path / "absent"), environ=env)
  assert facts["flags_from"] in ("numpy", "unreadable")
  assert facts["isa_caps"] == {"xla_cpu_max_isa": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
  assert "ISA caps: xla_cpu_max_isa=AVX2, ATEN_CPU_CAPABILITY=avx2" in kernels.describe_cpu(facts)


def test_dot_kernels_of_a_compiled_function():
  """Dot FLOPs per library add up to the hand count; 'A @ B' and batched 'q k^T' run in
  YNNPACK, the weight-gradient form 'A^T @ B' and the convolution in XLA's own kernels."""
  def f(a, b, c):
    return (a @ b, a.T @ c,
            jnp.einsum("bqd,bkd->bqk", c.reshape(4, 32, 32), c.reshape(4, 32, 32)),
            jax.lax.conv_general_dilated(a[None, :, :, None], jnp.ones((3, 3, 1, 8)), (1, 1),
                                         "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  a = jnp.ones((64, 64))
  found = kernels.dot_kernels(jax.jit(f).lower(a, a, a).compile().as_text())
  total = sum(k["gflop"] for k in found.values())
  want = 2 * 64 ** 3 * 2 + 2 * 4 * 32 ** 3 + 2 * 64 * 64 * 8 * 9
  np.testing.assert_allclose(total, want / 1e9, rtol=1e-9)
  assert sum(k["dots"] for k in found.values()) == 4
  if "ynnpack" in found:  # jaxlib 0.10's default on x86; other builds may choose otherwise
    np.testing.assert_allclose(found["ynnpack"]["gflop"], (2 * 64 ** 3 + 2 * 4 * 32 ** 3) / 1e9)
  assert "% of dot FLOPs" in kernels.describe_dot_kernels(found)


def test_auto_impl_is_custom_vjp_on_every_machine_kind():
  """The A/B runs found no machine kind where autodiff's backward is faster (kernels.auto_impl)."""
  facts = lambda avx512, caps=None: {"avx512": avx512, "isa_caps": caps or {}}
  for backend, f in (("cpu", facts(True)), ("cpu", facts(False)),
                     ("cpu", facts(True, {"xla_cpu_max_isa": "AVX2"})), ("gpu", facts(False))):
    assert kernels.auto_impl(backend, f) == "custom_vjp"


def test_resolve_dinov3_impl_env_overrides_config(monkeypatch):
  monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
  assert kernels.resolve_dinov3_impl("autodiff") == "autodiff"
  assert kernels.resolve_dinov3_impl("auto") in kernels.DINOV3_IMPLS
  monkeypatch.setenv(kernels.IMPL_ENV, "autodiff")
  assert kernels.resolve_dinov3_impl("custom_vjp") == "autodiff"
  monkeypatch.setenv(kernels.IMPL_ENV, "avx2")
  with pytest.raises(ValueError, match="DD_JAX_DINOV3_IMPL='avx2'.*'custom_vjp', 'autodiff'"):
    kernels.resolve_dinov3_impl()
  monkeypatch.delenv(kernels.IMPL_ENV)
  with pytest.raises(ValueError, match="model.backbone.impl='fast'"):
    kernels.resolve_dinov3_impl("fast")


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_both_implementations_compute_the_same_values_and_gradients(monkeypatch, ffn):
  """The two paths differ only in what the backward keeps; each is checked against torch
  autograd by tests/test_convert_dinov3.py when forced with DD_JAX_DINOV3_IMPL."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
  config = dinov3.get_config("custom", dim=32, depth=2, num_heads=2, ffn=ffn, ffn_hidden=48)
  images = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
  out = {}
  for impl in kernels.DINOV3_IMPLS:
    model = dinov3.DinoV3(config, rngs=nnx.Rngs(0), impl=impl)
    assert {b.attn.impl for b in model.blocks} == {impl}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # O(1) weights everywhere (LayerScale included, 1e-5 at init) so that every part of the
    # block shows in the output and in every gradient.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype),
                          params)
    loss = lambda p, g=graphdef, r=rest: jnp.sum(jnp.sin(nnx.merge(g, p, r)(images)))
    out[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (value_a, grads_a), (value_b, grads_b) = out["custom_vjp"], out["autodiff"]
  np.testing.assert_allclose(value_a, value_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
