r"""Converts a DeltaDorsal Lightning .ckpt (pose or force) into a dd_jax checkpoint folder.

  python tools/convert_deltadorsal.py best.ckpt /ckpt/deltadorsal_pose --config configs/pose.py
  python tools/convert_deltadorsal.py force.ckpt /ckpt/dd_force --config configs/force.py \
      --config.model.head.pool=avg

The backbone variant and the shapes come from the file; head settings it cannot tell (pool; FiLM
without a prior) come from the config, and any disagreement is an error naming the setting.
No torch needed; the file's optimizer / hyper-parameter objects are skipped, never executed.
Format: dd_jax/convert/lightning.py.
"""

from __future__ import annotations

import sys
import time

from absl import app
from ml_collections import config_flags

from dd_jax.convert import lightning

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pose.py",
                                          "configs/pose.py or configs/force.py (+ overrides)")


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(f"usage: {argv[0]} CKPT OUT_DIR --config configs/pose.py|configs/force.py",
          file=sys.stderr)
    return 2
  ckpt, out_dir = argv[1], argv[2]
  config = _CONFIG.value
  start = time.time()
  try:
    params, notes = lightning.convert_lightning(ckpt, config)
  except (lightning.LightningConversionError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for note in notes:
    print(f"note: {note}")
  lightning.save_deltadorsal_checkpoint(out_dir, params, config, source=ckpt, notes=notes)
  print(f"{ckpt}: {config.task} network converted to {out_dir} in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
