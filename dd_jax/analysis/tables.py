"""The report's tables, computed from the per-frame test outputs of one run or of every LOSO fold.

Each number is a metric computed per participant, then summarised as mean ± SD across
participants, as the paper reports. "vs prior" is the improvement over the HaMeR prior in %,
positive when DeltaDorsal is better: 100 (1 - model / prior) for errors, 100 (model / prior - 1)
for AUC.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Callable

import numpy as np

from dd_jax.analysis import pose_errors, stats
from dd_jax.analysis.stats import AcrossParticipants, across_participants, mean_of, rmse_of

FINGER_NAMES = pose_errors.FINGERS
OCCLUDED_BELOW = 0.5  # a finger less than half visible is "self-occluded"
VISIBILITY_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Percent(float):
  """A change in % (rendered with its sign)."""


@dataclasses.dataclass
class Table:
  name: str  # file stem of its CSV
  title: str
  header: list[str]
  rows: list[list[Any]]
  note: str = ""
  digits: int = 2  # decimals shown in markdown (CSV keeps full precision)

  def markdown(self) -> str:
    lines = [f"| {' | '.join(self.header)} |", "|" + "---|" * len(self.header)]
    lines += [f"| {' | '.join(_md(c, self.digits) for c in row)} |" for row in self.rows]
    return "\n".join(lines)

  def csv(self) -> str:
    """One column per plain cell, two (mean, sd) per across-participants cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = []
    for k, name in enumerate(self.header):
      if any(isinstance(row[k], AcrossParticipants) for row in self.rows):
        header += [f"{name} mean", f"{name} sd", f"{name} participants"]
      else:
        header.append(name)
    writer.writerow(header)
    for row in self.rows:
      cells = []
      for cell in row:
        if isinstance(cell, AcrossParticipants):
          cells += [cell.mean, cell.sd, len(cell.per_participant)]
        else:
          cells.append(cell)
      writer.writerow(cells)
    return out.getvalue()


def _md(cell: Any, digits: int) -> str:
  if isinstance(cell, AcrossParticipants):
    if not cell.per_participant:
      return "—"
    mean = f"{cell.mean:.{digits}f}"
    return mean if np.isnan(cell.sd) else f"{mean} ± {cell.sd:.{digits}f}"
  if isinstance(cell, Percent):
    return "—" if not np.isfinite(cell) else f"{cell:+.1f}%"
  if isinstance(cell, (float, np.floating)):
    return "—" if not np.isfinite(cell) else f"{cell:.{digits}f}"
  return str(cell)


def improvement(model: AcrossParticipants, prior: AcrossParticipants,
                higher_is_better: bool = False) -> Percent:
  if not model.per_participant or not prior.mean:
    return Percent("nan")
  ratio = model.mean / prior.mean
  return Percent(100.0 * (ratio - 1.0 if higher_is_better else 1.0 - ratio))


def compare(participant, select, model_metric: Callable, prior_metric: Callable,
            higher_is_better: bool = False) -> list[Any]:
  """[model, prior, vs prior] cells of one metric over the selected rows."""
  model = across_participants(participant, select, model_metric)
  prior = across_participants(participant, select, prior_metric)
  return [model, prior, improvement(model, prior, higher_is_better)]


# ---------------------------------------------------------------------------------------------
# Pose
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PoseFrames:
  """Per-frame errors of the model and the prior, and the frames' metadata."""
  p_id: np.ndarray
  model: dict[str, np.ndarray]
  prior: dict[str, np.ndarray]
  record: dict[str, np.ndarray]

  @classmethod
  def from_record(cls, record: dict[str, np.ndarray]) -> "PoseFrames":
    gt = record["gt_kp_3d"]
    return cls(np.asarray(record["p_id"]), pose_errors.frame_errors(record["pred_kp_3d"], gt),
               pose_errors.frame_errors(record["hamer_kp_3d"], gt), record)

  @property
  def visibility(self) -> np.ndarray | None:
    return self.record.get("finger_visibility")

  def finger_mpjae(self, which: str) -> np.ndarray:
    """(N, 5) mean angle error over each finger's three joints."""
    errors = self.model if which == "model" else self.prior
    return errors["angle_error"].reshape(-1, 5, 3).mean(-1)


def _pose_columns(metric: str) -> list[str]:
  return [f"DeltaDorsal {metric}", f"prior {metric}", "vs prior"]


def per_joint_table(frames: PoseFrames) -> Table:
  p = frames.p_id
  rows = []
  for j in range(15):
    finger, level = divmod(j, 3)
    rows.append([FINGER_NAMES[finger], pose_errors.JOINTS[finger][level]] + compare(
        p, None, mean_of(frames.model["angle_error"][:, j]),
        mean_of(frames.prior["angle_error"][:, j])))
  overall = (("MPJAE (°)", "mpjae"), ("PA-MPJPE (mm)", "pa_mpjpe"), ("MPJPE (mm)", "mpjpe"))
  for label, key in overall:
    rows.append(["all", label] + compare(p, None, mean_of(frames.model[key]),
                                         mean_of(frames.prior[key])))
  return Table("per_joint", "Per-joint MPJAE (°), and overall errors",
               ["finger", "joint"] + _pose_columns("error"), rows)


