"""One run per run folder: an exclusive lock file, `<workdir>/run.lock`, naming its owner.

Two trainers on one folder would both append to metrics.jsonl and delete each other's
checkpoints. The lock is a POSIX record lock (lockf) on the file: the kernel drops it when its
process dies, SIGKILL included, and unlike flock it is not inherited by forked data workers that
may outlive their parent. A lock left by a dead process is then free, and the next run takes it
over (saying whose it was); a second lock in the same process is refused too (`_held`). The
file's text names the holder (pid, host, start time, command) for the message a second run
gets. Multi-host runs: only process 0 locks; the others trust it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

from dd_jax.logs import log

LOCK_NAME = "run.lock"
_held: set[str] = set()  # POSIX locks are per process: this process's own, by path


class RunFolderLockedError(RuntimeError):
  """Another live process holds the run folder's lock; the message names the folder and it."""


def _holder(f) -> dict:
  f.seek(0)
  try:
    return json.loads(f.read() or "{}")
  except ValueError:
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "a process that has not written its name yet"
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
          f"({holder.get('command')})")


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds `workdir`'s lock for the body (creating the folder); RunFolderLockedError when another
  live process holds it. enabled=False (processes other than 0) does nothing."""
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise OSError(f"{workdir}: cannot create the run lock {path} ({e.strerror}); the run folder "
                  "must be writable") from e
  try:
    try:
      if path in _held:
        raise BlockingIOError(errno.EAGAIN, "held by this process")
      fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EAGAIN):
        raise
      holder = _holder(f)
      if not holder:  # it has just taken the lock: give it a moment to write its name
        time.sleep(0.5)
        holder = _holder(f)
      raise RunFolderLockedError(
          f"{workdir} is in use by another run: {_describe(holder)}, which holds {path}. Wait "
          "for it to finish or stop it, or give this run another --workdir.") from None
    stale = _holder(f)
    if stale:
      log.warning("%s: taking over the lock of a run that is no longer running (%s)", workdir,
                  _describe(stale))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": " ".join(sys.argv)}))
    f.flush()
    _held.add(path)
    try:
      yield
    finally:
      _held.discard(path)
      f.seek(0)
      f.truncate()  # an empty file: nobody holds it (the lock goes with the close)
      f.flush()
  finally:
    f.close()
