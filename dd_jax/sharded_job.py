"""Long jobs over many files on every device of every process, each item exactly once: the
machinery the make-priors job and the dataset predictions share.

Items run in waves (a later wave may need an earlier one's results, e.g. a tracked hand box),
each wave in fixed-size global batches (the last one padded) split over the mesh's data axis.
Every process builds the same plan, prepares only the rows its devices hold (threads decode
while the devices run the previous batch) and writes only their outputs; outputs and per-row
metadata are gathered to every process. A row whose preparation fails carries its message
instead, is reported on every process and skipped. Files are written atomically (a sibling
temporary file renamed over the target), so a killed run leaves no partial file and a rerun
resumes from what exists.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from dd_jax import parallel

ERROR_BYTES = 400


class Skip(Exception):
  """An item cannot be prepared; the message names it and says why."""


def local_rows(mesh: jax.sharding.Mesh, global_batch: int) -> list[int]:
  """The rows of a global batch that this process's devices hold (in order)."""
  index_map = parallel.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  return sorted({r for index in index_map.values()
                 for r in range(*index[0].indices(global_batch))})


def encode_error(message: str) -> np.ndarray:
  data = message.encode("utf-8", "replace")[:ERROR_BYTES]
  return np.frombuffer(data.ljust(ERROR_BYTES, b"\0"), np.uint8).copy()


def decode_error(row: np.ndarray) -> str:
  return bytes(np.asarray(row, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """write(binary file) into a sibling temporary file, flushed to disk, renamed over `path`:
  a reader or a killed run never sees a partial file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclasses.dataclass
class Batch:
  """One finished global batch, the same on every process."""
  items: list[int]  # the item of each row; rows past len(items) were padding
  outputs: dict[str, np.ndarray]  # compute's outputs, whole global batch
  meta: dict[str, np.ndarray]  # prepare's metadata, whole global batch
  errors: list[str]  # per row of `items`: "" when it ran, else why it was skipped
  mine: frozenset[int]  # the rows this process prepared (and so writes)


Prepared = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (inputs, meta) of one row


def run(waves: list[list[int]], *, mesh: jax.sharding.Mesh, global_batch: int,
        prepare: Callable[[int], Prepared], blank: Prepared,
        compute: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
        finish: Callable[[Batch], None], workers: int = 4, progress_every_s: float = 10.0,
        unit: str = "images", log: Callable[[str], None] = print) -> None:
  """Runs every item of `waves` once over `mesh`.

  prepare(item) -> (inputs, meta), arrays of fixed shapes, or raises Skip(message); it runs in
    `workers` threads of this process, for this process's rows only.
  blank: (inputs, meta) of a padding or skipped row.
  compute(global inputs) -> global outputs, split over the data axis (a compiled function).
  finish(batch) runs on every process after each batch, in order; it writes the rows in
    batch.mine and may keep results a later wave's prepare reads.
  Progress (process 0): items done, items/s and the ETA, every `progress_every_s`.
  """
  mine = local_rows(mesh, global_batch)
  total = sum(len(w) for w in waves)
  first = jax.process_index() == 0
  done = 0
  start = last_log = time.perf_counter()

  def prepare_row(item: int) -> tuple[Prepared, str]:
    try:
      return prepare(item), ""
    except Skip as e:
      return blank, str(e)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for wave in waves:
      batches = [wave[s:s + global_batch] for s in range(0, len(wave), global_batch)]

      def submit(batch):
        return [pool.submit(prepare_row, batch[r]) if r < len(batch) else None for r in mine]

      pending = submit(batches[0]) if batches else None
      for b, batch in enumerate(batches):
        rows = [f.result() if f is not None else (blank, "") for f in pending]
        pending = submit(batches[b + 1]) if b + 1 < len(batches) else None
        local_valid = [r < len(batch) and not error for r, (_, error) in zip(mine, rows)]
        local = {
            "inputs": {k: np.stack([row[0][k] for row, _ in rows]) for k in blank[0]},
            "meta": {k: np.stack([row[1][k] for row, _ in rows]) for k in blank[1]},
            "valid": np.array(local_valid),
            "error": np.stack([encode_error(error) for _, error in rows]),
        }
        flat = parallel.global_batch(mesh, _flatten(local))
        inputs = {k[len("inputs/"):]: v for k, v in flat.items() if k.startswith("inputs/")}
        outputs = compute(inputs)
        gathered = parallel.to_host({"outputs": outputs, "rest": {
            k: v for k, v in flat.items() if not k.startswith("inputs/")}})
        rest = _unflatten(gathered["rest"])
        errors = ["" if rest["valid"][r] else decode_error(rest["error"][r]) or "skipped"
                  for r in range(len(batch))]
        finish(Batch(list(batch), gathered["outputs"], rest["meta"], errors, frozenset(mine)))
        done += len(batch)
        now = time.perf_counter()
        if first and (now - last_log >= progress_every_s or done == total):
          rate = done / max(now - start, 1e-9)
          eta = (total - done) / max(rate, 1e-9)
          log(f"{done}/{total} {unit} ({100 * done / max(total, 1):.0f}%), {rate:.1f} {unit}/s, "
              f"ETA {duration(eta)}")
          last_log = now


def _flatten(tree: dict) -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update({f"{key}/{k}": v for k, v in value.items()})
    else:
      out[key] = value
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    if "/" in key:
      parent, child = key.split("/", 1)
      out.setdefault(parent, {})[child] = value
    else:
      out[key] = value
  return out
