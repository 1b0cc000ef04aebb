r"""Fuzzes dd_jax's file readers with a seeded byte mutator: no crash, no hang, no stray exception.

  python tools/fuzz_loaders.py --cases 3000 --seed 0 [--seeds DIR] [--json report.json]

Seed files: a HaMeR-like `.npy` dict (np.save), and every .pth / .ckpt / .npy / .pkl in --seeds
(e.g. files written by torch.save or a Lightning Trainer). Each case mutates one seed (bit flips,
byte overwrites with boundary values, insertions, deletions, chunk duplication, truncation; for
zip files also the inner data.pkl, re-zipped, so the pickle itself is exercised past the CRC) and
runs the seed's readers on it in a worker process, which is restarted after a crash and killed
after --timeout seconds without progress (a hang). Every outcome must be "loaded" or a refusal of
the kinds the command-line tools report (ValueError, FileNotFoundError, FrameLoadError).
Prints a table of outcomes and exits 1 on any crash, hang or escaped exception.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READERS = {".npy": ("npy", "hamer"), ".pth": ("torch", "weights"), ".ckpt": ("ckpt",),
           ".pkl": ("mano",)}
BOUNDARY = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
            b"\xff" * 8, b"(", b"R", b"b", b"c", b"\x93", b"\x8e", b"."]


def mutate(data: bytes, rng: random.Random) -> bytes:
  """1-4 random edits of `data`."""
  out = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    kind = rng.randrange(6)
    at = rng.randrange(max(1, len(out)))
    if kind == 0 and out:  # bit flip
      out[at] ^= 1 << rng.randrange(8)
    elif kind == 1:  # boundary value
      value = rng.choice(BOUNDARY)
      out[at:at + len(value)] = value
    elif kind == 2:  # insertion
      out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 3:  # deletion
      del out[at:at + rng.randint(1, 16)]
    elif kind == 4 and out:  # duplicate a chunk
      n = rng.randint(1, 64)
      out[at:at] = out[rng.randrange(len(out)):][:n]
    else:  # truncation
      del out[at:]
  return bytes(out)


def mutate_inner_pickle(data: bytes, rng: random.Random) -> bytes:
  """A zip's */data.pkl mutated and the archive rewritten (valid CRCs)."""
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    entries = [(i, z.read(i.filename)) for i in z.infolist()]
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as z:
    for info, content in entries:
      if info.filename.endswith("data.pkl"):
        content = mutate(content, rng)
      z.writestr(info, content)
  return buffer.getvalue()


def default_seeds(folder: str) -> list[str]:
  """A HaMeR-like .npy dict and a plain numeric .npy, written with numpy."""
  rng = np.random.default_rng(0)
  prior = {"hand_pose": rng.normal(size=(1, 15, 3, 3)), "betas": rng.normal(size=(1, 10)),
           "cam_t": rng.normal(size=(1, 3)), "keypoints_3d": rng.normal(size=(21, 3)),
           "keypoints_2d": rng.normal(size=(21, 2)).astype(np.float32), "score": np.float32(0.9),
           "ids": [1, 2], "name": "frame"}
  paths = [os.path.join(folder, "seed_prior.npy"), os.path.join(folder, "seed_plain.npy")]
  np.save(paths[0], prior, allow_pickle=True)
  np.save(paths[1], rng.normal(size=(3, 4)).astype(np.float32))
  return paths


def run_worker(jobs_file: str, results_file: str, timeout: float) -> tuple[list[dict], str]:
  """Runs tools/probe_loaders.py; returns (records, "ok" | "crash" | "hang")."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  with open(results_file, "w", encoding="utf-8") as out:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "probe_loaders.py"),
                             jobs_file], stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    last_size, last_change = 0, time.time()
    status = "ok"
    while proc.poll() is None:
      time.sleep(0.2)
      size = os.path.getsize(results_file)
      if size != last_size:
        last_size, last_change = size, time.time()
      elif time.time() - last_change > (timeout if size else 600):  # imports may take a while
        proc.kill()
        proc.wait()
        status = "hang"
        break
    if status == "ok" and proc.returncode != 0:
      status = "crash"
  with open(results_file, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return records, status


def fuzz(cases: int, seed: int, seed_files: list[str], work: str, timeout: float = 30.0) -> dict:
  rng = random.Random(seed)
  seeds = [(p, open(p, "rb").read()) for p in seed_files
           if os.path.splitext(p)[1] in READERS]
  jobs = []
  for i in range(cases):
    path, data = seeds[i % len(seeds)]
    ext = os.path.splitext(path)[1]
    inner = data[:2] == b"PK" and rng.random() < 0.7
    try:
      mutated = mutate_inner_pickle(data, rng) if inner else mutate(data, rng)
    except (zipfile.BadZipFile, ValueError):
      mutated = mutate(data, rng)
    case_path = os.path.join(work, f"case{i:05d}{ext}")
    with open(case_path, "wb") as f:
      f.write(mutated)
    jobs += [[reader, case_path] for reader in READERS[ext]]
  outcomes: dict[str, int] = {}
  bad: list[str] = []
  left = jobs
  jobs_file, results_file = os.path.join(work, "jobs.json"), os.path.join(work, "results.jsonl")
  while left:
    with open(jobs_file, "w", encoding="utf-8") as f:
      json.dump(left, f)
    records, status = run_worker(jobs_file, results_file, timeout)
    started = None
    for record in records:
      if "ready" in record:
        continue
      if "start" in record:
        started = record["start"]
        continue
      started = None
      outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
      if record["outcome"] not in ("loaded", "refused"):
        bad.append(f"{record['loader']} on {record['path']}: {record['outcome']} "
                   f"{record['error']}: {record['message'][-300:]}")
    if status == "ok" and started is None:
      break
    if started is None:
      bad.append(f"worker failed to start ({status})")
      break
    outcomes[status] = outcomes.get(status, 0) + 1
    bad.append(f"{started[0]} on {started[1]}: {status}")
    left = left[left.index(started) + 1:]
  return {"cases": cases, "runs": len(jobs), "seed": seed, "outcomes": outcomes, "problems": bad,
          "seed_files": [os.path.basename(p) for p in seed_files]}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeds", default=None, help="folder of extra seed files")
  parser.add_argument("--timeout", type=float, default=30.0, help="seconds without progress")
  parser.add_argument("--json", default=None, help="write the report here")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as work:
    seed_files = default_seeds(work)
    if args.seeds:
      seed_files += sorted(os.path.join(args.seeds, n) for n in os.listdir(args.seeds))
    start = time.time()
    report = fuzz(args.cases, args.seed, seed_files, work, args.timeout)
    report["seconds"] = round(time.time() - start, 1)
  print(f"{report['cases']} mutated files, {report['runs']} reader runs in {report['seconds']} s "
        f"(seed {args.seed}; seeds {', '.join(report['seed_files'])})")
  for outcome, n in sorted(report["outcomes"].items()):
    print(f"  {outcome:8s} {n}")
  for problem in report["problems"][:20]:
    print(f"PROBLEM {problem}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 1 if report["problems"] else 0


if __name__ == "__main__":
  sys.exit(main())
