r"""Trains and tests DeltaDorsal.

  python -m dd_jax.train --config configs/pose.py:demo --workdir runs/demo
  python -m dd_jax.train --config configs/pose.py --workdir runs/pose --config.data.batch_size=32
"""

from absl import app

from dd_jax import experiment, launch, logs


def main(argv):
  del argv
  logs.setup_console()
  launch.initialize_distributed()
  if launch.FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  experiment.train_and_evaluate(launch.FLAGS.config, launch.FLAGS.workdir)


if __name__ == "__main__":
  launch.flags.mark_flags_as_required(["config"])
  app.run(main)
