"""The pre-training check of an EgoDorsal dataset: every referenced file and field, one report.

JSON and file existence only (content errors are caught when a frame is loaded). Each directory
is listed once with os.scandir, so 170k frames take seconds. All problems are collected and
raised together in one DatasetFormatError, each naming its frame and path.
"""

from __future__ import annotations

import collections
import os
import time

from absl import logging

from dd_jax.data import egodorsal
from dd_jax.data.egodorsal import MOTION_LABELS, DatasetFormatError, Frame
from dd_jax.data.splits import leave_one_out_problems, resolve_split, run_splits


class _Listing:
  """Directory contents, each directory listed (and resolved) once."""

  def __init__(self):
    self._dirs: dict[str, dict[str, bool] | None] = {}  # name -> is a symlink
    self._real: dict[str, str] = {}

  def exists(self, path: str) -> bool:
    directory, name = os.path.split(path)
    if directory not in self._dirs:
      try:
        with os.scandir(directory) as entries:
          self._dirs[directory] = {e.name: e.is_symlink() for e in entries}
      except OSError:
        self._dirs[directory] = None
    names = self._dirs[directory]
    return names is not None and name in names

  def real(self, path: str) -> str:
    """An existing path with every symlink resolved (realpath only for a symlink leaf)."""
    directory, name = os.path.split(path)
    if directory not in self._real:
      self._real[directory] = os.path.realpath(directory)
    if self._dirs[directory][name]:
      return os.path.realpath(path)
    return os.path.join(self._real[directory], name)


def validate_dataset(data_config, task: str = "pose", splits: list[str] | None = None) -> str:
  """Checks the metadata and files the run will read; returns a one-line summary.

  Raises DatasetFormatError listing every problem (frame ids and paths) when there is any.
  `splits` defaults to the run's data.train_split, val_split and test_split.
  """
  start = time.perf_counter()
  root = os.path.abspath(data_config.data_dir)
  fmt = data_config.format
  precropped = bool(data_config.precropped)
  problems: list[str] = []
  if not os.path.isdir(root):
    raise DatasetFormatError(f"EgoDorsal dataset {root}", [f"{root}: no such directory"])
  index = egodorsal.load_index(root, problems)
  problems += leave_one_out_problems(data_config, index)

  selected: dict[str, list[Frame]] = {}
  for split in splits or run_splits(data_config):
    split_name, participants = resolve_split(data_config, split, index)
    before = len(problems)
    frames = egodorsal.select_frames(index, split_name, participants,
                                     float(data_config.sample_ratio), problems)
    if not frames and len(problems) == before:
      problems.append(f"split '{split}': selects no frame")
    counts = collections.Counter(f.frame_id for f in frames)
    problems += [f"split '{split}': frame {fid} appears {n} times" for fid, n in counts.items() if n > 1]
    selected[split] = frames

  frames = list({f.frame_id: f for fs in selected.values() for f in fs}.values())
  problems += _frame_problems(index, frames, task, precropped)
  skipped = []
  if fmt == "folder":
    not_found, escaping = _file_problems(index, frames, task, precropped,
                                         bool(data_config.allow_symlinks_outside_root))
    problems += escaping
    if data_config.skip_bad_frames:  # their frames are skipped and reported when read
      skipped = not_found
    else:
      problems += not_found
  elif fmt == "array_record":
    from dd_jax.data import array_record  # pylint: disable=g-import-not-at-top
    problems += array_record.packed_problems(root, frames, task, precropped)
  else:
    problems.append(f"data.format must be 'folder' or 'array_record', got {fmt!r}")
  egodorsal.check(f"EgoDorsal dataset {root} (task {task}, "
                  f"{'precropped' if precropped else 'online alignment'}, format {fmt})", problems)
  if skipped:
    logging.warning("EgoDorsal dataset %s: %d referenced file(s) missing; their frames will be "
                    "skipped (data.skip_bad_frames=True):\n%s", root, len(skipped),
                    "\n".join(f"  - {p}" for p in skipped))
  sizes = ", ".join(f"{k} {len(v)}" for k, v in selected.items())
  return (f"validated EgoDorsal {root}: {len(frames)} frames ({sizes}), task {task}, "
          f"{'precropped' if precropped else 'online'} mode, format {fmt}"
          + (f", {len(skipped)} missing file(s) to skip" if skipped else "")
          + f", in {time.perf_counter() - start:.2f} s")


