"""Every loader on every crafted file (tests/hostile_files.py), in subprocesses: each run ends
with the file loaded or refused by name (no crash, no other exception), creates no marker file,
and grows resident memory by less than the documented bound (twice the file's size plus the cap,
docs/security.md); each refusal rule gives its own reason."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import hostile_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tools", "probe_loaders.py")
SLACK = 8 << 20  # interpreter noise (allocator arenas, caches) in a measured run


def run_probe(jobs, folder, cap=hostile_files.CAP):
  """Results of tools/probe_loaders.py on `jobs`; a crashed process is recorded against the file
  it was reading and the rest of the jobs run in a new process."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             DD_JAX_MAX_ARRAY_BYTES=str(cap))
  results, left = [], list(jobs)
  while left:
    jobs_file = os.path.join(folder, "jobs.json")
    with open(jobs_file, "w", encoding="utf-8") as f:
      json.dump(left, f)
    done = subprocess.run([sys.executable, PROBE, jobs_file], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, check=False)
    started = None
    for line in done.stdout.splitlines():
      record = json.loads(line)
      if "ready" in record:
        continue
      if "start" in record:
        started = record["start"]
      else:
        results.append(record)
        started = None
    if done.returncode == 0 and started is None:
      break
    if started is None:  # died before any job: report the whole batch
      raise AssertionError(f"probe failed (exit {done.returncode}): {done.stderr[-3000:]}")
    results.append({"loader": started[0], "path": started[1], "outcome": "crashed",
                    "error": f"exit status {done.returncode}", "message": done.stderr[-2000:],
                    "rss_growth": 0})
    left = left[left.index(started) + 1:]
  return results


def check(results, cases, cap=hostile_files.CAP):
  """Problems in `results` (an empty list when every rule held)."""
  by_path = {c.path: c for c in cases}
  problems = []
  for r in results:
    case, where = by_path[r["path"]], f"{r['loader']} on {os.path.basename(r['path'])}"
    if r["outcome"] in ("crashed", "escaped"):
      problems.append(f"{where}: {r['outcome']} ({r['error']}): {r['message'][-600:]}")
      continue
    if r["outcome"] == "refused" and case.name not in r["message"]:
      problems.append(f"{where}: the refusal does not name the file: {r['message'][:300]}")
    bound = cap + 2 * os.path.getsize(r["path"]) + SLACK
    if r["rss_growth"] >= bound:
      problems.append(f"{where}: resident memory grew by {r['rss_growth']:,} bytes (bound "
                      f"{bound:,})")
    expected = case.expect.get(r["loader"])
    if expected == "" and r["outcome"] != "loaded":
      problems.append(f"{where}: should load, got {r['error']}: {r['message'][:300]}")
    elif expected and not (r["outcome"] == "refused" and re.search(expected, r["message"])):
      problems.append(f"{where}: expected a refusal matching {expected!r}, got "
                      f"{r['outcome']}: {r['message'][:300]}")
  return problems


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hostile")
  markers = folder / "markers"
  markers.mkdir()
  return folder, markers, hostile_files.make_corpus(str(folder / "files"), str(markers))


def test_every_loader_on_every_crafted_file(corpus):
  folder, markers, cases = corpus
  jobs = [[loader, case.path] for case in cases for loader in hostile_files.LOADERS]
  results = run_probe(jobs, str(folder))
  assert len(results) == len(jobs)
  refused = sum(r["outcome"] == "refused" for r in results)
  peak = max(r["rss_growth"] for r in results)
  print(f"{len(cases)} crafted files x {len(hostile_files.LOADERS)} loaders = {len(jobs)} runs: "
        f"{refused} refused, {len(jobs) - refused} loaded; peak RSS growth {peak / 2**20:.1f} MiB")
  problems = check(results, cases)
  assert not os.listdir(markers), f"code ran: {os.listdir(markers)}"
  assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


# ------------------------------------------------------------------ fuzzing

def _fuzz_tool():
  spec = importlib.util.spec_from_file_location(
      "fuzz_loaders", os.path.join(ROOT, "tools", "fuzz_loaders.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory):
  """Seed files from the real writers: np.save, torch.save(state_dict()), the MANO writer."""
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax.synthetic import hand as synthetic  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("fuzz_seeds")
  torch.manual_seed(0)
  module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
  torch.save(module.state_dict(), folder / "state_dict.pth")
  synthetic.write_synthetic_mano(folder / "mano_official.pkl", layout="official")
  return folder, _fuzz_tool().default_seeds(str(folder)) + [
      str(folder / "state_dict.pth"), str(folder / "mano_official.pkl")]


def _fuzz(seed_files, cases, seed, work):
  report = _fuzz_tool().fuzz(cases, seed, seed_files, str(work))
  print(f"fuzz: {report['cases']} mutated files, {report['runs']} reader runs: "
        f"{report['outcomes']}")
  assert report["cases"] == cases and not report["problems"], report["problems"][:20]
  assert report["outcomes"].get("refused", 0) and report["outcomes"].get("loaded", 0)


def test_fuzz_quick(fuzz_seeds, tmp_path):
  _fuzz(fuzz_seeds[1], 300, 1, tmp_path)


@pytest.mark.slow
def test_fuzz_thousands_with_a_lightning_checkpoint(fuzz_seeds, tmp_path):
  import original_modules  # pylint: disable=import-outside-toplevel
  ckpt = fuzz_seeds[0] / "force.ckpt"
  original_modules.force_checkpoint(ckpt)
  _fuzz(fuzz_seeds[1] + [str(ckpt)], 3000, 2, tmp_path)
