"""Force tables: press classification per frame and per click (majority vote), per motion type
and per participant, and confusion matrices per group (in-air / surface)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dd_jax import metrics
from dd_jax.analysis import clicks as clicks_lib
from dd_jax.analysis.stats import across_participants
from dd_jax.analysis.tables import Table
from dd_jax.data.egodorsal import MOTION_LABELS

CLASS_NAMES = {0: "no press", **{label: name for name, label in MOTION_LABELS.items()}}


def group_of(motion: str) -> str:
  """Surface taps vs presses in the air (pinches, fist)."""
  return "surface" if motion.startswith("surface") else "in-air"


@dataclasses.dataclass
class ForceFrames:
  """Per-frame labels with their metadata, and the clicks with their voted labels."""
  p_id: np.ndarray
  motion: np.ndarray
  pred: np.ndarray
  gt: np.ndarray
  num_classes: int
  clicks: list[clicks_lib.Click]
  click_pred: np.ndarray
  click_gt: np.ndarray

  @classmethod
  def from_record(cls, record: dict[str, np.ndarray]) -> "ForceFrames":
    pred = np.asarray(record["pred_tap_labels"])
    gt = np.asarray(record["gt_tap_labels"])
    if pred.ndim > 1 and pred.shape[1] != 1:
      raise ValueError(f"per-click voting needs one predicted label per frame; the outputs have "
                       f"{pred.shape[1]} per frame")
    pred, gt = pred.reshape(-1).astype(np.int64), gt.reshape(-1).astype(np.int64)
    stamps = np.asarray(record["timestamp"], np.float64)
    time = stamps if np.all(np.isfinite(stamps)) else np.asarray(record["frame_id"], np.float64)
    found = clicks_lib.find_clicks(record["fsr_reading"], record["trial_id"], time)
    click_pred, click_gt = clicks_lib.click_labels(pred, gt, found)
    num_classes = max(len(CLASS_NAMES), int(max(pred.max(initial=0), gt.max(initial=0))) + 1)
    return cls(np.asarray(record["p_id"]), np.asarray(record["motion_type"]).astype(str), pred, gt,
               num_classes, found, click_pred, click_gt)

  @property
  def click_rows(self) -> np.ndarray:
    """Position of each click's peak frame (its participant and motion type)."""
    return np.array([c.peak for c in self.clicks], np.int64)


def _accuracy(pred, gt):
  return lambda rows: float(np.mean(pred[rows] == gt[rows]))


def _f1(pred, gt, num_classes):
  return lambda rows: metrics.finalize_force(
      {"confusion": clicks_lib.confusion(gt[rows], pred[rows], num_classes)[None]})["f1_w"]


def _constant_f1(gt, num_classes):
  """Weighted F1 of always predicting the most frequent true class of ALL rows (frames or
  clicks; for frames "no press"): the baseline to beat, the same for every motion type."""
  label = int(np.bincount(gt, minlength=num_classes).argmax()) if len(gt) else 0
  return _f1(np.full_like(gt, label), gt, num_classes)


def force_tables(frames: ForceFrames) -> tuple[list[Table], dict[str, np.ndarray]]:
  """Per-frame and per-click tables, the per-participant table, and the confusion matrices."""
  k = frames.num_classes
  peak = frames.click_rows
  click_p = frames.p_id[peak] if len(peak) else np.zeros(0, np.int64)
  click_motion = frames.motion[peak] if len(peak) else np.zeros(0, str)
  frame_rows, click_rows = [], []
  for name in sorted(set(frames.motion.tolist())) + ["all"]:
    select = np.ones(len(frames.motion), bool) if name == "all" else frames.motion == name
    frame_rows.append([name, int(select.sum()),
                       across_participants(frames.p_id, select, _accuracy(frames.pred, frames.gt)),
                       across_participants(frames.p_id, select, _f1(frames.pred, frames.gt, k)),
                       across_participants(frames.p_id, select, _constant_f1(frames.gt, k))])
    chosen = np.ones(len(peak), bool) if name == "all" else click_motion == name
    click_rows.append([name, int(chosen.sum()),
                       across_participants(click_p, chosen,
                                           _accuracy(frames.click_pred, frames.click_gt)),
                       across_participants(click_p, chosen,
                                           _f1(frames.click_pred, frames.click_gt, k)),
                       across_participants(click_p, chosen, _constant_f1(frames.click_gt, k))])
  header = ["motion type", "{}", "accuracy", "weighted F1", "weighted F1, most frequent class"]
  tables = [Table("force_frames", "Force, per frame", [h.format("frames") for h in header],
                  frame_rows),
            Table("force_clicks", "Force, per click (majority vote over the click's frames)",
                  [h.format("clicks") for h in header], click_rows)]

  participant_rows = []
  for q in np.unique(frames.p_id):
    select, chosen = frames.p_id == q, click_p == q
    participant_rows.append([
        int(q), int(select.sum()), int(chosen.sum()),
        _accuracy(frames.pred, frames.gt)(np.flatnonzero(select)),
        _f1(frames.pred, frames.gt, k)(np.flatnonzero(select)),
        _accuracy(frames.click_pred, frames.click_gt)(np.flatnonzero(chosen)) if chosen.any()
        else float("nan")])
  tables.append(Table("force_per_participant", "Force, per participant",
                      ["participant", "frames", "clicks", "frame accuracy", "frame weighted F1",
                       "click accuracy"], participant_rows))

  confusions = {}
  for group in ("in-air", "surface"):
    in_group = np.array([group_of(m) == group for m in frames.motion], bool)
    click_in_group = np.array([group_of(m) == group for m in click_motion], bool)
    if in_group.any():
      confusions[f"frames_{group}"] = clicks_lib.confusion(frames.gt[in_group],
                                                           frames.pred[in_group], k)
    if click_in_group.any():
      confusions[f"clicks_{group}"] = clicks_lib.confusion(
          frames.click_gt[click_in_group], frames.click_pred[click_in_group], k)
  return tables, confusions