def per_group_table(frames: PoseFrames, field: str, name: str) -> Table:
  """MPJAE and PA-MPJPE per value of a metadata field (motion type, hand position)."""
  values = np.asarray(frames.record[field])
  p = frames.p_id
  rows = []
  for value in sorted(set(values.tolist())):
    select = values == value
    rows.append([value or "(none)", int(select.sum()), len(np.unique(p[select]))]
                + compare(p, select, mean_of(frames.model["mpjae"]), mean_of(frames.prior["mpjae"]))
                + compare(p, select, mean_of(frames.model["pa_mpjpe"]),
                          mean_of(frames.prior["pa_mpjpe"])))
  return Table(f"per_{field}", f"Per {name}: MPJAE (°) and PA-MPJPE (mm)",
               [name, "frames", "participants"] + _pose_columns("MPJAE")
               + _pose_columns("PA-MPJPE"), rows)


def _pairs(frames: PoseFrames) -> tuple[np.ndarray, np.ndarray]:
  """(frame, finger) pairs: participant (N*5,) and visibility (N*5,)."""
  return np.repeat(frames.p_id, 5), np.asarray(frames.visibility, np.float64).reshape(-1)


def visibility_tables(frames: PoseFrames) -> list[Table]:
  """MPJAE by visibility bin, at <= 50% visibility, and the MPJAE-vs-visibility lines."""
  pair_p, vis = _pairs(frames)
  model = frames.finger_mpjae("model").reshape(-1)
  prior = frames.finger_mpjae("prior").reshape(-1)
  rows = []
  for lo, hi in zip(VISIBILITY_BINS[:-1], VISIBILITY_BINS[1:]):
    select = (vis >= lo) & ((vis < hi) if hi < 1 else (vis <= hi))
    rows.append([f"{100 * lo:.0f}-{100 * hi:.0f}%", int(select.sum())]
                + compare(pair_p, select, mean_of(model), mean_of(prior)))
  bins = Table("visibility_bins", "Finger MPJAE (°) by the finger's visible share",
               ["visible", "finger-frames"] + _pose_columns("MPJAE"), rows)

  low_pair = vis <= OCCLUDED_BELOW
  low_frame = np.any(np.asarray(frames.visibility) <= OCCLUDED_BELOW, axis=1)
  header = ["metric", "count"] + _pose_columns("error")
  occluded = Table("occluded", "At <= 50% visibility", header, [
      ["finger MPJAE (°), fingers <= 50% visible", int(low_pair.sum())]
      + compare(pair_p, low_pair, mean_of(model), mean_of(prior)),
      ["PA-MPJPE (mm), frames with a finger <= 50% visible", int(low_frame.sum())]
      + compare(frames.p_id, low_frame, mean_of(frames.model["pa_mpjpe"]),
                mean_of(frames.prior["pa_mpjpe"])),
      ["MPJAE (°), frames with a finger <= 50% visible", int(low_frame.sum())]
      + compare(frames.p_id, low_frame, mean_of(frames.model["mpjae"]),
                mean_of(frames.prior["mpjae"]))])

  fit_rows = []
  for label, errors in (("DeltaDorsal", model), ("prior", prior)):
    line = stats.fit_line(100.0 * vis, errors)
    fit_rows.append([label, 10.0 * line.slope, line.intercept, line.r_squared, line.n])
  fit = Table("visibility_fit", "Finger MPJAE (°) against visible share (%): least-squares line",
              ["", "slope (° per 10% visible)", "intercept (°)", "R²", "finger-frames"], fit_rows)
  return [bins, occluded, fit]


def motion_fingers(motion: str) -> np.ndarray:
  """(5,) bool, FINGERS order: the fingers a motion type names; "all" or none named -> the four
  fingers (not the thumb)."""
  named = np.array([name in motion for name in FINGER_NAMES])
  if "all" in motion or not named.any():
    return np.array([False, True, True, True, True])
  return named


