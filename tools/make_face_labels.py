r"""Writes MANO face labels in the original's mano_face_labels.json format for a MANO-format model.

  python tools/make_face_labels.py --out _cache/synthetic_face_labels.json   # the synthetic hand
  python tools/make_face_labels.py --mano /models/MANO_RIGHT.pkl --out my_face_labels.json

One integer per face: 0 index, 1 middle, 2 ring, 3 pinky, 4 thumb, 5 dorsal, 6 palm (7 other is
never produced). A face belongs to the finger whose joints skin most of its vertices; the rest
of the hand is dorsal or palm by the side its normal faces. For the real MANO the original's
assets/mano_face_labels.json is the reference (`tools/report.py --face_labels`).
"""

import json

from absl import app, flags

from dd_jax.analysis import visibility
from dd_jax.mano import io as mano_io

_OUT = flags.DEFINE_string("out", None, "output JSON file", required=True)
_MANO = flags.DEFINE_string("mano", "", "MANO file (any layout); empty = the synthetic hand")


def main(argv):
  del argv
  labels = visibility.generate_face_labels(mano_io.load_mano_or_synthetic(_MANO.value))
  visibility.save_face_labels(labels, _OUT.value)
  counts = {name: int((labels == k).sum()) for k, name in enumerate(visibility.LABEL_NAMES)}
  print(json.dumps({"wrote": _OUT.value, "faces": len(labels), "per_label": counts}))


if __name__ == "__main__":
  app.run(main)
