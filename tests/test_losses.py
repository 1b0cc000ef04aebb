"""Pose and force losses against PyTorch written from SPEC.md §2.5 (pose through smplx's MANO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dd_jax import losses
from dd_jax.mano import io as mano_io
from dd_jax.mano import synthetic

TIP_IDS = [743, 333, 443, 554, 671]
JOINT_SRC = [0, 13, 14, 15, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9]
JOINT_DST = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]
TIP_DST = [4, 8, 12, 16, 20]


@pytest.fixture(scope="module")
def mano_pair(tmp_path_factory):
  """(dd_jax MANO, smplx MANO) of the same synthetic hand, written as a cleaned pickle."""
  smplx = pytest.importorskip("smplx")
  folder = tmp_path_factory.mktemp("mano")
  path = folder / "MANO_RIGHT.pkl"
  synthetic.write_synthetic_mano(str(path), layout="cleaned")
  ours = mano_io.load_mano(str(path))
  ref = smplx.MANO(model_path=str(folder), is_rhand=True, use_pca=False, flat_hand_mean=True)
  return ours, ref


def torch_keypoints(ref, pose, betas):
  b = pose.shape[0]
  out = ref(betas=betas, hand_pose=pose, global_orient=torch.zeros(b, 3), transl=torch.zeros(b, 3))
  kp = torch.zeros(b, 21, 3)
  kp[:, JOINT_DST] = out.joints[:, JOINT_SRC]
  kp[:, TIP_DST] = out.vertices[:, TIP_IDS]
  return kp


def torch_rotation(aa):
  """Rodrigues as the original's geom_utils.axis_angle_to_matrix (angle clamped at 1e-9)."""
  theta = aa.norm(dim=-1, keepdim=True).clamp(min=1e-9)
  kx, ky, kz = (aa / theta).unbind(-1)
  zero = torch.zeros_like(kx)
  k = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(*aa.shape[:-1], 3, 3)
  eye = torch.eye(3).expand(*aa.shape[:-1], 3, 3)
  return eye + torch.sin(theta)[..., None] * k + (1 - torch.cos(theta))[..., None] * (k @ k)


def torch_pose_loss(ref, pred, gt, betas, kw=0.05, pw=0.001):
  """The original's compute_loss: summed root-relative L1 + summed rotation-matrix MSE."""
  pk, gk = torch_keypoints(ref, pred, betas), torch_keypoints(ref, gt, betas)
  pk, gk = pk - pk[:, :1], gk - gk[:, :1]
  keypoint = (pk - gk).abs().sum(dim=(1, 2))
  b = pred.shape[0]
  rp, rg = torch_rotation(pred.reshape(b, 15, 3)), torch_rotation(gt.reshape(b, 15, 3))
  pose = ((rp - rg) ** 2).sum(dim=(1, 2, 3))
  return keypoint, pose, kw * keypoint.sum() + pw * pose.sum()


def test_pose_losses_match_torch_smplx(mano_pair):
  ours, ref = mano_pair
  g = torch.Generator().manual_seed(0)
  b = 6
  gt = torch.randn(b, 45, generator=g) * 0.4
  pred = gt + torch.randn(b, 45, generator=g) * 0.2
  pred[0] = 0.0  # zero pose: the Rodrigues special case
  betas = torch.randn(b, 10, generator=g)
  keypoint, pose, total = torch_pose_loss(ref, pred, gt, betas)
  got = jax.jit(losses.pose_losses)(ours, jnp.asarray(pred.numpy()), jnp.asarray(gt.numpy()),
                                    jnp.asarray(betas.numpy()))
  kp_rel = np.max(np.abs(np.asarray(got["keypoint"]) / keypoint.numpy() - 1))
  pose_rel = np.max(np.abs(np.asarray(got["pose"]) / pose.numpy() - 1))
  reduced = losses.reduce_pose_loss(got, keypoint_weight=0.05, pose_weight=0.001)
  total_rel = abs(float(reduced["loss"]) / total.item() - 1)
  print(f"pose loss max rel err: keypoint {kp_rel:.2e} pose {pose_rel:.2e} total {total_rel:.2e}")
  assert kp_rel < 1e-5 and pose_rel < 1e-5 and total_rel < 1e-5
  np.testing.assert_allclose(got["gt_keypoints"], torch_keypoints(ref, gt, betas).numpy(),
                             atol=1e-6)


def test_pose_loss_reduction_with_mask(mano_pair):
  ours, ref = mano_pair
  g = torch.Generator().manual_seed(1)
  gt = torch.randn(5, 45, generator=g) * 0.3
  pred = gt + torch.randn(5, 45, generator=g) * 0.3
  betas = torch.randn(5, 10, generator=g)
  valid = np.array([True, False, True, True, False])
  _, _, want = torch_pose_loss(ref, pred[valid], gt[valid], betas[valid])
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
