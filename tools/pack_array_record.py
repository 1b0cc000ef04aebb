r"""Packs an EgoDorsal folder into ArrayRecord shards (TFDS builder; TensorFlow not needed).

  python tools/pack_array_record.py --src /data/egodorsal --out /data/egodorsal_packed
  python -m dd_jax.train --config configs/pose.py --config.data.data_dir=/data/egodorsal_packed \
      --config.data.format=array_record

JPEG bytes are kept encoded; HaMeR and annotation arrays are parsed (safely) once, here.
Frames whose files are missing or unreadable are packed with their error, which the loader
reports exactly as it would for the folder (or skips with data.skip_bad_frames=True).
"""

import json

from absl import app, flags

from dd_jax.data import array_record

_SRC = flags.DEFINE_string("src", None, "EgoDorsal folder (bases.json, trials.json, ...)",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)


def main(argv):
  del argv
  print(json.dumps(array_record.pack(_SRC.value, _OUT.value), indent=2))


if __name__ == "__main__":
  app.run(main)
