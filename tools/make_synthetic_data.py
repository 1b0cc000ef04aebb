r"""Writes a synthetic EgoDorsal dataset (the full SPEC.md §4 layout) and prints its prior MPJPE.

  python tools/make_synthetic_data.py --out _cache/synthetic_egodorsal \
      --participants 8 --trials 6 --frames 10 --image_size 256 --seed 0

About 15-25 s for the default 480 frames on 2 CPU cores. Then train on it with
`--config.data.data_dir=<out>` (or let configs/pose.py:demo generate it on first use).
"""

import json

from absl import app, flags

from dd_jax.synthetic import dataset as synthetic

_OUT = flags.DEFINE_string("out", None, "output folder (must not exist or be empty)", required=True)
_PARTICIPANTS = flags.DEFINE_integer("participants", 8, "participants (splits: last = test, "
                                     "the one before = val, the rest = train)")
_TRIALS = flags.DEFINE_integer("trials", 6, "trials per participant (force motion types cycle)")
_FRAMES = flags.DEFINE_integer("frames", 10, "frames per trial")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "frame width in pixels (height = 3/4); "
                                   "256 makes HaMeR's camera convention exact")
_BASES = flags.DEFINE_integer("bases", 2, "neutral-pose base images per participant")
_SEED = flags.DEFINE_integer("seed", 0, "random seed (the output is a function of it)")


def main(argv):
  del argv
  summary = synthetic.make_synthetic_dataset(
      _OUT.value, participants=_PARTICIPANTS.value, trials=_TRIALS.value, frames=_FRAMES.value,
      image_size=_IMAGE_SIZE.value, seed=_SEED.value, bases=_BASES.value)
  for split in ("train", "val", "test"):
    summary[f"prior_mpjpe_mm_{split}"] = round(synthetic.prior_mpjpe_mm(_OUT.value, split), 2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
