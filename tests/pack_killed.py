"""tools/pack_array_record.py that SIGKILLs itself right after committing its N-th chunk of crops
(N = $DD_JAX_SIGKILL_AFTER_CHUNKS): the resume test's fault injection (the library has no hook)."""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import pack_array_record  # noqa: E402
from absl import app  # noqa: E402

from dd_jax.data import crops  # noqa: E402

_commit = crops._commit  # pylint: disable=protected-access
_committed = 0


def _commit_then_die(record_path, summary_path):
  global _committed
  _commit(record_path, summary_path)
  _committed += 1
  if _committed == int(os.environ["DD_JAX_SIGKILL_AFTER_CHUNKS"]):
    os.kill(os.getpid(), signal.SIGKILL)


crops._commit = _commit_then_die  # pylint: disable=protected-access

if __name__ == "__main__":
  app.run(pack_array_record.main)
