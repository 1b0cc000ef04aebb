r"""Converts DINOv3 weights (Meta .pth, or Hugging Face safetensors file/folder) for dd_jax.

  python tools/convert_dinov3.py dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth /ckpt/vitl16
  python tools/convert_dinov3.py /hf/dinov3-vitl16-pretrain-lvd1689m /ckpt/vitl16 --variant vitl16

Then train with --config.model.backbone.weights=/ckpt/vitl16. No torch needed; the variant is
detected from the shapes (--variant insists on one). The file is read and written one array at a
time (host memory: a few arrays, docs/weights.md). Format: dd_jax/models/dinov3_weights.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from dd_jax.convert import dinov3


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("input", help="Meta .pth, .safetensors file, or HF model folder")
  parser.add_argument("out_dir", help="folder to write (dinov3.json + params/*.npy)")
  parser.add_argument("--variant", default=None,
                      help="insist on this variant (e.g. dinov3_vitl16 or vitl16)")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="heads of a custom-size model whose file cannot tell them")
  args = parser.parse_args(argv)

  start = time.time()
  try:
    result = dinov3.convert_to_folder(args.input, args.out_dir, args.variant,
                                      num_heads=args.num_heads)
  except (dinov3.ConversionError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.input}: {result.layout} layout, variant {result.variant} ({result.config}), "
        f"{result.num_params:,} parameters")
  for note in result.notes:
    print(f"note: {note}")
  print(f"wrote {args.out_dir} in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
