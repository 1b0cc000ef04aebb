r"""Peak host memory of converting a reduced-depth DINOv3 7B-class .pth: streaming vs in memory.

  python tools/measure_conversion_memory.py /tmp/conv7b --depth 2
  python tools/measure_conversion_memory.py /tmp/conv7b --old-root /path/to/older/dd_jax

Writes a Meta-layout .pth of dinov3_vit7b16's width (torch.save of float32 tensors, as Meta's
7B file holds them) with `--depth` blocks, then converts it in fresh processes and reports each
one's peak RSS growth (VmHWM after the conversion minus the RSS before it; the peak is reset
first) and time: `stream` (tools/convert_dinov3.py's path), `memory` (dinov3.convert + save_converted:
the whole float32 tree in memory), and `old` (`memory` run with another checkout's dd_jax, e.g.
one from before streaming). Prints a table and JSON; deletes what it wrote unless --keep.
Needs torch (to write the file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MIB = 1 << 20

_MEASURE = """
import json, sys, time
from dd_jax.convert import dinov3
from dd_jax.models import dinov3_weights

def status(field):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

mode, path, out = sys.argv[1:]
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # resets VmHWM to the current RSS
start, t = status("VmRSS"), time.time()
if mode == "stream":
  dinov3.convert_to_folder(path, out)
else:
  dinov3_weights.save_converted(out, *dinov3.convert(path))
print(json.dumps({"growth": status("VmHWM") - start, "peak": status("VmHWM"),
                  "seconds": time.time() - t}))
"""


def write_7b_like(path: str, depth: int) -> tuple[int, int]:
  """A Meta-layout state_dict of dinov3_vit7b16's width and `depth` blocks (random float32,
  keys and shapes of SPEC.md §6, plus the training-only keys the released file has) -> (file
  bytes, bytes of the largest float32 entry)."""
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax.convert import dinov3 as convert_dinov3  # pylint: disable=import-outside-toplevel
  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel

  config = dinov3.get_config("dinov3_vit7b16", depth=depth)
  gen = torch.Generator().manual_seed(0)
  state_dict = {}
  largest = 0
  for entry in convert_dinov3._table(config, "meta"):  # pylint: disable=protected-access
    largest = max(largest, 4 * sum(int(torch.Size(shape).numel()) for _, shape, _ in entry.sources))
    for key, shape, _ in entry.sources:
      state_dict[key] = torch.randn(shape, generator=gen) * 0.02
  for key, shape in (("mask_token", (1, config.dim)), ("local_cls_norm.weight", (config.dim,)),
                     ("local_cls_norm.bias", (config.dim,))):
    state_dict[key] = torch.randn(shape, generator=gen)
  torch.save(state_dict, path)
  return os.path.getsize(path), largest


def measure(mode: str, path: str, out: str, root: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  done = subprocess.run([sys.executable, "-c", _MEASURE, "stream" if mode == "stream" else "memory",
                         path, out], capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    raise RuntimeError(f"{mode}: {done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="scratch folder (the .pth and the converted folders)")
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--old-root", default=None,
                      help="another dd_jax checkout: also measure its in-memory conversion")
  parser.add_argument("--modes", default="stream,memory")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  pth = os.path.join(args.workdir, "vit7b_like.pth")
  rows = []
  try:
    file_size, largest = write_7b_like(pth, args.depth)
    bound = 3 * largest + 32 * MIB
    modes = args.modes.split(",") + (["old"] if args.old_root else [])
    for mode in modes:
      out = os.path.join(args.workdir, mode)
      result = measure(mode, pth, out, args.old_root if mode == "old" else ROOT)
      shutil.rmtree(out, ignore_errors=True)
      rows.append(dict(mode=mode, **result))
  finally:
    if not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)
  print(f"dinov3_vit7b16 width, depth {args.depth}: file {file_size / MIB:,.0f} MiB, largest "
        f"float32 entry {largest / MIB:,.0f} MiB, stated bound 3 x largest + 32 MiB = "
        f"{bound / MIB:,.0f} MiB")
  print(f"{'mode':8} {'peak RSS growth MiB':>20} {'peak RSS MiB':>13} {'seconds':>8}")
  for row in rows:
    print(f"{row['mode']:8} {row['growth'] / MIB:>20,.0f} {row['peak'] / MIB:>13,.0f} "
          f"{row['seconds']:>8.1f}")
  print(json.dumps(dict(depth=args.depth, file_bytes=file_size, largest_entry_bytes=largest,
                        bound_bytes=bound, rows=rows)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
