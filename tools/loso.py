r"""Leave-one-subject-out: one fold per participant, then one table of per-participant and mean
metrics, as the paper reports them.

  python tools/loso.py --config configs/pose.py --workdir runs/loso --participants 1,2,3,4,5,6 \
      [--config.data.data_dir=...] [--evaluate_only]

Fold k tests on participant k, validates on the next one (cyclically) and trains on the rest
(data.leave_one_out). Each fold is a normal run folder under WORKDIR/fold_<p>; --evaluate_only
re-tests existing folds. Writes WORKDIR/loso_results.json and WORKDIR/loso_table.md.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dd_jax import experiment, launch, logs  # noqa: E402  pylint: disable=g-import-not-at-top

flags.DEFINE_list("participants", None, "Participant ids, one fold each.")
flags.DEFINE_bool("evaluate_only", False, "Only test the folds' existing checkpoints.")

POSE_COLUMNS = ("mpjpe", "pa_mpjpe", "mpjae", "auc", "mpjpe-prior", "pa_mpjpe_prior",
                "mpjae_prior", "auc_prior")
FORCE_COLUMNS = ("acc", "prec_w", "recall_w", "f1_w")


def fold_config(config, participants: list[int], test: int, workdir: str, evaluate_only: bool):
  c = config.copy_and_resolve_references()
  val = participants[(participants.index(test) + 1) % len(participants)]
  c.data.leave_one_out = True
  c.data.all_participant_ids = tuple(participants)
  c.data.val_participants = (val,)
  c.data.test_participants = (test,)
  if evaluate_only:
    c.train, c.test, c.ckpt_path = False, True, workdir
  return c


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


def main(argv):
  del argv
  logs.setup_console()
  config, root = launch.FLAGS.config, launch.FLAGS.workdir
  if not root or not flags.FLAGS.participants:
    raise app.UsageError("--workdir and --participants are required")
  participants = [int(p) for p in flags.FLAGS.participants]
  columns = POSE_COLUMNS if config.task == "pose" else FORCE_COLUMNS
  rows = {}
  for p in participants:
    workdir = os.path.join(root, f"fold_{p}")
    c = fold_config(config, participants, p, workdir, flags.FLAGS.evaluate_only)
    results = experiment.train_and_evaluate(c, workdir if not flags.FLAGS.evaluate_only
                                         else os.path.join(workdir, "eval"))
    rows[p] = {k.split("/", 1)[1]: float(v) for k, v in results.items() if k.startswith("test/")}
  markdown, summary = table(rows, columns)
  with open(os.path.join(root, "loso_table.md"), "w", encoding="utf-8") as f:
    f.write(markdown + "\n")
  with open(os.path.join(root, "loso_results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(markdown)


if __name__ == "__main__":
  launch.flags.mark_flags_as_required(["config"])
  app.run(main)