def _frame_problems(index: egodorsal.EgoDorsalIndex, frames: list[Frame], task: str,
                    precropped: bool) -> list[str]:
  """Missing fields, base indices out of range, unusable motion types."""
  problems = []
  bad_trials = set()
  for f in frames:
    where = f"frame {f.frame_id} (trial {f.trial_id})"
    needed = ["hamer_path"]
    needed += ["cropped_img_path", "cropped_base_path", "cropped_base_idx"] if precropped \
        else ["img_path"]
    needed += ["ann_path"] if task == "pose" else ["fsr_reading"]
    missing = [k for k in needed if getattr(f, k) is None]
    if missing:
      problems.append(f"{where}: missing {', '.join(missing)}")
    n_bases = len(index.bases.get(f.p_id, []))
    if precropped and f.cropped_base_idx is not None and not 0 <= f.cropped_base_idx < n_bases:
      problems.append(f"{where}: cropped_base_idx {f.cropped_base_idx} but participant "
                      f"{f.p_id} has {n_bases} base(s)")
    trial = index.trials[f.trial_id]
    if task == "force" and trial.motion_type not in MOTION_LABELS and f.trial_id not in bad_trials:
      bad_trials.add(f.trial_id)
      problems.append(f"trial {f.trial_id} (participant {f.p_id}): unknown motion type "
                      f"'{trial.motion_type}' (known: {sorted(MOTION_LABELS)})")
  return problems


def _file_problems(index: egodorsal.EgoDorsalIndex, frames: list[Frame], task: str,
                   precropped: bool, allow_symlinks_outside_root: bool
                   ) -> tuple[list[str], list[str]]:
  """(referenced files that do not exist, files that symlinks take out of the dataset root)."""
  listing = _Listing()
  real_root = os.path.realpath(index.root)
  problems, escaping = [], []

  def escapes(path: str) -> str | None:
    if allow_symlinks_outside_root:
      return None
    real = listing.real(path)
    if egodorsal.inside(real, real_root):
      return None
    return (f"{path} resolves to {real} through a symlink, outside the dataset root "
            f"{index.root} (allowed only with data.allow_symlinks_outside_root=True)")
  fields = ["hamer_path"] + (["cropped_img_path", "cropped_base_path"] if precropped
                             else ["img_path"]) + (["ann_path"] if task == "pose" else [])
  participants = set()
  for f in frames:
    participants.add(f.p_id)
    for field in fields:
      path = getattr(f, field)
      if path is None:
        continue
      if not listing.exists(path):
        problems.append(f"frame {f.frame_id}: {field} {path} not found")
      elif escape := escapes(path):
        escaping.append(f"frame {f.frame_id}: {field} {escape}")
  for p_id in sorted(participants):
    bases = index.bases.get(p_id, [])
    # Precropped frames use only their own base's HaMeR file; online mode may pick any base.
    used = sorted({f.cropped_base_idx for f in frames if f.p_id == p_id
                   and f.cropped_base_idx is not None}) if precropped else range(len(bases))
    for i in used:
      if not 0 <= i < len(bases):
        continue
      base = bases[i]
      paths = [("hamer_path", base.hamer_path)] + ([] if precropped else
                                                     [("img_path", base.img_path)])
      for field, path in paths:
        where = f"participant {p_id} base {base.base_id} (#{i}): {field}"
        if not listing.exists(path):
          problems.append(f"{where} {path} not found")
        elif escape := escapes(path):
          escaping.append(f"{where} {escape}")
  return problems, escaping
