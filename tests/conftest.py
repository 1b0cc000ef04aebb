"""Test setup: 8 simulated CPU devices (set before JAX starts) and absl flags parsed once."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain worker processes and ml_collections read absl flags; parse them once with defaults.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


def pytest_report_header(config):
  """Which DINOv3 implementation the models get (DD_JAX_DINOV3_IMPL=custom_vjp|autodiff forces one
  for the whole run; docs/testing.md)."""
  del config
  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  forced = os.environ.get(kernels.IMPL_ENV)
  how = f"forced by {kernels.IMPL_ENV}" if forced else "auto"
  return f"dd_jax DINOv3 implementation: {kernels.resolve_dinov3_impl()} ({how})"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """The tiny synthetic EgoDorsal set of tests/tiny.py, generated once per session."""
  import tiny  # pylint: disable=g-import-not-at-top
  return tiny.dataset(tmp_path_factory.getbasetemp())
