"""Metrics against straightforward NumPy computations, and invariance to batching / sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import metrics

RNG = np.random.default_rng(0)


def random_hands(n, rng=RNG, noise=0.01):
  """(n, 21, 3) ground truth in metres, a perturbed prediction and a prior."""
  gt = rng.normal(scale=0.05, size=(n, 21, 3))
  pred = gt + rng.normal(scale=noise, size=gt.shape)
  prior = gt + rng.normal(scale=2 * noise, size=gt.shape)
  return pred, gt, prior


# ------------------------------------------------------------------ NumPy references

def umeyama_np(x, y):
  """Umeyama (1991) in his notation: Sigma = cov(y, x) = U D V^T, S fixes a reflection."""
  out = []
  for a, b in zip(x, y):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    sigma = bc.T @ ac / len(a)
    u, d, vt = np.linalg.svd(sigma)
    s = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
      s[2, 2] = -1
    rot = u @ s @ vt
    var_a = (ac ** 2).sum() / len(a)
    c = np.trace(np.diag(d) @ s) / var_a
    out.append(c * a @ rot.T + (mu_b - c * rot @ mu_a))
  return np.stack(out)


def angles_np(p):
  """The original's arccos of clipped unit-vector dot products (float64)."""
  t = metrics.ANGLE_TRIPLETS
  v1, v2 = p[:, t[:, 0]] - p[:, t[:, 1]], p[:, t[:, 2]] - p[:, t[:, 1]]
  v1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-8)
  v2 = v2 / np.maximum(np.linalg.norm(v2, axis=-1, keepdims=True), 1e-8)
  return np.arccos(np.clip((v1 * v2).sum(-1), -1, 1))


def auc_np(err_mm):
  taus = np.linspace(0, 50, 501)
  pck = (err_mm.ravel()[None] < taus[:, None]).mean(1)
  return np.trapezoid(pck, taus) / 50


def pose_reference(pred, gt, prior):
  ref = {}
  for name, p in (("", pred), ("_prior", prior)):
    err = 1000 * np.linalg.norm(p - gt, axis=-1)
    pa = 1000 * np.linalg.norm(umeyama_np(p, gt) - gt, axis=-1)
    ref[f"mpjpe{name}"] = err.mean()
    ref[f"pa_mpjpe{name}"] = pa.mean()
    ref[f"mpjae{name}"] = np.degrees(np.abs(angles_np(p) - angles_np(gt))).mean()
    ref[f"auc{name}"] = auc_np(err)
    ref[f"pa_auc{name}"] = auc_np(pa)
  return ref


def weighted_prf_np(y, p, k):
  """sklearn precision_recall_fscore_support(average='weighted', zero_division=0) by hand."""
  prec, rec, f1, support = [], [], [], []
  for c in range(k):
    tp = np.sum((p == c) & (y == c))
    fp = np.sum((p == c) & (y != c))
    fn = np.sum((p != c) & (y == c))
    pc = tp / (tp + fp) if tp + fp else 0.0
    rc = tp / (tp + fn) if tp + fn else 0.0
    prec.append(pc)
    rec.append(rc)
    f1.append(2 * pc * rc / (pc + rc) if pc + rc else 0.0)
    support.append(np.sum(y == c))
  w = np.array(support) / np.sum(support)
  return float(w @ prec), float(w @ rec), float(w @ f1)


# ------------------------------------------------------------------ pose

def finalize_in_batches(fn, finalize, arrays, sizes, pad_to=None):
  total = None
  start = 0
  for size in sizes:
    chunk = [a[start:start + size] for a in arrays]
    valid = np.ones(size, bool)
    if pad_to is not None and size < pad_to:
      # Padding full of garbage (NaN, huge) must not leak into the sums.
      pad = pad_to - size
      chunk = [np.concatenate([c, np.full((pad,) + c.shape[1:], np.nan if c.dtype.kind == "f"
                                          else 3, c.dtype)]) for c in chunk]
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    total = metrics.add_sums(total, fn(*chunk, valid))
    start += size
  return finalize(total)


