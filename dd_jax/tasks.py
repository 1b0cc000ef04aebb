"""Pose and force tasks: what a train step minimises and what an eval step measures.

A task holds the MANO model and the class weights (passed into the jit-compiled steps as
`consts`, not baked into the program), and turns the network's outputs into losses, metric
sums, per-frame test records and pictures. `Task` is the contract the trainer relies on.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax.numpy as jnp
import ml_collections
import numpy as np

from dd_jax import losses, metrics
from dd_jax.analysis import fields as analysis_fields
from dd_jax.mano import io as mano_io
from dd_jax.viz import pictures

Pictures = Iterator[tuple[str, np.ndarray]]  # (name, uint8 RGB picture)


class Task(Protocol):
  """What the train and eval steps call (under jit) and what the trainer does with the results."""

  consts: dict[str, Any]  # fixed arrays the steps take as an argument (MANO model, class weights)

  def loss(self, model, batch, consts, rng) -> tuple[Any, dict[str, Any]]:
    """Train step: (scalar loss to minimise, extra scalars to log); the network in train mode,
    its randomness (RoPE rescale) drawn from `rng`."""

  def loss_shares(self, micro, consts) -> Any:
    """(k,) share of each micro-batch's loss in the whole batch's loss (gradient accumulation,
    optimizer.accumulate_steps): sum_j share_j loss(micro_j) = loss(batch). micro: the batch
    with a leading axis of k micro-batches. Independent of the parameters."""

  def evaluate(self, model, batch, consts) -> tuple[dict[str, Any], dict[str, Any]]:
    """Eval step: (metric sums and counts of the batch, per-frame outputs)."""

  def finalize(self, sums: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A split's summed metric sums -> (metrics, what `summary_pictures` draws)."""

  def test_record(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-frame test outputs -> the dict test_outputs_epoch{N}.npy holds: the original's
    fields, and beside them the analysis fields (dd_jax.analysis.fields)."""

  def pictures(self, local_batch, host_outputs) -> Pictures:
    """Per-frame pictures of one evaluated batch (validation panels)."""

  def summary_pictures(self, drawn: dict[str, np.ndarray]) -> Pictures:
    """Pictures of a whole split from `finalize`'s second result (confusion matrices)."""

  def summary(self, results: dict[str, float]) -> str:
    """The closing console lines from the val/ and test/ metrics."""


class PoseTask:
  """Residual pose: theta -> MANO keypoints (base image's betas); keypoint L1 + rotation loss."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.consts = {"mano": mano_io.load_mano_or_synthetic(
        config.mano.path, tip_ids=tuple(config.mano.tip_ids))}
    self.faces = np.asarray(self.consts["mano"].faces)

  def _forward(self, model, batch, consts, rope_scale=None):
    """(network outputs, per-sample losses, the batch's reduced losses)."""
    out = model(batch["img"], batch["base_img"], batch["hamer_pose"], rope_scale=rope_scale)
    per_sample = losses.pose_losses(consts["mano"], out["theta"], batch["gt_pose"],
                                    batch["hamer_shape"])
    reduced = losses.reduce_pose_loss(per_sample, batch["valid"],
                                      keypoint_weight=self.config.loss.keypoint_weight,
                                      pose_weight=self.config.loss.pose_weight)
    return out, per_sample, reduced

  def loss(self, model, batch, consts, rng):
    _, _, reduced = self._forward(model, batch, consts, train_rope_scale(model, rng, self.config))
    return reduced["loss"], {"keypoint_loss": reduced["keypoint"], "pose_loss": reduced["pose"]}

  @staticmethod
  def loss_shares(micro, consts):
    """The loss (and its keypoint / pose terms) SUMS over the batch: every share is 1."""
    del consts
    return jnp.ones(micro["valid"].shape[:1], jnp.float32)

  def evaluate(self, model, batch, consts):
    out, per_sample, reduced = self._forward(model, batch, consts)
    prior_kp = losses.pose_keypoints(consts["mano"], batch["hamer_pose"], batch["hamer_shape"])
    sums = metrics.pose_metric_sums(per_sample["pred_keypoints"], per_sample["gt_keypoints"],
                                    prior_kp, batch["valid"])
    sums["loss"] = reduced["loss"]
    outputs = {"pose": out["theta"], "shape": batch["hamer_shape"],
               "pred_kp_3d": per_sample["pred_keypoints"], "gt_kp_3d": per_sample["gt_keypoints"],
               "hamer_kp_3d": prior_kp}
    return sums, outputs

  def finalize(self, sums: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    out = metrics.finalize_pose(sums)
    out["loss"] = float(sums["loss"]) / max(int(sums["count"]), 1)  # per frame
    out["mpjpe-prior"] = out.pop("mpjpe_prior")
    return out, {}

  def test_record(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("frame_id", "pose", "shape", "pred_kp_3d", "gt_kp_3d", "hamer_kp_3d")
    return analysis_fields.with_test_fields({k: np.asarray(outputs[k]) for k in keys},
                                            self.config, self.consts["mano"])

  def pictures(self, local_batch, host_outputs) -> Pictures:
    n = min(self.config.num_val_pictures, len(local_batch["img"]))
    for i in range(n):
      if not local_batch["valid"][i]:
        continue
      yield f"frame_{int(local_batch['frame_id'][i])}", pictures.pose_panel(
          local_batch["img"][i], local_batch["base_img"][i], host_outputs["pred_kp_3d"][i],
          host_outputs["gt_kp_3d"][i], host_outputs["hamer_kp_3d"][i],
          local_batch["prior_kp2d"][i])

  def summary_pictures(self, drawn: dict[str, np.ndarray]) -> Pictures:
    return iter(())

  @staticmethod
  def summary(results: dict[str, float]) -> str:
    """The closing lines: model vs prior on val and test."""
    lines = []
    for split in ("val", "test"):
      if f"{split}/mpjpe" in results:
        model, prior = results[f"{split}/mpjpe"], results[f"{split}/mpjpe-prior"]
        lines.append(f"{split:4s} MPJPE {model:6.2f} mm   prior {prior:6.2f} mm   "
                     f"({100 * (1 - model / prior):+.1f}% vs prior)   PA-MPJPE "
                     f"{results[f'{split}/pa_mpjpe']:.2f} (prior {results[f'{split}/pa_mpjpe_prior']:.2f})")
    return "\n".join(lines)


class ForceTask:
  """Press classes: class-weighted cross-entropy; accuracy, weighted P/R/F1, confusion."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.consts = {"class_weights": jnp.asarray(losses.class_weights(config.loss.class_counts))}

  def loss(self, model, batch, consts, rng):
    logits = model(batch["img"], batch["base_img"],
                   rope_scale=train_rope_scale(model, rng, self.config))
    per_sample = losses.force_loss(logits, batch["tap_label"], consts["class_weights"])
    return losses.reduce_force_loss(per_sample, batch["valid"]), {}

  @staticmethod
  def loss_shares(micro, consts):
    """The loss is sum(w_i l_i) / sum(w_i) over the valid samples (class weights w): a
    micro-batch's share is its sum of weights over the whole batch's."""
    k, b = micro["valid"].shape
    weights = consts["class_weights"][micro["tap_label"].reshape(k, b, -1).astype(jnp.int32)]
    per_micro = jnp.sum(jnp.where(micro["valid"], jnp.sum(weights, axis=-1), 0.0), axis=1)
    total = jnp.sum(per_micro)
    return jnp.where(total > 0, per_micro / jnp.where(total > 0, total, 1.0), 0.0)

  def evaluate(self, model, batch, consts):
    logits = model(batch["img"], batch["base_img"])
    per_sample = losses.force_loss(logits, batch["tap_label"], consts["class_weights"])
    valid = batch["valid"]
    sums = metrics.force_metric_sums(logits, batch["tap_label"], valid)
    sums["weighted_nll"] = jnp.sum(jnp.where(valid, per_sample["weighted_nll"], 0.0))
    sums["weight"] = jnp.sum(jnp.where(valid, per_sample["weight"], 0.0))
    outputs = {"pred_tap_labels": jnp.argmax(logits, -1)[:, 0] if logits.shape[1] == 1
               else jnp.argmax(logits, -1),
               "gt_tap_labels": batch["tap_label"]}
    return sums, outputs

  def finalize(self, sums: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    out = metrics.finalize_force(sums)
    confusion = out.pop("confusion")
    out["f1_w_majority"] = majority_f1(confusion.sum(0))
    out["loss"] = float(sums["weighted_nll"]) / max(float(sums["weight"]), 1e-12)
    return out, {"confusion": confusion}

  def test_record(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("frame_id", "pred_tap_labels", "gt_tap_labels")
    return analysis_fields.with_test_fields({k: np.asarray(outputs[k]) for k in keys}, self.config)

  def pictures(self, local_batch, host_outputs) -> Pictures:
    return iter(())

  def summary_pictures(self, drawn: dict[str, np.ndarray]) -> Pictures:
    """The split's confusion matrix (all out_dim groups pooled)."""
    yield "confusion", pictures.confusion_matrix(drawn["confusion"].sum(0))

  def summary(self, results: dict[str, float]) -> str:
    """The closing lines: accuracy and weighted F1 vs always predicting the majority class."""
    lines = []
    for split in ("val", "test"):
      if f"{split}/acc" in results:
        lines.append(f"{split:4s} acc {results[f'{split}/acc']:.3f}   weighted F1 "
                     f"{results[f'{split}/f1_w']:.3f}   majority-class weighted F1 "
                     f"{results[f'{split}/f1_w_majority']:.3f}")
    return "\n".join(lines)


def train_rope_scale(model, rng, config: ml_collections.ConfigDict):
  """The train-mode RoPE factors of one step (model.backbone.rope_rescale; None when 0)."""
  return model.draw_rope_scale(rng, config.model.backbone.rope_rescale)


def majority_f1(confusion: np.ndarray) -> float:
  """Weighted F1 of always predicting the most frequent true class (the baseline to beat)."""
  support = confusion.sum(1).astype(np.float64)
  total = support.sum()
  if total == 0:
    return 0.0
  share = support.max() / total  # precision = share, recall = 1 for the majority class
  return float(share * 2 * share / (share + 1))


def make_task(config: ml_collections.ConfigDict) -> Task:
  if config.task == "pose":
    return PoseTask(config)
  if config.task == "force":
    return ForceTask(config)
  raise ValueError(f"config.task must be 'pose' or 'force', got {config.task!r}")
