r"""Makes the HaMeR prior file of every frame and base of an EgoDorsal folder (or of every image
in a plain folder), with dd_jax's HaMeR: batched, compiled once, sharded over every device of
every process, resumable. docs/hamer.md describes the boxes, the cameras and the file's keys.

  python tools/convert_hamer.py _DATA/hamer_ckpts/checkpoints/hamer.ckpt /ckpt/hamer
  python tools/make_priors.py --data_dir /data/egodorsal --hamer /ckpt/hamer \
      --mano _DATA/data/mano/MANO_RIGHT.pkl [--boxes boxes.json] [--per_device_batch 32]

Existing prior files are kept (a rerun resumes; --overwrite redoes them). Unreadable images are
named, skipped and listed at the end and in <data_dir>/make_priors_report.json. Exit status 0
when every image got a prior, 3 when some were skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dd_jax import logs, parallel
from dd_jax.logs import log


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True,
                      help="EgoDorsal folder (frames.json, bases.json) or a folder of images")
  parser.add_argument("--hamer", required=True,
                      help="converted HaMeR folder (tools/convert_hamer.py) or HaMeR's .ckpt")
  parser.add_argument("--mano", required=True,
                      help="MANO_RIGHT.pkl (the file HaMeR uses), or 'synthetic' for the "
                           "synthetic MANO-format hand (tests, demos)")
  parser.add_argument("--boxes", default=None,
                      help="hand boxes JSON {image path: {box: [x0,y0,x1,y1], is_right}} "
                           "(default: <data_dir>/boxes.json when present)")
  parser.add_argument("--variant", default="hamer_vith", help="sizes of a .ckpt given to --hamer")
  parser.add_argument("--custom", default="",
                      help="JSON of size overrides for --variant custom, e.g. "
                           "'{\"backbone\": {\"depth\": 2}}'")
  parser.add_argument("--rescale_factor", type=float, default=2.0,
                      help="box padding (HaMeR's demo: 2.0)")
  parser.add_argument("--hand", choices=("right", "left"), default="right",
                      help="hand side of whole-image boxes")
  parser.add_argument("--fx", type=float, default=5000.0,
                      help="K[0,0] for images without intrinsics (plain folders)")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--workers", type=int, default=4, help="image-loading threads per process")
  parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
  parser.add_argument("--fsdp", action="store_true", help="shard the parameters too")
  parser.add_argument("--attention", default=None,
                      help="jax.nn.dot_product_attention implementation (e.g. cudnn)")
  parser.add_argument("--overwrite", action="store_true", help="redo existing prior files")
  parser.add_argument("--report", default=None,
                      help="report JSON (default <data_dir>/make_priors_report.json)")
  parser.add_argument("--progress_every_s", type=float, default=10.0)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
  parser.add_argument("--heartbeat_timeout_s", type=int, default=100)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logs.setup_console()
  parallel.join_processes(args.coordinator_address, args.num_processes, args.process_id,
                          args.distributed, args.heartbeat_timeout_s)
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax.convert import hamer as convert_hamer  # pylint: disable=import-outside-toplevel
  from dd_jax.mano import io as mano_io  # pylint: disable=import-outside-toplevel
  from dd_jax.priors import job, predictor  # pylint: disable=import-outside-toplevel
  from dd_jax.synthetic import hand as mano_synthetic  # pylint: disable=import-outside-toplevel

  first = jax.process_index() == 0
  try:
    mano = (mano_synthetic.synthetic_mano_model() if args.mano == "synthetic"
            else mano_io.load_mano(args.mano))
    hamer, notes = predictor.HamerPredictor.from_weights(
        args.hamer, mano, parallel.make_mesh(), variant=args.variant,
        custom=json.loads(args.custom) if args.custom else None, dtype=args.dtype,
        fsdp=args.fsdp, attention_implementation=args.attention)
  except (convert_hamer.ConversionError, ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if first:
    for note in notes:
      log.info("note: %s", note)
  options = job.Options(rescale_factor=args.rescale_factor, default_is_right=args.hand == "right",
                        overwrite=args.overwrite, per_device_batch=args.per_device_batch,
                        workers=args.workers, progress_every_s=args.progress_every_s)
  try:
    report = job.run(args.data_dir, hamer, options, boxes_path=args.boxes, default_fx=args.fx,
                     log=log.info)
  except (ValueError, FileNotFoundError) as e:  # bad metadata or boxes JSON: nothing was run
    print(f"error: {e}", file=sys.stderr)
    return 1
  if first:
    path = args.report or os.path.join(args.data_dir, job.REPORT_FILE)
    job.write_report(path, report)
    sources = ", ".join(f"{k} {v}" for k, v in report.by_source.items())
    log.info("wrote %d priors (%s), %d already there, %d skipped, in %.1f s; report %s",
             report.written, sources, report.skipped_existing, len(report.failed),
             report.seconds, path)
    if report.failed:
      log.info("images skipped (%d):\n  %s", len(report.failed), "\n  ".join(report.failed))
  return 3 if report.failed else 0


if __name__ == "__main__":
  sys.exit(main())
