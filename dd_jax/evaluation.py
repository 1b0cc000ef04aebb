"""Sharded evaluation over a whole split: metrics from sums and counts, per-frame outputs.

Every device of every process evaluates its slice of each global batch; padded frames carry
valid=False and are masked inside the step, so each frame counts exactly once. Metric sums come
back replicated; per-frame outputs are gathered to every process and sorted by frame_id.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import jax
import numpy as np

from dd_jax import parallel


@dataclasses.dataclass
class Evaluation:
  """What evaluating a split gives."""
  metrics: dict[str, float]
  drawn: dict[str, np.ndarray]  # split-level arrays for the task's summary pictures (confusion)
  outputs: dict[str, np.ndarray] | None  # keep_outputs: every valid frame once, by frame_id
  first_batch: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None  # (local batch,
  # its outputs on the host) with keep_first_batch: what the validation pictures show


def evaluate(eval_step: Callable, step_args: tuple, batches: Iterable[dict[str, np.ndarray]],
             mesh: jax.sharding.Mesh,
             finalize: Callable[[dict], tuple[dict[str, float], dict[str, np.ndarray]]], *,
             keep_outputs: bool = False, keep_first_batch: bool = False) -> Evaluation:
  """Runs `eval_step(trainable, frozen, batch, consts)` over `batches`.

  step_args = (trainable, frozen, consts); finalize: the task's (summed sums -> metrics, drawn).
  Outputs (keep_outputs) hold every valid frame once, ordered by frame_id, on every process.
  """
  totals: dict[str, np.ndarray] = {}
  kept: list[dict[str, np.ndarray]] = []
  first_batch = None
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
    if keep_outputs or (index == 0 and keep_first_batch):
      host = parallel.to_host(dict(outputs, frame_id=batch["frame_id"], valid=batch["valid"]))
      if index == 0 and keep_first_batch:
        first_batch = (local_batch, dict(host))
      if keep_outputs:
        valid = host.pop("valid").astype(bool)
        kept.append({k: v[valid] for k, v in host.items()})
    timed_frames += int(np.asarray(local_batch["valid"]).sum())
  elapsed = time.perf_counter() - start
  metrics, drawn = finalize(totals) if totals else ({}, {})
  # Wall time of the loop (input included, first batch excluded) per frame, on this process.
  metrics["inference_ms_per_frame"] = 1000.0 * elapsed / max(timed_frames, 1)
  merged = None
  if keep_outputs:
    merged = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]} if kept else {}
  if merged:
    order = np.argsort(merged["frame_id"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["frame_id"])) != len(merged["frame_id"]):
      raise RuntimeError("evaluation produced a frame more than once: the eval loader's "
                         "sharding is wrong")
  return Evaluation(metrics, drawn, merged, first_batch)
