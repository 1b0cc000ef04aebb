"""Flags and start-up shared by the entry points (train, evaluate): config, workdir, jax.distributed."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dd_jax import parallel

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
  parallel.join_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                          FLAGS.distributed, FLAGS.heartbeat_timeout_s)
