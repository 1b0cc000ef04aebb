"""The paper's analysis of a run folder or a LOSO folder: report.md, one CSV per table, PNG figures.

A LOSO folder (tools/loso.py's output) is the union of its folds' test frames, one participant
per fold; a run folder holds the participants of its test split. Fields a test-output file lacks
(older runs, the original's files) are filled in from the dataset named in the run's config.json.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from dd_jax import safe_pickle
from dd_jax.analysis import fields, figures, force_tables, tables, visibility
from dd_jax.mano import io as mano_io
from dd_jax.mano.model import DELTADORSAL_TIP_IDS

DOCS = "docs/report.md"


@dataclasses.dataclass
class Sources:
  """Where missing per-frame fields come from; empty values fall back to each run's config.json."""
  data_dir: str = ""
  mano_path: str | None = None
  face_labels: str = ""


def run_folders(path: str) -> list[str]:
  """The fold_* folders of a LOSO folder, or [path] for a run folder."""
  folds = sorted(d for d in glob.glob(os.path.join(path, "fold_*")) if os.path.isdir(d))
  return folds or [path]


def test_outputs_file(run_dir: str) -> str:
  """The newest test_outputs_epoch*.npy of a run (or of its eval/ re-test)."""
  candidates = glob.glob(os.path.join(run_dir, "test_outputs_epoch*.npy"))
  candidates += glob.glob(os.path.join(run_dir, "eval", "test_outputs_epoch*.npy"))
  if not candidates:
    raise FileNotFoundError(f"{run_dir}: no test_outputs_epoch*.npy (run the test phase first: "
                            "--config.train=False --config.ckpt_path=RUN)")
  return max(candidates, key=os.path.getmtime)


def load_record(path: str) -> dict[str, np.ndarray]:
  record = safe_pickle.load_npy(path)
  if not isinstance(record, dict) or "frame_id" not in record:
    raise ValueError(f"{path}: expected the pickled dict of a test phase (with 'frame_id')")
  record = {k: np.asarray(v) for k, v in record.items()}
  record["frame_id"] = record["frame_id"].reshape(-1)
  return record


def _config(run_dir: str) -> dict[str, Any]:
  for folder in (run_dir, os.path.join(run_dir, "eval")):
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return json.load(f)
  return {}


def _needs(record: dict[str, np.ndarray]) -> list[str]:
  wanted = list(fields.METADATA_FIELDS)
  if "pred_kp_3d" in record:
    wanted += list(fields.POSE_FIELDS)
  return [k for k in wanted if k not in record]


def collect(path: str, sources: Sources) -> tuple[dict[str, np.ndarray], list[str], str]:
  """All test frames under `path` with the analysis fields -> (record, notes, data_dir)."""
  records, notes, data_dir = [], [], ""
  hands: dict[tuple, tuple] = {}  # (mano path, tip ids) -> (model, face labels)
  folders = run_folders(path)
  for run_dir in folders:
    try:
      outputs = test_outputs_file(run_dir)
    except FileNotFoundError:
      if len(folders) == 1:
        raise
      notes.append(f"{run_dir}: no test outputs yet (an unfinished fold), left out")
      continue
    record = load_record(outputs)
    config = _config(run_dir)
    data_dir = sources.data_dir or config.get("data", {}).get("data_dir", "")
    missing = _needs(record)
    if missing:
      if not data_dir or not os.path.isdir(data_dir):
        notes.append(f"{outputs}: lacks {', '.join(missing)} and the dataset "
                     f"({data_dir or 'none'}) is not there to compute them: pass --data_dir")
      else:
        model = labels = None
        if "finger_visibility" in missing:
          mano = config.get("mano", {})
          key = (sources.mano_path if sources.mano_path is not None else mano.get("path", ""),
                 tuple(mano.get("tip_ids", DELTADORSAL_TIP_IDS)))
          if key not in hands:
            model = mano_io.load_mano_or_synthetic(key[0], tip_ids=key[1])
            hands[key] = model, face_labels_for(model, sources.face_labels, notes)
          model, labels = hands[key]
        record, problems = fields.add_fields(record, data_dir, model, labels)
        notes.append(f"{outputs}: computed {', '.join(missing)} from {data_dir}")
        notes += [f"  visibility skipped: {p}" for p in problems[:20]]
    records.append(record)
  if not records:
    raise FileNotFoundError(f"{path}: no fold has test outputs yet")
  common = set.intersection(*(set(r) for r in records))
  dropped = set.union(*(set(r) for r in records)) - common
  if dropped:
    notes.append(f"fields not in every fold, left out: {', '.join(sorted(dropped))}")
  merged = {k: np.concatenate([r[k] for r in records]) for k in sorted(common)}
  return merged, notes, data_dir


def face_labels_for(model, path: str, notes: list[str]) -> np.ndarray:
  if path:
    return visibility.load_face_labels(path, num_faces=len(model.faces))
  notes.append("face labels generated from the MANO model's skinning weights (no --face_labels)")
  return visibility.generate_face_labels(model)


