r"""Packs an EgoDorsal folder into ArrayRecord shards (TFDS builder; TensorFlow not needed).

  python tools/pack_array_record.py --src /data/egodorsal --out /data/egodorsal_packed
  python -m dd_jax.train --config configs/pose.py --config.data.data_dir=/data/egodorsal_packed \
      --config.data.format=array_record

JPEG bytes are kept encoded; HaMeR and annotation arrays are parsed (safely) once, here.
Frames whose files are missing or unreadable are packed with their error, which the loader
reports exactly as it would for the folder (or skips with data.skip_bad_frames=True).

With --image_size S the expensive part is done here instead (dd_jax/data/crops.py): the online
alignment and crop (--crops_mode online, the default) or the precrops (--crops_mode precropped),
resized to S x S and stored (--codec raw: the pixels, exact; jpeg: ~6x smaller, lossy), in
--workers processes, resumable (rerun the same command after an interruption), bad frames
skipped and listed. Train with data.out_img_size = S and data.precropped matching the mode.
"""

import json
import os

from absl import app, flags

from dd_jax.data import array_record

_SRC = flags.DEFINE_string("src", None, "EgoDorsal folder (bases.json, trials.json, ...)",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "pack aligned crops of this size (0: pack "
                                   "the files as they are)")
_MODE = flags.DEFINE_enum("crops_mode", "online", ["online", "precropped"],
                          "with --image_size: crops of the online alignment or the precrops")
_CODEC = flags.DEFINE_enum("codec", "raw", ["raw", "jpeg"], "with --image_size: how crops are "
                           "stored (raw: uint8 pixels, exact, fastest to read; jpeg: ~6x smaller, "
                           "within ~10 intensity levels at quality 95)")
_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "with --image_size --codec jpeg: JPEG quality")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1,
                                "with --image_size: worker processes (0: in this process)")
_CHUNK = flags.DEFINE_integer("chunk_frames", 256, "with --image_size: frames per shard")


def main(argv):
  del argv
  if _IMAGE_SIZE.value:
    from dd_jax.data import crops  # pylint: disable=g-import-not-at-top
    summary = crops.pack(_SRC.value, _OUT.value, _IMAGE_SIZE.value, mode=_MODE.value,
                         codec=_CODEC.value, jpeg_quality=_QUALITY.value, workers=_WORKERS.value,
                         chunk_frames=_CHUNK.value)
  else:
    summary = array_record.pack(_SRC.value, _OUT.value)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
