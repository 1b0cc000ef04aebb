r"""Converts HaMeR's released checkpoint for dd_jax (no torch needed; nothing in the file runs).

  python tools/convert_hamer.py _DATA/hamer_ckpts/checkpoints/hamer.ckpt /ckpt/hamer \
      [--mean_params _DATA/data/mano_mean_params.npz]

Then: tools/make_priors.py --hamer /ckpt/hamer. The discriminator, the smplx MANO buffers and
Lightning's other entries are skipped and listed; keys that do not fit are all listed at once.
Format: dd_jax/models/hamer_weights.py. Custom sizes: --variant custom --custom '{"backbone": {...}}'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dd_jax import params as params_lib
from dd_jax.convert import hamer
from dd_jax.models import hamer as hamer_model
from dd_jax.models import hamer_weights


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("checkpoint", help="HaMeR's Lightning .ckpt")
  parser.add_argument("out_dir", help="folder to write (hamer.json + params/*.npy)")
  parser.add_argument("--mean_params", default=None,
                      help="mano_mean_params.npz: fills mean parameters a checkpoint lacks")
  parser.add_argument("--variant", default="hamer_vith", help=f"{sorted(hamer_model.VARIANTS)} "
                      "or custom")
  parser.add_argument("--custom", default="", help="JSON size overrides for --variant custom")
  args = parser.parse_args(argv)

  start = time.time()
  try:
    config = hamer_model.get_config(args.variant,
                                    **(json.loads(args.custom) if args.custom else {}))
    config, params, notes = hamer.convert(args.checkpoint, config,
                                          mean_params_path=args.mean_params)
  except (hamer.ConversionError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.checkpoint}: HaMeR {hamer_model.variant_name(config)}, "
        f"{params_lib.count_params(params):,} values")
  for note in notes:
    print(f"note: {note}")
  hamer_weights.save_converted(args.out_dir, config, params, source=args.checkpoint, notes=notes)
  print(f"wrote {args.out_dir} in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
