r"""Evaluates a trained checkpoint on the test split (or any split), sharded over every device
of every process: metrics JSON, per-frame outputs (test_outputs_epoch{N}.npy) and pictures.

  python -m dd_jax.evaluate --config configs/pose.py --config.ckpt_path=runs/pose
  python -m dd_jax.evaluate --config configs/force.py --config.ckpt_path=runs/force/checkpoints/1200 \
      --config.data.test_split=val --workdir runs/force/eval_val

A run folder evaluates its best checkpoint; a step folder that step. The config must describe
the checkpoint's model (the one it was trained with); data settings may differ.
"""

import os

from absl import app

from dd_jax import experiment, launch, logs


def main(argv):
  del argv
  logs.setup_console()
  launch.initialize_distributed()
  config = launch.FLAGS.config
  if not config.ckpt_path:
    raise app.UsageError("--config.ckpt_path is required (a run folder or a checkpoint step)")
  with config.unlocked():
    config.train, config.test = False, True
  workdir = launch.FLAGS.workdir or os.path.join(config.ckpt_path.rstrip("/"), "eval")
  experiment.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  launch.flags.mark_flags_as_required(["config"])
  app.run(main)
