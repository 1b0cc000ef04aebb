"""Runs dd_jax's loaders on files in this process, one JSON line per (loader, file): a way to
check a file before trusting it, and the worker of tests/test_hostile_files.py and
tools/fuzz_loaders.py.

  python tools/probe_loaders.py JOBS.json     (JOBS: [[loader, path], ...])

Each run prints {"start": ...} first (flushed, so a crash names the file), then {"loader", "path",
"outcome": "loaded" | "refused" | "escaped", "error", "message", "rss_growth"}: "refused" is an
error of the kinds the command-line tools catch and report (ValueError and its subclasses,
FileNotFoundError, FrameLoadError); "escaped" is anything else. rss_growth: peak resident memory
during the run minus resident memory before it, in bytes (Linux /proc, peak reset per run).
"""

import json
import sys
import traceback

from dd_jax import inference, safe_pickle
from dd_jax.convert import lightning, torch_file
from dd_jax.data import store
from dd_jax.mano import io as mano_io

LOADERS = {
    "npy": safe_pickle.load_npy,
    "torch": torch_file.read_torch_file,
    "ckpt": lightning.read_lightning_state_dict,
    "mano": mano_io.read_mano_arrays,
    "hamer": inference.read_prior,  # what `python -m dd_jax.predict --hamer FILE` runs
    "weights": torch_file.read_weights,  # tools/convert_dinov3.py's reader (.pth, safetensors)
}
CLEAN = (ValueError, FileNotFoundError, store.FrameLoadError)


def _status_kib(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"no {field} in /proc/self/status")


def main(jobs_file: str) -> int:
  with open(jobs_file, encoding="utf-8") as f:
    jobs = json.load(f)
  print(json.dumps({"ready": len(jobs)}), flush=True)
  for loader, path in jobs:
    print(json.dumps({"start": [loader, path]}), flush=True)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")  # resets the peak RSS (VmHWM)
    before = _status_kib("VmRSS")
    record = {"loader": loader, "path": path, "outcome": "loaded", "error": "", "message": ""}
    try:
      LOADERS[loader](path)
    except CLEAN as e:
      record.update(outcome="refused", error=type(e).__name__, message=str(e))
    except BaseException as e:  # pylint: disable=broad-except
      record.update(outcome="escaped", error=type(e).__name__,
                    message=traceback.format_exc(limit=4)[-3000:])
    record["rss_growth"] = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps(record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
