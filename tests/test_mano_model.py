"""Tests for dd_jax.mano.model: parity with smplx's MANO, keypoints, jit/vmap/grad, float64."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import geometry
from dd_jax.mano import model as mano_model
from dd_jax.synthetic import hand as synthetic

BATCH = 8

forward = jax.jit(mano_model.mano_forward, static_argnames=("flat_hand_mean", "num_pca_comps"))


def _inputs(seed, batch=BATCH, pose_scale=1.0):
  rng = np.random.default_rng(seed)
  return dict(betas=rng.normal(size=(batch, 10)) * 1.5,
              hand_pose=rng.normal(size=(batch, 45)) * pose_scale,
              global_orient=rng.normal(size=(batch, 3)),
              transl=rng.normal(size=(batch, 3)) * 0.2)


@pytest.fixture(scope="module")
def model():
  return synthetic.synthetic_mano_model()


@pytest.fixture(scope="module")
def smplx_dir(tmp_path_factory):
  # smplx.MANO(model_path=dir) opens dir/MANO_RIGHT.pkl with plain pickle: the cleaned layout.
  path = tmp_path_factory.mktemp("smplx_models")
  synthetic.write_synthetic_mano(os.path.join(path, "MANO_RIGHT.pkl"), layout="cleaned")
  return str(path)


@functools.lru_cache(maxsize=None)
def _smplx_layer(model_dir, use_pca, num_pca_comps, flat_hand_mean, layer=False):
  smplx = pytest.importorskip("smplx")
  cls = smplx.MANOLayer if layer else smplx.MANO
  return cls(model_dir, is_rhand=True, use_pca=use_pca, num_pca_comps=num_pca_comps,
             flat_hand_mean=flat_hand_mean, batch_size=BATCH)


def _smplx_forward(layer, **kwargs):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = layer(**{k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in kwargs.items()})
  return out.vertices.numpy(), out.joints.numpy()


@pytest.mark.parametrize("flat_hand_mean,num_pca_comps,pose_scale", [
    (True, None, 1.0),
    (False, None, 2.5),  # large angles (beyond pi for some joints)
    (False, 12, 2.0),
    (True, 6, 1.0),
])
def test_parity_with_smplx(model, smplx_dir, flat_hand_mean, num_pca_comps, pose_scale):
  inputs = _inputs(0, pose_scale=pose_scale)
  if num_pca_comps is not None:
    inputs["hand_pose"] = inputs["hand_pose"][:, :num_pca_comps]
  layer = _smplx_layer(smplx_dir, num_pca_comps is not None, num_pca_comps or 45, flat_hand_mean)
  ref_vertices, ref_joints = _smplx_forward(layer, **inputs)
  assert ref_joints.shape == (BATCH, 16, 3)  # smplx's MANO returns the 16 chain joints
  out = forward(model, **inputs, flat_hand_mean=flat_hand_mean, num_pca_comps=num_pca_comps)
  assert out.vertices.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.vertices), ref_vertices, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.joints), ref_joints, rtol=0, atol=1e-6)
  assert np.abs(ref_vertices).max() > 0.05  # the comparison is not vacuous


def test_large_batches_run_in_chunks_with_the_same_results(model, smplx_dir):
  batch = 2 * mano_model._CHUNK + 20  # two chunks through lax.map plus a remainder
  inputs = _inputs(6, batch=batch, pose_scale=1.5)
  layer = _smplx_layer(smplx_dir, False, 45, False)
  ref_vertices, ref_joints = _smplx_forward(layer, **inputs)
  out = forward(model, **inputs, flat_hand_mean=False)
  np.testing.assert_allclose(np.asarray(out.vertices), ref_vertices, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.joints), ref_joints, rtol=0, atol=1e-6)
  small = forward(model, **{k: v[-BATCH:] for k, v in inputs.items()}, flat_hand_mean=False)
  np.testing.assert_allclose(np.asarray(out.keypoints[-BATCH:]), np.asarray(small.keypoints),
                             rtol=0, atol=1e-7)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(mano_model.mano_forward(
      model, inputs["betas"], p).vertices)))(jnp.asarray(inputs["hand_pose"], jnp.float32))
  assert grad.shape == (batch, 45) and np.all(np.isfinite(np.asarray(grad)))


def test_rotation_matrix_input_matches_smplx_layer_and_axis_angle(model, smplx_dir):
  inputs = _inputs(1, pose_scale=1.5)
  hand_rot = geometry.axis_angle_to_matrix(jnp.asarray(inputs["hand_pose"]).reshape(BATCH, 15, 3))
  root_rot = geometry.axis_angle_to_matrix(jnp.asarray(inputs["global_orient"]))
  layer = _smplx_layer(smplx_dir, False, 45, True, layer=True)
  ref_vertices, ref_joints = _smplx_forward(
      layer, betas=inputs["betas"], hand_pose=hand_rot, global_orient=root_rot[:, None],
      transl=inputs["transl"])
  out = forward(model, inputs["betas"], hand_rot, root_rot, inputs["transl"])
  np.testing.assert_allclose(np.asarray(out.vertices), ref_vertices, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.joints), ref_joints, atol=1e-6)
  out_aa = forward(model, **inputs)
  np.testing.assert_allclose(np.asarray(out.vertices), np.asarray(out_aa.vertices), atol=1e-6)


def test_keypoints_are_openpose_ordered_joints_and_tip_vertices(model):
  out = forward(model, **_inputs(2))
  joints, vertices, keypoints = map(np.asarray, (out.joints, out.vertices, out.keypoints))
  assert keypoints.shape == (BATCH, 21, 3)
  # SPEC: MANO joints [0,13,14,15,1,2,3,4,5,6,10,11,12,7,8,9] -> slots [0,1,2,3,5,6,7,9,10,11,
  # 13,14,15,17,18,19]; tips (thumb, index, middle, ring, pinky) -> slots [4,8,12,16,20].
  slots = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]
  sources = [0, 13, 14, 15, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9]
  np.testing.assert_array_equal(keypoints[:, slots], joints[:, sources])
  np.testing.assert_array_equal(keypoints[:, [4, 8, 12, 16, 20]],
                                vertices[:, list(mano_model.DELTADORSAL_TIP_IDS)])
  other = model.with_tip_ids(mano_model.SMPLX_TIP_IDS)
  out = forward(other, **_inputs(2))
  np.testing.assert_array_equal(np.asarray(out.keypoints)[:, [4, 8, 12, 16, 20]],
                                np.asarray(out.vertices)[:, [744, 320, 443, 554, 671]])


def test_translation_and_defaults(model):
  inputs = _inputs(3)
  base = forward(model, inputs["betas"], inputs["hand_pose"])
  shifted = forward(model, inputs["betas"], inputs["hand_pose"], None, inputs["transl"])
  for a, b in zip(base, shifted):
    np.testing.assert_allclose(np.asarray(b) - np.asarray(a),
                               np.broadcast_to(inputs["transl"][:, None], a.shape), atol=1e-6)
  identity = forward(model, inputs["betas"], inputs["hand_pose"], np.zeros((BATCH, 3)))
  np.testing.assert_allclose(np.asarray(identity.vertices), np.asarray(base.vertices), atol=1e-7)
  rest = forward(model, np.zeros((1, 10)), np.zeros((1, 45)))
  np.testing.assert_allclose(np.asarray(rest.vertices[0]), np.asarray(model.v_template),
                             atol=1e-7)


def test_vmap_jit_and_model_as_argument(model):
  inputs = _inputs(4)
  batched = forward(model, inputs["betas"], inputs["hand_pose"])
  single = lambda b, p: mano_model.mano_forward(model, b[None], p[None]).vertices[0]
  mapped = jax.jit(jax.vmap(single))(jnp.asarray(inputs["betas"]), jnp.asarray(inputs["hand_pose"]))
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched.vertices), atol=1e-6)
  # The model is a pytree: it can be an argument of a jitted function and mapped over.
  models = jax.tree.map(lambda x: jnp.stack([x, x]), model)
  per_model = jax.jit(jax.vmap(lambda m: mano_model.mano_forward(
      m, inputs["betas"], inputs["hand_pose"]).joints))(models)
  np.testing.assert_allclose(np.asarray(per_model[1]), np.asarray(batched.joints), atol=1e-6)


def test_gradient_finite_at_zero_pose(model):
  loss = lambda pose, betas: jnp.sum(mano_model.mano_forward(model, betas, pose).keypoints ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.zeros((2, 45)), jnp.zeros((2, 10)))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.abs(np.asarray(grads[0])).max() > 0


def test_gradients_match_finite_differences_in_float64():
  with jax.enable_x64(True):
    model64 = synthetic.synthetic_mano_model(dtype=jnp.float64)
    assert model64.v_template.dtype == jnp.float64
    rng = np.random.default_rng(5)
    betas = jnp.asarray(rng.normal(size=(1, 10)))
    pose = jnp.asarray(rng.normal(size=(1, 45)) * 0.7)
    weights = jnp.asarray(rng.normal(size=(1, 21, 3)))
    loss = lambda p: jnp.sum(mano_model.mano_forward(
        model64, betas, p.reshape(1, 45), flat_hand_mean=False).keypoints * weights)
    analytic = np.asarray(jax.jit(jax.grad(loss))(pose[0]))
    eps = 1e-6
    steps = np.eye(45) * eps
    values = np.asarray(jax.jit(jax.vmap(loss))(jnp.concatenate([pose + steps, pose - steps])))
    numeric = (values[:45] - values[45:]) / (2 * eps)
    error = np.abs(analytic - numeric).max()
    assert error < 1e-7 * max(1.0, np.abs(numeric).max()), error
    out64 = mano_model.mano_forward(model64, betas, pose)
    assert out64.vertices.dtype == jnp.float64
  out32 = forward(synthetic.synthetic_mano_model(), np.asarray(betas), np.asarray(pose))
  np.testing.assert_allclose(np.asarray(out32.vertices), np.asarray(out64.vertices), atol=1e-6)


def test_input_errors_are_explained(model):
  with pytest.raises(ValueError, match="betas"):
    mano_model.mano_forward(model, np.zeros((2, 9)), np.zeros((2, 45)))
  with pytest.raises(ValueError, match="hand_pose"):
    mano_model.mano_forward(model, np.zeros((2, 10)), np.zeros((2, 44)))
  with pytest.raises(ValueError, match="PCA"):
    mano_model.mano_forward(model, np.zeros((2, 10)), np.zeros((2, 45)), num_pca_comps=6)
  with pytest.raises(ValueError, match="flat_hand_mean"):
    mano_model.mano_forward(model, np.zeros((2, 10)), np.zeros((2, 15, 3, 3)),
                            flat_hand_mean=False)
  with pytest.raises(ValueError, match="tip_ids"):
    model.with_tip_ids((1, 2, 3))
