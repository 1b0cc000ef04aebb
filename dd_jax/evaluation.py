"""Sharded evaluation over a whole split: metrics from sums and counts, per-frame outputs.

Every device of every process evaluates its slice of each global batch; padded frames carry
valid=False and are masked inside the step, so each frame counts exactly once. Metric sums come
back replicated; per-frame outputs are gathered to every process and sorted by frame_id.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax
import numpy as np

from dd_jax import parallel


def evaluate(eval_step: Callable, step_args: tuple, batches: Iterable[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh, finalize: Callable[[dict], dict[str, float]], *,
             keep_outputs: bool = False, first_batch_hook: Callable | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
  """Runs `eval_step(trainable, frozen, batch, consts)` over `batches` -> (metrics, outputs).

  step_args = (trainable, frozen, consts).

  outputs (when keep_outputs) holds every valid frame once, ordered by frame_id, on every process.
  `first_batch_hook(local_batch, host_outputs)` sees the first batch (validation pictures).
  """
  totals: dict[str, np.ndarray] = {}
  kept: list[dict[str, np.ndarray]] = []
  timed_frames = 0
  start = time.perf_counter()
  for index, local_batch in enumerate(batches):
    if index == 1:  # time from the second batch on: the first one includes compilation
      start, timed_frames = time.perf_counter(), 0
    batch = parallel.global_batch(mesh, local_batch)
    trainable, frozen, consts = step_args
    sums, outputs = eval_step(trainable, frozen, batch, consts)
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(sums))
    for k, v in sums.items():
      totals[k] = totals[k] + v if k in totals else v
    if keep_outputs or (index == 0 and first_batch_hook is not None):
      host = parallel.to_host(dict(outputs, frame_id=batch["frame_id"], valid=batch["valid"]))
      if index == 0 and first_batch_hook is not None:
        first_batch_hook(local_batch, host)
      if keep_outputs:
        valid = host.pop("valid").astype(bool)
        kept.append({k: v[valid] for k, v in host.items()})
    timed_frames += int(np.asarray(local_batch["valid"]).sum())
  elapsed = time.perf_counter() - start
  metrics = finalize(totals) if totals else {}
  # Wall time of the loop (input included, first batch excluded) per frame, on this process.
  metrics["inference_ms_per_frame"] = 1000.0 * elapsed / max(timed_frames, 1)
  if not keep_outputs:
    return metrics, None
  if not kept:
    return metrics, {}
  merged = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
  order = np.argsort(merged["frame_id"], kind="stable")
  merged = {k: v[order] for k, v in merged.items()}
  if len(np.unique(merged["frame_id"])) != len(merged["frame_id"]):
    raise RuntimeError("evaluation produced a frame more than once: the eval loader's sharding is wrong")
  return metrics, merged