def test_pose_metrics_match_numpy_and_batching():
  pred, gt, prior = random_hands(50)
  ref = pose_reference(pred, gt, prior)
  fn = jax.jit(metrics.pose_metric_sums)
  whole = finalize_in_batches(fn, metrics.finalize_pose, (pred, gt, prior), [50])
  split = finalize_in_batches(fn, metrics.finalize_pose, (pred, gt, prior), [7, 20, 16, 7],
                              pad_to=20)
  for key, value in ref.items():
    np.testing.assert_allclose(whole[key], value, rtol=2e-5, atol=2e-5, err_msg=key)
    np.testing.assert_allclose(split[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert whole["count"] == split["count"] == 50
  assert 0.0 < whole["auc"] < 1.0 and whole["pa_mpjpe"] < whole["mpjpe"]


def test_procrustes_handles_reflections():
  x = RNG.normal(size=(40, 21, 3))
  y = RNG.normal(size=(40, 21, 3))  # unrelated: about half need the reflection fix
  y[:5] = 1.7 * x[:5] @ np.diag([1, 1, -1]) + 0.3  # mirrored: best orthogonal map reflects
  ours = np.asarray(metrics.procrustes_align(jnp.asarray(x, jnp.float32),
                                             jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(ours, umeyama_np(x, y), atol=2e-5)
  # Without the fix, mirrored samples would align perfectly; with it they cannot.
  assert np.all(np.linalg.norm(ours[:5] - y[:5], axis=-1).mean(-1) > 0.1)
  # A true similarity transform is recovered exactly.
  rot = np.linalg.qr(RNG.normal(size=(3, 3)))[0]
  rot *= np.sign(np.linalg.det(rot))
  y2 = 0.8 * x[:3] @ rot.T + np.array([1.0, -2.0, 0.5])
  ours2 = metrics.procrustes_align(jnp.asarray(x[:3], jnp.float32), jnp.asarray(y2, jnp.float32))
  np.testing.assert_allclose(ours2, y2, atol=1e-5)


def test_mpjae_near_straight_fingers():
  # Nearly straight chains (angles close to pi), where a float32 arccos loses precision.
  pred, gt, prior = random_hands(8)
  for arr in (pred, gt):
    base = arr[:, :1]
    direction = np.array([0.0, 0.0, 0.02])
    for finger in range(5):
      for j in range(4):
        arr[:, 1 + 4 * finger + j] = base[:, 0] + (j + 1) * direction + RNG.normal(
            scale=2e-5, size=(8, 3)) + finger * np.array([0.01, 0, 0])
  ours = metrics.finalize_pose(metrics.pose_metric_sums(pred, gt, prior))["mpjae"]
  ref = np.degrees(np.abs(angles_np(pred) - angles_np(gt))).mean()
  np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_sharded_evaluation_equals_host():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  pred, gt, prior = random_hands(32)
  valid = np.arange(32) < 27
  args = [jax.device_put(np.asarray(a, np.float32), sharding) for a in (pred, gt, prior, valid)]
  sums = jax.jit(metrics.pose_metric_sums)(*args)
  got = metrics.finalize_pose(metrics.add_sums(None, sums))
  ref = pose_reference(pred[:27], gt[:27], prior[:27])
  for key, value in ref.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=2e-5, err_msg=key)


# ------------------------------------------------------------------ force

@pytest.mark.parametrize("groups", [1, 3])
def test_force_metrics_match_numpy_and_batching(groups):
  k, n = 7, 90
  labels = RNG.integers(0, k, size=(n, groups))
  labels[labels == 6] = 5  # class 6 never true: its support is 0 (zero_division path)
  logits = RNG.normal(size=(n, groups, k)) + 2.5 * np.eye(k)[labels]
  logits[:, :, 4] -= 10  # class 4 never predicted: precision 0/0 -> 0
  pred = logits.argmax(-1)
  y, p = labels.ravel(), pred.ravel()
  prec, rec, f1 = weighted_prf_np(y, p, k)
  fn = jax.jit(metrics.force_metric_sums)
  for sizes, pad_to in (([n], None), ([25, 30, 35], 40)):
    got = finalize_in_batches(fn, metrics.finalize_force, (logits, labels), sizes, pad_to)
    np.testing.assert_allclose(got["acc"], np.mean(y == p), rtol=1e-12)
    np.testing.assert_allclose([got["prec_w"], got["recall_w"], got["f1_w"]], [prec, rec, f1],
                               rtol=1e-12)
    confusion = np.zeros((groups, k, k), int)
    for g in range(groups):
      np.add.at(confusion[g], (labels[:, g], pred[:, g]), 1)
    np.testing.assert_array_equal(got["confusion"], confusion)
    assert got["count"] == n * groups
  assert 0 < f1 < 1 and prec != rec


def test_force_labels_of_shape_b():
  logits = jnp.asarray(RNG.normal(size=(6, 1, 7)))
  labels = jnp.asarray(RNG.integers(0, 7, size=6))
  a = metrics.force_metric_sums(logits, labels)["confusion"]
  b = metrics.force_metric_sums(logits, labels[:, None])["confusion"]
  np.testing.assert_array_equal(a, b)
