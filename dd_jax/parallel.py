"""Device mesh, parameter / batch shardings and host <-> global array plumbing.

One mesh axis, "data", spans every device of every process. Batches are split over it; parameters
are replicated (data parallel) or, with FSDP, each large parameter is also split over it along
its largest divisible dimension, so vith16plus / vit7b16 fit without a model axis.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from dd_jax.logs import log

DATA_AXIS = "data"
# Parameters smaller than this stay replicated under FSDP: splitting them saves nothing and
# costs a collective each.
FSDP_MIN_SIZE = 2**18


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def check_batch_sizes(mesh: jax.sharding.Mesh, batch_size: int, eval_batch_size: int,
                      accumulate_steps: int = 1) -> None:
  """Global batches are split evenly over devices (and so over processes); with gradient
  accumulation every device's share of a train batch splits evenly into the micro-batches."""
  n = mesh.shape[DATA_AXIS]
  where = f"the {n} devices of the mesh ({jax.process_count()} processes)"
  problems = []
  if batch_size % (n * accumulate_steps):
    problems.append(f"data.batch_size={batch_size} must be a multiple of {where}"
                    + (f" x optimizer.accumulate_steps={accumulate_steps} (= {n * accumulate_steps})"
                       if accumulate_steps > 1 else ""))
  if eval_batch_size % n:
    problems.append(f"data.eval_batch_size={eval_batch_size} must be a multiple of {where}")
  if problems:
    raise ValueError("; ".join(problems))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return jax.sharding.NamedSharding(mesh, jax.P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P())


def param_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, ...], fsdp: bool):
  """Replicated, or (FSDP) split along the largest dimension the device count divides."""
  n = mesh.shape[DATA_AXIS]
  if not fsdp or n == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return jax.sharding.NamedSharding(mesh, jax.P(*spec))
  return replicated(mesh)


def tree_shardings(mesh: jax.sharding.Mesh, abstract_tree, fsdp: bool):
  """Shardings for a pytree of arrays / ShapeDtypeStructs (parameters and optimizer state)."""
  return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape), fsdp), abstract_tree)


def global_batch(mesh: jax.sharding.Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays split over the data axis (no host copies)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(tree):
  """Global (possibly multi-process) arrays -> full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def join_processes(coordinator_address: str | None, num_processes: int | None,
                   process_id: int | None, distributed: bool, heartbeat_timeout_s: int) -> None:
  """jax.distributed.initialize with an explicit coordinator (local tests, multi-node GPUs) or
  auto-detection (`distributed`: TPU pods, SLURM, Open MPI); nothing otherwise."""
  if coordinator_address:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, cluster_detection_method="deactivate",
        heartbeat_timeout_seconds=heartbeat_timeout_s)
  elif distributed:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
