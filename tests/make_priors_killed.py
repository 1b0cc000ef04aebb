"""tools/make_priors.py that SIGKILLs itself right after writing its N-th prior file
(N = $DD_JAX_SIGKILL_AFTER_PRIORS): the resume test's fault injection (the library has no hook)."""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import make_priors  # noqa: E402

from dd_jax.priors import writer  # noqa: E402

_write_prior = writer.write_prior
_written = 0


def _write_then_die(path, prior):
  global _written
  _write_prior(path, prior)
  _written += 1
  if _written == int(os.environ["DD_JAX_SIGKILL_AFTER_PRIORS"]):
    os.kill(os.getpid(), signal.SIGKILL)


writer.write_prior = _write_then_die

if __name__ == "__main__":
  sys.exit(make_priors.main(sys.argv[1:]))
