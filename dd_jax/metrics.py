"""Evaluation metrics (SPEC.md §5) as jit-able per-batch sums and counts plus host-side finalize.

Accumulating sums (never means of means) makes the result independent of how an evaluation set
is split into batches, devices and processes; padded samples are excluded by the `valid` mask.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

AUC_MAX_MM = 50.0
AUC_THRESHOLDS_MM = np.linspace(0.0, AUC_MAX_MM, 501)

# (parent, joint, child) keypoint triplets of the OpenPose hand whose bone angles MPJAE compares.
ANGLE_TRIPLETS = np.array([
    [0, 1, 2], [1, 2, 3], [2, 3, 4],        # thumb
    [0, 5, 6], [5, 6, 7], [6, 7, 8],        # index
    [0, 9, 10], [9, 10, 11], [10, 11, 12],  # middle
    [0, 13, 14], [13, 14, 15], [14, 15, 16],  # ring
    [0, 17, 18], [17, 18, 19], [18, 19, 20],  # pinky
], dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Pose
# ---------------------------------------------------------------------------------------------

def procrustes_align(x: jax.Array, y: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Similarity-aligns x onto y per sample (Umeyama): rotation (reflections excluded),
  isotropic scale, translation.

  x, y: (B, J, 3) -> aligned x (B, J, 3). When the best orthogonal map is a reflection, the
  last singular direction is flipped and the scale uses trace(D S) (the original's
  procrustes_np keeps sum(S) there, which over-scales such degenerate samples).
  """
  mu_x = jnp.mean(x, axis=1, keepdims=True)
  mu_y = jnp.mean(y, axis=1, keepdims=True)
  xc, yc = x - mu_x, y - mu_y
  cov = jnp.einsum("bji,bjk->bik", xc, yc)  # (B, 3, 3) = xc^T yc
  u, s, vt = jnp.linalg.svd(cov)
  v = jnp.swapaxes(vt, -1, -2)
  det = jnp.linalg.det(v @ jnp.swapaxes(u, -1, -2))
  d = jnp.concatenate([jnp.ones(det.shape + (2,), x.dtype), jnp.sign(det)[:, None]], axis=-1)
  d = jnp.where(d == 0, 1.0, d)
  rot = (v * d[:, None, :]) @ jnp.swapaxes(u, -1, -2)  # V D U^T
  var_x = jnp.sum(xc ** 2, axis=(1, 2)) + eps
  scale = jnp.sum(s * d, axis=-1) / var_x
  return scale[:, None, None] * jnp.einsum("bik,bjk->bji", rot, xc) + mu_y


def bone_angles(points: jax.Array) -> jax.Array:
  """(..., 21, 3) keypoints -> (..., 15) angles (radians) at the ANGLE_TRIPLETS joints.

  atan2(|a x b|, a.b) equals the original's arccos of the clipped unit-vector dot product but
  stays accurate in float32 near straight (pi) fingers, where arccos loses ~0.02 degrees.
  """
  parent = points[..., ANGLE_TRIPLETS[:, 0], :]
  joint = points[..., ANGLE_TRIPLETS[:, 1], :]
  child = points[..., ANGLE_TRIPLETS[:, 2], :]
  a, b = parent - joint, child - joint
  cross = jnp.linalg.norm(jnp.cross(a, b), axis=-1)
  return jnp.arctan2(cross, jnp.sum(a * b, axis=-1))


