r"""Leave-one-subject-out: one fold per participant, then one table of per-participant and mean
metrics, as the paper reports them.

  python tools/loso.py --config configs/pose.py --workdir runs/loso --participants 1,2,3,4,5,6 \
      [--config.data.data_dir=...] [--evaluate_only]
  python tools/loso.py ... --fold 3     # only the fold testing participant 3 (one array task)
  python tools/loso.py ... --merge      # the table from the finished folds

Fold k tests on participant k, validates on the next one (cyclically) and trains on the rest
(data.leave_one_out). Each fold is a normal run folder under WORKDIR/fold_<p> (an interrupted
one resumes from its checkpoint when run again); a finished fold leaves fold_results.json there
and is never run again (with other settings it is an error: delete the file to rerun it).
--evaluate_only re-tests existing folds (in fold_<p>/eval). Without --fold, every fold runs in
turn and the table follows; --fold runs on a cluster plus --merge give the same table. Writes
WORKDIR/loso_results.json and WORKDIR/loso_table.md (see docs/report.md for SLURM arrays).
"""

import json
import os
import sys

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dd_jax import experiment, launch, logs  # noqa: E402  pylint: disable=g-import-not-at-top
from dd_jax.logs import log  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_list("participants", None, "Participant ids, one fold each.")
flags.DEFINE_bool("evaluate_only", False, "Only test the folds' existing checkpoints.")
flags.DEFINE_integer("fold", None, "Run only the fold that tests this participant.")
flags.DEFINE_bool("merge", False, "Only assemble the table from the finished folds.")

POSE_COLUMNS = ("mpjpe", "pa_mpjpe", "mpjae", "auc", "mpjpe-prior", "pa_mpjpe_prior",
                "mpjae_prior", "auc_prior")
FORCE_COLUMNS = ("acc", "prec_w", "recall_w", "f1_w")
FOLD_RESULTS = "fold_results.json"


def fold_config(config, participants: list[int], test: int, workdir: str, evaluate_only: bool):
  c = config.copy_and_resolve_references()
  val = participants[(participants.index(test) + 1) % len(participants)]
  c.data.leave_one_out = True
  c.data.all_participant_ids = tuple(participants)
  c.data.val_participants = (val,)
  c.data.test_participants = (test,)
  c.wandb.group = c.wandb.group or os.path.basename(os.path.dirname(os.path.abspath(workdir)))
  if evaluate_only:
    c.train, c.test, c.ckpt_path = False, True, workdir
  return c


def fold_folder(root: str, participant: int, evaluate_only: bool) -> str:
  folder = os.path.join(root, f"fold_{participant}")
  return os.path.join(folder, "eval") if evaluate_only else folder


def run_fold(config, participants: list[int], participant: int, root: str,
             evaluate_only: bool) -> dict[str, float]:
  """Runs (or resumes) one fold unless it finished before; returns its test metrics."""
  workdir = os.path.join(root, f"fold_{participant}")
  c = fold_config(config, participants, participant, workdir, evaluate_only)
  out = fold_folder(root, participant, evaluate_only)
  done = os.path.join(out, FOLD_RESULTS)
  settings = json.loads(c.to_json_best_effort())  # as given: the run fills in derived fields
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      finished = json.load(f)
    if finished["config"] != settings:
      changed = sorted(_differences(finished["config"], settings))
      raise ValueError(f"{out} finished with other settings ({', '.join(changed[:8])}); delete "
                       f"{done} to run it again, or use another --workdir")
    log.info("fold %d finished earlier (%s): not run again", participant, done)
    return finished["test"]
  results = experiment.train_and_evaluate(c, out)
  test = {k.split("/", 1)[1]: float(v) for k, v in results.items() if k.startswith("test/")}
  if jax.process_index() == 0:
    tmp = done + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"participant": participant, "test": test, "config": settings}, f, indent=2)
    os.replace(tmp, done)
  return test


def _differences(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in set(a) | set(b):
      yield from _differences(a.get(key), b.get(key), f"{prefix}{key}.")
  elif a != b:
    yield prefix.rstrip(".")


def table(rows: dict[int, dict[str, float]], columns) -> tuple[str, dict]:
  """Markdown table: one row per participant, the mean over participants, all frames pooled."""
  participants = sorted(rows)
  mean = {c: sum(rows[p][c] for p in participants) / len(participants) for c in columns}
  counts = {p: rows[p]["count"] for p in participants}
  total = sum(counts.values())
  pooled = {c: sum(rows[p][c] * counts[p] for p in participants) / max(total, 1) for c in columns}
  lines = ["| participant | frames | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 2) + "|"]
  for p in participants:
    lines.append(f"| {p} | {int(counts[p])} | " + " | ".join(f"{rows[p][c]:.3f}" for c in columns) + " |")
  lines.append("| mean | | " + " | ".join(f"{mean[c]:.3f}" for c in columns) + " |")
  lines.append(f"| all frames | {int(total)} | " + " | ".join(f"{pooled[c]:.3f}" for c in columns) + " |")
  return "\n".join(lines), {"per_participant": rows, "mean": mean, "all_frames": pooled}


def merge(root: str, participants: list[int], evaluate_only: bool, columns) -> str:
  """The table from every fold's fold_results.json; names the folds that have not finished."""
  rows, missing = {}, []
  for p in participants:
    path = os.path.join(fold_folder(root, p, evaluate_only), FOLD_RESULTS)
    if not os.path.exists(path):
      missing.append(p)
      continue
    with open(path, encoding="utf-8") as f:
      rows[p] = json.load(f)["test"]
  if missing:
    raise app.UsageError(f"folds not finished yet (no {FOLD_RESULTS}): participants {missing}; "
                         f"run them with --fold P")
  markdown, summary = table(rows, columns)
  with open(os.path.join(root, "loso_table.md"), "w", encoding="utf-8") as f:
    f.write(markdown + "\n")
  with open(os.path.join(root, "loso_results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return markdown


def main(argv):
  del argv
  logs.setup_console()
  launch.initialize_distributed()
  config, root = launch.FLAGS.config, launch.FLAGS.workdir
  if not root or not flags.FLAGS.participants:
    raise app.UsageError("--workdir and --participants are required")
  participants = [int(p) for p in flags.FLAGS.participants]
  columns = POSE_COLUMNS if config.task == "pose" else FORCE_COLUMNS
  evaluate_only, fold = flags.FLAGS.evaluate_only, flags.FLAGS.fold
  if fold is not None and flags.FLAGS.merge:
    raise app.UsageError("--fold runs one fold, --merge assembles the table: one at a time")
  if fold is not None and fold not in participants:
    raise app.UsageError(f"--fold {fold} is not one of --participants {participants}")
  if fold is not None:
    run_fold(config, participants, fold, root, evaluate_only)
    return
  if not flags.FLAGS.merge:
    for p in participants:
      run_fold(config, participants, p, root, evaluate_only)
  if jax.process_index() == 0:
    print(merge(root, participants, evaluate_only, columns))


if __name__ == "__main__":
  launch.flags.mark_flags_as_required(["config"])
  app.run(main)