def occlusion_tables(frames: PoseFrames) -> list[Table]:
  """Self-occluded taps (MCP flexion RMSE) and pinches (fingertip-to-thumb distance RMSE)."""
  motion = np.asarray(frames.record["motion_type"]).astype(str)
  vis = np.asarray(frames.visibility, np.float64)
  record = frames.record
  tap_rows, pinch_rows = [], []
  taps = sorted({m for m in motion.tolist() if "tap" in m})
  pinches = sorted({m for m in motion.tolist() if "pinch" in m})
  pair_p = np.repeat(frames.p_id, 5)
  mcp = list(pose_errors.MCP_ANGLE)
  model_mcp = frames.model["angle_error"][:, mcp].reshape(-1)
  prior_mcp = frames.prior["angle_error"][:, mcp].reshape(-1)
  fingers = np.array([motion_fingers(m) for m in motion])  # (N, 5) each frame's named fingers
  for name in taps + (["all taps"] if len(taps) > 1 else []):
    frame_sel = np.isin(motion, taps) if name == "all taps" else motion == name
    select = (frame_sel[:, None] & fingers & (vis < OCCLUDED_BELOW)).reshape(-1)
    tap_rows.append([name, int(select.sum())]
                    + compare(pair_p, select, rmse_of(model_mcp), rmse_of(prior_mcp)))
  finger = np.argmax(fingers[:, 1:], axis=1) + 1  # the pinching finger: the first named
  rows = np.arange(len(motion))
  gt_distance = pose_errors.tip_to_thumb_mm(record["gt_kp_3d"], finger)
  model_d = pose_errors.tip_to_thumb_mm(record["pred_kp_3d"], finger) - gt_distance
  prior_d = pose_errors.tip_to_thumb_mm(record["hamer_kp_3d"], finger) - gt_distance
  for name in pinches + (["all pinches"] if len(pinches) > 1 else []):
    frame_sel = np.isin(motion, pinches) if name == "all pinches" else motion == name
    select = frame_sel & (vis[rows, finger] < OCCLUDED_BELOW)
    pinch_rows.append([name, int(select.sum())]
                      + compare(frames.p_id, select, rmse_of(model_d), rmse_of(prior_d)))
  return [Table("occluded_taps", "Self-occluded taps: MCP flexion-angle RMSE (°) of tapping "
                "fingers < 50% visible", ["motion type", "finger-frames"] + _pose_columns("RMSE"),
                tap_rows),
          Table("occluded_pinches", "Self-occluded pinches: fingertip-to-thumb distance RMSE (mm), "
                "pinching finger < 50% visible", ["motion type", "frames"] + _pose_columns("RMSE"),
                pinch_rows)]


def pck_table(frames: PoseFrames) -> tuple[Table, dict[str, np.ndarray]]:
  """AUC of PCK over 0-50 mm (and after Procrustes), and the curves averaged over participants."""
  p = frames.p_id
  curves: dict[str, np.ndarray] = {}
  rows = []
  for label, key in (("AUC 0-50 mm", "joint_error"), ("PA-AUC 0-50 mm", "pa_joint_error")):
    auc_of = lambda errors: (lambda rows_: pose_errors.auc(pose_errors.pck_curve(errors[rows_])))
    rows.append([label] + compare(p, None, auc_of(frames.model[key]), auc_of(frames.prior[key]),
                                  higher_is_better=True))
    for who, errors in (("DeltaDorsal", frames.model[key]), ("prior", frames.prior[key])):
      per = [pose_errors.pck_curve(errors[p == q]) for q in np.unique(p)]
      curves[f"{who} {'PA-' if key.startswith('pa') else ''}PCK"] = np.mean(per, axis=0)
  return Table("pck_auc", "PCK AUC over 0-50 mm", ["metric"] + _pose_columns("AUC"), rows,
               digits=3), curves


def participant_tables(frames: PoseFrames, metadata: dict[int, dict[str, Any]]) -> list[Table]:
  """Errors per participant (with their metadata), and a one-way ANOVA of the per-frame errors
  by participant and by each metadata field that takes at least two values."""
  p = frames.p_id
  fields = sorted({k for m in metadata.values() for k in m})
  rows = []
  for q in np.unique(p):
    select = p == q
    cells = [int(q), int(select.sum())] + [metadata.get(int(q), {}).get(k, "") for k in fields]
    for key in ("mpjae", "pa_mpjpe", "mpjpe"):
      cells += [float(frames.model[key][select].mean()), float(frames.prior[key][select].mean())]
    rows.append(cells)
  per = Table("per_participant", "Per participant (means over the participant's frames)",
              ["participant", "frames"] + fields + ["DeltaDorsal MPJAE", "prior MPJAE",
                                                   "DeltaDorsal PA-MPJPE", "prior PA-MPJPE",
                                                   "DeltaDorsal MPJPE", "prior MPJPE"], rows)
  factors = {"participant": p} if len(np.unique(p)) > 1 else {}
  for k in fields:
    values = np.array([str(metadata.get(int(q), {}).get(k, "")) for q in p])
    if len(set(values.tolist())) > 1:
      factors[k] = values
  anova_rows = []
  for factor, groups in factors.items():
    for label, values in (("DeltaDorsal MPJAE", frames.model["mpjae"]),
                          ("prior MPJAE", frames.prior["mpjae"]),
                          ("DeltaDorsal PA-MPJPE", frames.model["pa_mpjpe"]),
                          ("prior PA-MPJPE", frames.prior["pa_mpjpe"])):
      a = stats.one_way_anova(values, groups)
      anova_rows.append([factor, label, f"F({a.df_between}, {a.df_within}) = {a.f:.2f}",
                         f"{a.p:.3g}", a.eta_squared])
  anova = Table("anova", "One-way ANOVA of per-frame errors", ["factor", "error", "F", "p", "η²"],
                anova_rows, note="Observations are frames, which are not independent within a "
                "participant: read η² as the share of the error variance the factor explains; "
                "p-values are optimistic." if anova_rows else "No factor with two or more values "
                "(one participant, no metadata that differs): nothing to compare.")
  return [per, anova]