def pose_metric_sums(pred_kp: jax.Array, gt_kp: jax.Array, prior_kp: jax.Array,
                     valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-batch sums for MPJPE, prior MPJPE, PA-MPJPE, MPJAE and PCK-AUC.

  Args:
    pred_kp, gt_kp, prior_kp: (B, 21, 3) keypoints in METRES (MANO units).
    valid: (B,) bool; False rows (padding) contribute nothing.
  Returns a dict of scalars and (501,) PCK counts; add dicts over batches (`add_sums`), then
  `finalize_pose`.
  """
  b = pred_kp.shape[0]
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  # Padding may hold anything (even NaN): every sum below selects with `where`, never multiplies.
  pred_kp, gt_kp, prior_kp = (jnp.asarray(t, jnp.float32) for t in (pred_kp, gt_kp, prior_kp))

  def joint_err_mm(p):
    return 1000.0 * jnp.linalg.norm(p - gt_kp, axis=-1)  # (B, 21)

  def per_sample_sum(v):
    return jnp.sum(jnp.where(valid, v, 0.0))

  def pck_counts(err):
    below = err[..., None] < jnp.asarray(AUC_THRESHOLDS_MM, jnp.float32)  # (B, 21, 501)
    return jnp.sum(jnp.where(valid[:, None, None], below, False), axis=(0, 1)).astype(jnp.int32)

  gt_angles = bone_angles(gt_kp)
  sums = {"count": jnp.sum(valid).astype(jnp.int32)}
  for name, kp in (("", pred_kp), ("_prior", prior_kp)):
    err = joint_err_mm(kp)
    pa_err = 1000.0 * jnp.linalg.norm(procrustes_align(kp, gt_kp) - gt_kp, axis=-1)
    angle_err = jnp.degrees(jnp.abs(bone_angles(kp) - gt_angles))  # (B, 15)
    sums[f"mpjpe{name}"] = per_sample_sum(jnp.mean(err, axis=-1))
    sums[f"pa_mpjpe{name}"] = per_sample_sum(jnp.mean(pa_err, axis=-1))
    sums[f"mpjae{name}"] = per_sample_sum(jnp.mean(angle_err, axis=-1))
    sums[f"pck_counts{name}"] = pck_counts(err)
    sums[f"pa_pck_counts{name}"] = pck_counts(pa_err)
  return sums


def _auc(counts: np.ndarray, n_joints: int) -> float:
  pck = counts.astype(np.float64) / max(n_joints, 1)
  return float(np.trapezoid(pck, AUC_THRESHOLDS_MM) / AUC_MAX_MM)


def finalize_pose(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Accumulated sums -> mpjpe, pa_mpjpe, mpjae, auc, pa_auc (and *_prior) in mm / degrees."""
  sums = {k: np.asarray(v) for k, v in sums.items()}
  n = int(sums["count"])
  out = {"count": n}
  for name in ("", "_prior"):
    for key in ("mpjpe", "pa_mpjpe", "mpjae"):
      out[f"{key}{name}"] = float(sums[f"{key}{name}"]) / max(n, 1)
    out[f"auc{name}"] = _auc(sums[f"pck_counts{name}"], n * 21)
    out[f"pa_auc{name}"] = _auc(sums[f"pa_pck_counts{name}"], n * 21)
  return out


# ---------------------------------------------------------------------------------------------
# Force
# ---------------------------------------------------------------------------------------------

def force_metric_sums(logits: jax.Array, labels: jax.Array,
                      valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-batch confusion matrices (G, K, K) [group, true, predicted] of argmax predictions.

  logits (B, G, K), labels (B,) or (B, G), valid (B,) bool.
  """
  b, g, k = logits.shape
  labels = labels.reshape(b, g).astype(jnp.int32)
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  pred = jnp.argmax(logits, axis=-1)
  true_1h = jax.nn.one_hot(labels, k, dtype=jnp.int32) * valid[:, None, None]
  pred_1h = jax.nn.one_hot(pred, k, dtype=jnp.int32)
  return {"confusion": jnp.einsum("bgi,bgj->gij", true_1h, pred_1h)}


def finalize_force(sums: Mapping[str, np.ndarray]) -> dict:
  """Confusion -> acc, prec_w, recall_w, f1_w (sklearn 'weighted', zero_division=0) and the
  confusion matrices. Groups are pooled, as the original flattens (B, G) predictions."""
  confusion = np.asarray(sums["confusion"], dtype=np.int64)
  pooled = confusion.sum(axis=0)
  tp = np.diag(pooled).astype(np.float64)
  support = pooled.sum(axis=1).astype(np.float64)    # true counts per class
  predicted = pooled.sum(axis=0).astype(np.float64)  # predicted counts per class
  total = support.sum()

  def ratio(num, den):
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

  precision, recall = ratio(tp, predicted), ratio(tp, support)
  f1 = ratio(2 * precision * recall, precision + recall)
  weight = ratio(support, np.full_like(support, total))
  return {"acc": float(tp.sum() / total) if total else 0.0,
          "prec_w": float(np.sum(weight * precision)),
          "recall_w": float(np.sum(weight * recall)),
          "f1_w": float(np.sum(weight * f1)),
          "count": int(total),
          "confusion": confusion}


def add_sums(total: Mapping[str, np.ndarray] | None, batch: Mapping[str, jax.Array]
             ) -> dict[str, np.ndarray]:
  """Host-side accumulation (int64 / float64 so long evaluations do not lose precision)."""
  batch = {k: np.asarray(v) for k, v in batch.items()}
  batch = {k: v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
           for k, v in batch.items()}
  if total is None:
    return batch
  return {k: total[k] + batch[k] for k in batch}