def participant_metadata(data_dir: str, folder: str) -> dict[int, dict[str, Any]]:
  """Per-participant fields from bases.json (anything beside p_id and bases) and from a
  participants.json ({"participants": [{"p_id": 1, "skin_tone": 3}, ...]}) in the dataset or
  the analysed folder."""
  out: dict[int, dict[str, Any]] = {}

  def take(entries):
    for entry in entries or []:
      if isinstance(entry, dict) and isinstance(entry.get("p_id"), int):
        extra = {k: v for k, v in entry.items() if k not in ("p_id", "bases")
                 and isinstance(v, (str, int, float))}
        out.setdefault(entry["p_id"], {}).update(extra)

  paths = [os.path.join(data_dir, name) for name in ("bases.json", "participants.json")
           if data_dir] + [os.path.join(folder, "participants.json")]
  for path in paths:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        value = json.load(f)
      take(value.get("participants") if isinstance(value, dict) else value)
  return out


def _section(lines: list[str], out_dir: str, table: tables.Table) -> None:
  with open(os.path.join(out_dir, f"{table.name}.csv"), "w", encoding="utf-8") as f:
    f.write(table.csv())
  lines += [f"### {table.title}", "", table.markdown(), "", f"CSV: `{table.name}.csv`"]
  if table.note:
    lines += ["", table.note]
  lines.append("")


def write_report(path: str, out_dir: str | None = None, sources: Sources | None = None) -> str:
  """Writes report.md, the CSVs and the PNGs into out_dir (default: path/report); returns
  report.md's path."""
  sources = sources or Sources()
  out_dir = out_dir or os.path.join(path, "report")
  os.makedirs(out_dir, exist_ok=True)
  record, notes, data_dir = collect(path, sources)
  participants = sorted(set(np.asarray(record["p_id"]).tolist()))
  folds = run_folders(path)
  baseline = ("\"vs prior\" is the improvement over the HaMeR prior (positive = better)"
              if "pred_kp_3d" in record else "the baseline is always predicting the most "
              "frequent true class")
  lines = [f"# DeltaDorsal analysis of `{path}`", "",
           f"{len(record['frame_id'])} test frames of {len(participants)} participant(s) "
           f"({', '.join(map(str, participants))}) from "
           f"{f'{len(folds)} LOSO folds' if len(folds) > 1 else 'one run'}. Every number is "
           f"computed per participant, then given as mean ± SD across participants; {baseline}. "
           f"Definitions: `{DOCS}`.", ""]
  if notes:
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
  metadata = participant_metadata(data_dir, path)
  if "pred_kp_3d" in record:
    _pose_sections(lines, out_dir, record, metadata)
  if "pred_tap_labels" in record:
    _force_sections(lines, out_dir, record)
  report = os.path.join(out_dir, "report.md")
  with open(report, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return report


def _pose_sections(lines, out_dir, record, metadata) -> None:
  frames = tables.PoseFrames.from_record(record)
  lines += ["## 1. Per joint", ""]
  _section(lines, out_dir, tables.per_joint_table(frames))
  lines += ["## 2. Per gesture and hand position", ""]
  _section(lines, out_dir, tables.per_group_table(frames, "motion_type", "motion type"))
  _section(lines, out_dir, tables.per_group_table(frames, "hand_position", "hand position"))
  lines += ["## 3. Finger visibility", ""]
  if frames.visibility is None:
    lines += ["Not available: the test outputs have no finger_visibility (see Notes).", ""]
  else:
    for table in tables.visibility_tables(frames):
      _section(lines, out_dir, table)
    figures.visibility_figure(frames.visibility.reshape(-1),
                              frames.finger_mpjae("model").reshape(-1),
                              frames.finger_mpjae("prior").reshape(-1),
                              os.path.join(out_dir, "mpjae_vs_visibility.png"))
    lines += ["![MPJAE against visibility](mpjae_vs_visibility.png)", ""]
  lines += ["## 4. Self-occluded taps and pinches", ""]
  if frames.visibility is None:
    lines += ["Not available without finger_visibility.", ""]
  else:
    for table in tables.occlusion_tables(frames):
      _section(lines, out_dir, table)
  lines += ["## 6. Per participant", ""]
  for table in tables.participant_tables(frames, metadata):
    _section(lines, out_dir, table)
  lines += ["## 7. PCK", ""]
  table, curves = tables.pck_table(frames)
  _section(lines, out_dir, table)
  figures.pck_figure(curves, os.path.join(out_dir, "pck.png"))
  lines += ["![PCK curves](pck.png)", ""]


def _force_sections(lines, out_dir, record) -> None:
  frames = force_tables.ForceFrames.from_record(record)
  lines += ["## 5. Force", "", "Classes: " + ", ".join(
      f"{k} {v}" for k, v in force_tables.CLASS_NAMES.items()) + ".", ""]
  found, confusions = force_tables.force_tables(frames)
  for table in found[:2]:
    _section(lines, out_dir, table)
  for name, matrix in confusions.items():
    figures.confusion_figure(matrix, os.path.join(out_dir, f"confusion_{name}.png"))
    np.savetxt(os.path.join(out_dir, f"confusion_{name}.csv"), matrix, fmt="%d", delimiter=",")
    lines += [f"Confusion, {name.replace('_', ' ')} (rows true, columns predicted; "
              f"`confusion_{name}.csv`):", "", f"![confusion {name}](confusion_{name}.png)", ""]
  lines += ["## 6. Per participant", ""]
  _section(lines, out_dir, found[2])
