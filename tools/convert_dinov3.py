r"""Converts DINOv3 weights (Meta .pth, or Hugging Face safetensors file/folder) for dd_jax.

  python tools/convert_dinov3.py dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth /ckpt/vitl16
  python tools/convert_dinov3.py /hf/dinov3-vitl16-pretrain-lvd1689m /ckpt/vitl16 --variant vitl16

Then train with --config.model.backbone.weights=/ckpt/vitl16. No torch needed; the variant is
detected from the shapes (--variant insists on one). Format: dd_jax/convert/dinov3.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from dd_jax import params as params_lib
from dd_jax.convert import dinov3
from dd_jax.models import dinov3_weights


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("input", help="Meta .pth, .safetensors file, or HF model folder")
  parser.add_argument("out_dir", help="folder to write (dinov3.json + Orbax params/)")
  parser.add_argument("--variant", default=None,
                      help="insist on this variant (e.g. dinov3_vitl16 or vitl16)")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="heads of a custom-size model whose file cannot tell them")
  args = parser.parse_args(argv)

  start = time.time()
  try:
    result = dinov3.convert_with_report(args.input, args.variant, num_heads=args.num_heads)
  except (dinov3.ConversionError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  num_params = params_lib.count_params(result.params)
  print(f"{args.input}: {result.layout} layout, variant {result.variant} ({result.config}), "
        f"{num_params:,} parameters")
  for note in result.notes:
    print(f"note: {note}")
  dinov3_weights.save_converted(args.out_dir, result.config, result.params, source=args.input,
                                notes=result.notes)
  print(f"wrote {args.out_dir} in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
