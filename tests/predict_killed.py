"""`python -m dd_jax.predict` that SIGKILLs itself right after writing its N-th per-frame result
file (N = $DD_JAX_SIGKILL_AFTER_RESULTS): the dataset job's resume test's fault injection (the
library has no hook)."""

import os
import signal

from absl import app

from dd_jax import predict, sharded_job

_atomic_write = sharded_job.atomic_write
_written = 0


def _write_then_die(path, write):
  global _written
  _atomic_write(path, write)
  if f"{os.sep}frames{os.sep}" in path and path.endswith(".npz"):
    _written += 1
    if _written == int(os.environ["DD_JAX_SIGKILL_AFTER_RESULTS"]):
      os.kill(os.getpid(), signal.SIGKILL)


sharded_job.atomic_write = _write_then_die

if __name__ == "__main__":
  predict._define_flags()  # pylint: disable=protected-access
  app.run(predict.main)
