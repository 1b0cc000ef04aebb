"""Pose and force losses against PyTorch written from SPEC.md §2.5 (pose: tests/reference/deltadorsal.py
through smplx's MANO)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dd_jax import losses
from dd_jax.mano import io as mano_io

from reference import deltadorsal as tr


@pytest.fixture(scope="module")
def mano_pair(tmp_path_factory):
  """(dd_jax MANO, smplx MANO) of the same synthetic hand, written as a cleaned pickle."""
  pytest.importorskip("smplx")
  folder = tmp_path_factory.mktemp("mano")
  ref = tr.make_mano(str(folder))  # writes the synthetic MANO_RIGHT.pkl first
  ours = mano_io.load_mano(str(folder / "MANO_RIGHT.pkl"))
  return ours, ref


def test_pose_losses_match_torch_smplx(mano_pair):
  ours, ref = mano_pair
  g = torch.Generator().manual_seed(0)
  b = 6
  gt = torch.randn(b, 45, generator=g) * 0.4
  pred = gt + torch.randn(b, 45, generator=g) * 0.2
  pred[0] = 0.0  # zero pose: the Rodrigues special case
  betas = torch.randn(b, 10, generator=g)
  keypoint, pose = tr.pose_losses(ref, pred, gt, betas)
  total = tr.pose_loss(ref, pred, gt, betas, keypoint_weight=0.05, pose_weight=0.001)
  got = jax.jit(losses.pose_losses)(ours, jnp.asarray(pred.numpy()), jnp.asarray(gt.numpy()),
                                    jnp.asarray(betas.numpy()))
  kp_rel = np.max(np.abs(np.asarray(got["keypoint"]) / keypoint.numpy() - 1))
  pose_rel = np.max(np.abs(np.asarray(got["pose"]) / pose.numpy() - 1))
  reduced = losses.reduce_pose_loss(got, keypoint_weight=0.05, pose_weight=0.001)
  total_rel = abs(float(reduced["loss"]) / total.item() - 1)
  print(f"pose loss max rel err: keypoint {kp_rel:.2e} pose {pose_rel:.2e} total {total_rel:.2e}")
  assert kp_rel < 1e-5 and pose_rel < 1e-5 and total_rel < 1e-5
  np.testing.assert_allclose(got["gt_keypoints"], tr.mano_keypoints(ref, gt, betas).numpy(),
                             atol=1e-6)


def test_pose_loss_reduction_with_mask(mano_pair):
  ours, ref = mano_pair
  g = torch.Generator().manual_seed(1)
  gt = torch.randn(5, 45, generator=g) * 0.3
  pred = gt + torch.randn(5, 45, generator=g) * 0.3
  betas = torch.randn(5, 10, generator=g)
  valid = np.array([True, False, True, True, False])
  want = tr.pose_loss(ref, pred[valid], gt[valid], betas[valid], keypoint_weight=0.05,
                      pose_weight=0.001)
  pred_j = jnp.asarray(pred.numpy()).at[~valid].set(jnp.nan)  # padding may be anything
  got = losses.reduce_pose_loss(
      losses.pose_losses(ours, pred_j, jnp.asarray(gt.numpy()), jnp.asarray(betas.numpy())),
      jnp.asarray(valid))
  assert abs(float(got["loss"]) / want.item() - 1) < 1e-5


def test_pose_loss_is_zero_and_differentiable_at_the_target(mano_pair):
  ours, _ = mano_pair
  gt = jnp.zeros((2, 45)).at[1].set(0.3)
  betas = jnp.zeros((2, 10))
  total = lambda p: losses.reduce_pose_loss(losses.pose_losses(ours, p, gt, betas))["loss"]
  assert float(total(gt)) == pytest.approx(0.0, abs=1e-6)
  grad = jax.grad(total)(gt + 0.01)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("groups", [1, 2])
def test_force_loss_matches_torch_weighted_cross_entropy(groups):
  g = torch.Generator().manual_seed(2)
  b, k = 9, 7
  logits = torch.randn(b, groups, k, generator=g) * 3
  labels = torch.randint(0, k, (b, groups), generator=g)
  counts = losses.DEFAULT_CLASS_COUNTS
  c = np.array(counts, dtype=float)
  weight = torch.tensor(1.0 / (c / c.sum() + 1e-12), dtype=torch.float)  # as the original
  np.testing.assert_array_equal(losses.class_weights(counts), weight.numpy())
  ce = torch.nn.CrossEntropyLoss(weight=weight)
  want = ce(logits.reshape(b * groups, k), labels.reshape(b * groups)).item()
  labels_in = labels.numpy()[:, 0] if groups == 1 else labels.numpy()  # (B,) or (B, G)
  per_sample = losses.force_loss(jnp.asarray(logits.numpy()), jnp.asarray(labels_in),
                                 losses.class_weights(counts))
  assert per_sample["weighted_nll"].shape == (b,)
  got = float(losses.reduce_force_loss(per_sample))
  print(f"force loss rel err {abs(got / want - 1):.2e}")
  assert abs(got / want - 1) < 1e-5
  # Masked: the weighted mean over the valid rows only.
  valid = np.arange(b) % 3 != 1
  want_masked = ce(logits[valid].reshape(-1, k), labels[valid].reshape(-1)).item()
  got_masked = float(losses.reduce_force_loss(per_sample, jnp.asarray(valid)))
  assert abs(got_masked / want_masked - 1) < 1e-5
  assert float(losses.reduce_force_loss(per_sample, jnp.zeros(b, bool))) == 0.0


def test_class_weights_reject_bad_counts():
  with pytest.raises(ValueError, match="class_counts"):
    losses.class_weights([0, 0, 0])
