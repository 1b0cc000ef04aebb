r"""The DeltaDorsal paper's analysis of a run folder or a LOSO folder, in one command.

  python tools/report.py runs/loso                  # -> runs/loso/report/report.md, *.csv, *.png
  python tools/report.py runs/demo --out /tmp/demo_report --data_dir _cache/synthetic_egodorsal

Tables: per joint, per gesture and hand position, finger visibility, self-occluded taps and
pinches, force per frame and per click, per participant with a one-way ANOVA, PCK / AUC; each
as mean ± SD across participants, DeltaDorsal beside the prior. Definitions: docs/report.md.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dd_jax.analysis import report  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "", "output folder (default: RUN_OR_LOSO_DIR/report)")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "dataset for fields the test outputs lack "
                                "(default: data.data_dir of each run's config.json)")
_MANO = flags.DEFINE_string("mano", None, "MANO file for visibility (default: the run's "
                            "mano.path; '' = the synthetic hand)")
_FACE_LABELS = flags.DEFINE_string("face_labels", "", "mano_face_labels.json (default: labels "
                                   "generated from the MANO model)")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: tools/report.py RUN_OR_LOSO_DIR [--out DIR]")
  path = report.write_report(argv[1], _OUT.value or None, report.Sources(
      data_dir=_DATA_DIR.value, mano_path=_MANO.value, face_labels=_FACE_LABELS.value))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
