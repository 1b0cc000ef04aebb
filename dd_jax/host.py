"""Settings of the host process around JAX: its heap and OpenCV's threads.

Environment settings that must be in place before the process starts (glibc's MALLOC_* knobs,
JAX_PLATFORMS, XLA_FLAGS) are described in docs/benchmarks.md; these are the ones dd_jax makes
from inside the process.
"""

from __future__ import annotations

import ctypes

import cv2


def release_freed_host_memory() -> None:
  """Hands heap memory that was freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

  XLA's compiler frees hundreds of MB when it finishes, but glibc keeps freed heap mapped, so
  a step's buffers would come on top of it (ViT-S on CPU: ~400 MB of peak memory).
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def one_opencv_thread(worker_index: int = 0, worker_count: int = 1) -> None:
  """One OpenCV thread per Grain worker process (a worker_init_fn): no oversubscription."""
  del worker_index, worker_count
  cv2.setNumThreads(1)
