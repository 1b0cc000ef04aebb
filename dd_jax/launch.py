"""Flags and start-up shared by the entry points (train, evaluate): config, workdir, jax.distributed."""

from __future__ import annotations

import jax
from absl import flags
from ml_collections import config_flags

from dd_jax.logs import log

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pose.py or configs/pose.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, pictures, test outputs.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs without auto-detection "
                    "(multi-node GPUs, local tests). TPU pods and SLURM are detected without it.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection "
                  "(TPU pod slices, SLURM, Open MPI).")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "Seconds after which the others give up on a silent (dead) process.")

FLAGS = flags.FLAGS


def initialize_distributed() -> None:
  """Joins the process group when the flags ask to; a single process needs nothing."""
  join_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                 FLAGS.distributed, FLAGS.heartbeat_timeout_s)


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
