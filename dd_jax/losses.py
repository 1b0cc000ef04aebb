"""DeltaDorsal training losses (SPEC.md §2.5): per-sample values, plus the original's reductions.

Per-sample values let the trainer drop padded samples (valid mask) and reduce over a sharded
global batch; `reduce_pose_loss` / `reduce_force_loss` give the original's numbers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import geometry
from dd_jax.mano import model as mano_model

DEFAULT_CLASS_COUNTS = (30714, 1860, 1860, 1860, 1860, 1860, 1860)


# ---------------------------------------------------------------------------------------------
# Pose
# ---------------------------------------------------------------------------------------------

def pose_keypoints(mano: mano_model.ManoModel, pose: jax.Array, betas: jax.Array) -> jax.Array:
  """MANO 21 OpenPose keypoints (B, 21, 3) in metres of a (B, 45) axis-angle finger pose.

  Right hand, no PCA, flat hand mean, zero global orientation and translation (as the original).
  """
  b = pose.shape[0]
  zeros = jnp.zeros((b, 3), pose.dtype)
  out = mano_model.mano_forward(mano, betas, pose, global_orient=zeros, transl=zeros,
                                flat_hand_mean=True)
  return out.keypoints


def pose_losses(mano: mano_model.ManoModel, pred_pose: jax.Array, gt_pose: jax.Array,
                betas: jax.Array) -> dict[str, jax.Array]:
  """Per-sample pose losses.

  Args:
    mano: the MANO model (an argument, so this works under jit).
    pred_pose, gt_pose: (B, 45) axis-angle.
    betas: (B, 10) shape: the BASE image's HaMeR betas (batch['hamer_shape']).
  Returns:
    keypoint (B,): root-relative L1 summed over 21 joints and xyz;
    pose (B,): squared error of the 15 rotation matrices summed over all entries;
    pred_keypoints, gt_keypoints (B, 21, 3) metres (reuse them for metrics).
  """
  b = pred_pose.shape[0]
  # One MANO call for both sets.
  keypoints = pose_keypoints(mano, jnp.concatenate([pred_pose, gt_pose], 0),
                             jnp.concatenate([betas, betas], 0))
  pred_kp, gt_kp = keypoints[:b], keypoints[b:]
  pred_rel = pred_kp - pred_kp[:, :1]
  gt_rel = gt_kp - gt_kp[:, :1]
  keypoint = jnp.sum(jnp.abs(pred_rel - gt_rel), axis=(1, 2))
  r_pred = geometry.axis_angle_to_matrix(pred_pose.reshape(b, -1, 3))
  r_gt = geometry.axis_angle_to_matrix(gt_pose.reshape(b, -1, 3))
  pose = jnp.sum((r_pred - r_gt) ** 2, axis=(1, 2, 3))
  return {"keypoint": keypoint, "pose": pose, "pred_keypoints": pred_kp, "gt_keypoints": gt_kp}


def reduce_pose_loss(losses: dict[str, jax.Array], valid: jax.Array | None = None, *,
                     keypoint_weight: float = 0.05, pose_weight: float = 0.001
                     ) -> dict[str, jax.Array]:
  """The original's reduction: SUM over the (valid) batch, total = kw*keypoint + pw*pose.

  Note: the original sums over each GPU's batch and DDP averages the gradients, so with W data
  parallel replicas its effective objective is this global sum divided by W.
  Returns {loss, keypoint, pose} (scalars; keypoint / pose unweighted sums).
  """
  keypoint, pose = losses["keypoint"], losses["pose"]
  if valid is not None:
    keypoint = jnp.where(valid, keypoint, 0.0)
    pose = jnp.where(valid, pose, 0.0)
  keypoint, pose = jnp.sum(keypoint), jnp.sum(pose)
  return {"loss": keypoint_weight * keypoint + pose_weight * pose,
          "keypoint": keypoint, "pose": pose}


# ---------------------------------------------------------------------------------------------
# Force
# ---------------------------------------------------------------------------------------------

def class_weights(class_counts: Sequence[float] = DEFAULT_CLASS_COUNTS) -> np.ndarray:
  """1 / (count / sum(counts) + 1e-12) as the original computes it (float64, then float32)."""
  counts = np.asarray(class_counts, dtype=np.float64)
  if counts.ndim != 1 or np.any(counts < 0) or counts.sum() <= 0:
    raise ValueError(f"loss.class_counts must be non-negative counts, got {class_counts!r}")
  return (1.0 / (counts / counts.sum() + 1e-12)).astype(np.float32)


def force_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array
               ) -> dict[str, jax.Array]:
  """Per-sample class-weighted cross-entropy terms.

  Args:
    logits: (B, G, K) with G = head out_dim groups, K classes.
    labels: (B,) or (B, G) integer classes.
    weights: (K,) class weights (`class_weights`).
  Returns:
    weighted_nll (B,): sum over groups of w[y] * -log softmax(logits)[y];
    weight (B,): sum over groups of w[y]. torch's weighted-mean CE is
    sum(weighted_nll) / sum(weight) over the batch (see reduce_force_loss).
  """
  b, g, _ = logits.shape
  labels = labels.reshape(b, g).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  w = jnp.asarray(weights, jnp.float32)[labels]
  return {"weighted_nll": jnp.sum(w * nll, axis=1), "weight": jnp.sum(w, axis=1)}


def reduce_force_loss(losses: dict[str, jax.Array], valid: jax.Array | None = None) -> jax.Array:
  """The original's reduction (nn.CrossEntropyLoss(weight=w)): sum(w_i l_i) / sum(w_i)."""
  num, den = losses["weighted_nll"], losses["weight"]
  if valid is not None:
    num = jnp.where(valid, num, 0.0)
    den = jnp.where(valid, den, 0.0)
  num, den = jnp.sum(num), jnp.sum(den)
  # An all-padding batch contributes nothing instead of 0/0.
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
