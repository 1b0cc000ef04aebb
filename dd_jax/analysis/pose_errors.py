"""Per-frame and per-joint pose errors (SPEC.md §5): what metrics.py sums over a split, kept
frame by frame so that the report can group, filter and test them.

Computed in float64 from the stored keypoints with metrics.py's own functions, so a report
recomputes exactly what the test phase wrote.
"""

from __future__ import annotations

import jax
import numpy as np

from dd_jax import metrics

FINGERS = ("thumb", "index", "middle", "ring", "pinky")  # the order of metrics.ANGLE_TRIPLETS
JOINTS = (("CMC", "MCP", "IP"),) + (("MCP", "PIP", "DIP"),) * 4  # each finger's 3 angle joints
MCP_ANGLE = (1, 3, 6, 9, 12)  # the angle (column of ANGLE_TRIPLETS) at each finger's MCP
TIP_KEYPOINTS = (4, 8, 12, 16, 20)  # OpenPose fingertips, FINGERS order
THUMB_TIP = 4
# One compiled program per shape instead of an op-by-op dispatch (each op compiled on first use).
_bone_angles = jax.jit(metrics.bone_angles)
_procrustes_align = jax.jit(metrics.procrustes_align)


def bone_angles_deg(keypoints: np.ndarray) -> np.ndarray:
  """(N, 21, 3) keypoints -> (N, 15) bone angles (degrees) at the ANGLE_TRIPLETS joints."""
  with jax.enable_x64(True):
    return np.degrees(np.asarray(_bone_angles(np.asarray(keypoints, np.float64))))


def angle_errors(pred_kp: np.ndarray, gt_kp: np.ndarray) -> np.ndarray:
  """(N, 21, 3) x 2 -> (N, 15) absolute bone-angle errors in degrees (MPJAE per joint)."""
  return np.abs(bone_angles_deg(pred_kp) - bone_angles_deg(gt_kp))


def joint_errors_mm(pred_kp: np.ndarray, gt_kp: np.ndarray, aligned: bool = False) -> np.ndarray:
  """(N, 21) Euclidean keypoint errors in mm; aligned=True after per-frame Procrustes (PA)."""
  pred = np.asarray(pred_kp, np.float64)
  gt = np.asarray(gt_kp, np.float64)
  if aligned:
    with jax.enable_x64(True):
      pred = np.asarray(_procrustes_align(pred, gt))
  return 1000.0 * np.linalg.norm(pred - gt, axis=-1)


def frame_errors(pred_kp: np.ndarray, gt_kp: np.ndarray) -> dict[str, np.ndarray]:
  """Per-frame errors of (N, 21, 3) keypoints in metres against the ground truth.

  Returns mpjpe, pa_mpjpe (N,) mm; mpjae (N,) degrees; angle_error (N, 15) degrees;
  joint_error, pa_joint_error (N, 21) mm.
  """
  angle = angle_errors(pred_kp, gt_kp)
  joint = joint_errors_mm(pred_kp, gt_kp)
  pa_joint = joint_errors_mm(pred_kp, gt_kp, aligned=True)
  return {"mpjpe": joint.mean(-1), "pa_mpjpe": pa_joint.mean(-1), "mpjae": angle.mean(-1),
          "angle_error": angle, "joint_error": joint, "pa_joint_error": pa_joint}


def pck_curve(joint_error_mm: np.ndarray) -> np.ndarray:
  """(..., 21) errors -> (501,) share of keypoints under each metrics.AUC_THRESHOLDS_MM."""
  errors = np.asarray(joint_error_mm, np.float64).reshape(-1)
  return np.mean(errors[None, :] < metrics.AUC_THRESHOLDS_MM[:, None], axis=1)


def auc(curve: np.ndarray) -> float:
  """Area under a PCK curve over 0-50 mm, normalised to [0, 1] (metrics.py's AUC)."""
  return float(np.trapezoid(curve, metrics.AUC_THRESHOLDS_MM) / metrics.AUC_MAX_MM)


def tip_to_thumb_mm(keypoints: np.ndarray, finger: np.ndarray) -> np.ndarray:
  """(N, 21, 3) keypoints, (N,) finger index into FINGERS -> (N,) fingertip-to-thumb-tip mm."""
  keypoints = np.asarray(keypoints, np.float64)
  rows = np.arange(len(keypoints))
  tips = keypoints[rows, np.asarray(TIP_KEYPOINTS)[np.asarray(finger)]]
  return 1000.0 * np.linalg.norm(tips - keypoints[:, THUMB_TIP], axis=-1)
