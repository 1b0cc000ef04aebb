r"""Writes the synthetic MANO-format hand (dd_jax.synthetic.hand) for tests, demos and smplx.

  python tools/make_synthetic_mano.py --out_dir /tmp/synthetic_mano
  python tools/make_synthetic_mano.py --out_dir /tmp/smplx_models --layouts cleaned \
      --name MANO_RIGHT.pkl   # a folder smplx.MANO(model_path=...) reads

Layouts: 'official' (the licence-gated file's Python-2 pickle with chumpy/scipy objects, written
without chumpy or scipy), 'cleaned' (plain numpy pickle) and 'npz'. The files are named
SYNTHETIC_MANO_RIGHT* unless --name is given; the hand is NOT MANO.
"""

from __future__ import annotations

import argparse
import os
import sys

from dd_jax.synthetic import hand as synthetic


def main(argv: list[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--layouts", default="official,cleaned,npz",
                      help="comma-separated subset of official, cleaned, npz")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--name", default="", help="file name (only with a single layout)")
  args = parser.parse_args(argv)
  layouts = [layout for layout in args.layouts.split(",") if layout]
  unknown = sorted(set(layouts) - set(synthetic.SYNTHETIC_FILENAMES))
  if unknown:
    parser.error(f"unknown layout(s) {unknown}; choose from {sorted(synthetic.SYNTHETIC_FILENAMES)}")
  if args.name and len(layouts) != 1:
    parser.error("--name needs exactly one layout")
  os.makedirs(args.out_dir, exist_ok=True)
  written = []
  for layout in layouts:
    path = os.path.join(args.out_dir, args.name or synthetic.SYNTHETIC_FILENAMES[layout])
    written.append(synthetic.write_synthetic_mano(path, layout=layout, seed=args.seed))
    print(f"wrote {written[-1]} ({layout})")
  return written


if __name__ == "__main__":
  main(sys.argv[1:])
