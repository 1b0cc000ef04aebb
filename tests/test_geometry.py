"""Tests for dd_jax.geometry against an independent matrix exponential and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import geometry


def _expm_skew(aa: np.ndarray) -> np.ndarray:
  """Reference rotation: exp(skew(aa)) by a scaled-and-squared power series, in float64."""
  k = np.array([[0, -aa[2], aa[1]], [aa[2], 0, -aa[0]], [-aa[1], aa[0], 0]], dtype=np.float64)
  k = k / 16.0
  result, term = np.eye(3), np.eye(3)
  for n in range(1, 30):
    term = term @ k / n
    result = result + term
  for _ in range(4):
    result = result @ result
  return result


def _random_axis_angles(rng, count, max_angle=np.pi):
  axis = rng.normal(size=(count, 3))
  axis /= np.linalg.norm(axis, axis=1, keepdims=True)
  return axis * rng.uniform(0, max_angle, size=(count, 1))


def test_axis_angle_to_matrix_matches_matrix_exponential():
  rng = np.random.default_rng(0)
  aa = np.concatenate([_random_axis_angles(rng, 200, 3.5), np.zeros((1, 3)),
                       [[1e-9, 0, 0], [0, 3e-3, 0], [9e-3, 0, 0], [np.pi, 0, 0]]])
  expected = np.stack([_expm_skew(a) for a in aa])
  to_matrix = jax.jit(geometry.axis_angle_to_matrix)
  with jax.enable_x64(True):
    got64 = np.asarray(to_matrix(jnp.asarray(aa, jnp.float64)))
  got32 = np.asarray(to_matrix(jnp.asarray(aa, jnp.float32)))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-13)
  np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-6)


def test_matrix_to_axis_angle_round_trip_including_zero_and_near_pi():
  rng = np.random.default_rng(1)
  aa = _random_axis_angles(rng, 300, np.pi - 1e-3)
  near_pi = _random_axis_angles(rng, 20, 1.0)
  near_pi = near_pi / np.linalg.norm(near_pi, axis=1, keepdims=True) * (np.pi - 1e-6)
  aa = np.concatenate([aa, near_pi, np.zeros((1, 3)), [[0, 0, 1e-7]]])
  matrices = np.stack([_expm_skew(a) for a in aa])
  to_axis_angle = jax.jit(geometry.matrix_to_axis_angle)
  with jax.enable_x64(True):
    back = np.asarray(to_axis_angle(jnp.asarray(matrices)))
  np.testing.assert_allclose(back, aa, rtol=0, atol=1e-9)
  back32 = np.asarray(to_axis_angle(jnp.asarray(matrices, jnp.float32)))
  # float32 near pi loses precision in the axis sign-ambiguous region; the rotation must agree.
  np.testing.assert_allclose(back32[:300], aa[:300], atol=2e-5)
  again = np.asarray(jax.jit(geometry.axis_angle_to_matrix)(jnp.asarray(back32)))
  np.testing.assert_allclose(again, matrices, atol=1e-5)


def test_exactly_pi_gives_the_same_rotation():
  aa = np.array([[0.0, np.pi, 0.0], [np.pi / np.sqrt(2), np.pi / np.sqrt(2), 0.0]])
  matrices = np.stack([_expm_skew(a) for a in aa])
  with jax.enable_x64(True):
    back = np.asarray(jax.jit(geometry.matrix_to_axis_angle)(jnp.asarray(matrices)))
  np.testing.assert_allclose(np.linalg.norm(back, axis=1), np.pi, atol=1e-9)
  np.testing.assert_allclose(np.stack([_expm_skew(a) for a in back]), matrices, atol=1e-9)


def test_gradients_finite_at_zero_and_correct():
  jac = jax.jit(jax.jacfwd(geometry.axis_angle_to_matrix))(jnp.zeros(3))  # skew basis at 0
  expected = np.stack([np.asarray(geometry.skew(jnp.eye(3)[i])) for i in range(3)], -1)
  np.testing.assert_allclose(np.asarray(jac), expected, atol=1e-7)
  round_trip = lambda a: geometry.matrix_to_axis_angle(geometry.axis_angle_to_matrix(a))
  points = jnp.array([[0.0, 0.0, 0.0], [1e-6, 0.0, 0.0]])
  jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(round_trip)))(points))
  assert np.all(np.isfinite(jac))
  np.testing.assert_allclose(jac, np.broadcast_to(np.eye(3), jac.shape), atol=1e-4)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(geometry.axis_angle_to_matrix(a) ** 3)))(jnp.zeros(3))
  assert np.all(np.isfinite(np.asarray(grad)))


def _central_differences(f, point, eps):
  """Gradient of scalar f at point by central differences, evaluated in one jitted batch."""
  flat = point.reshape(-1)
  steps = np.eye(flat.size) * eps
  batch = jnp.concatenate([flat + steps, flat - steps]).reshape((-1,) + point.shape)
  values = np.asarray(jax.jit(jax.vmap(f))(batch))
  return ((values[:flat.size] - values[flat.size:]) / (2 * eps)).reshape(point.shape)


def test_gradient_matches_finite_differences_float64():
  rng = np.random.default_rng(2)
  weights = rng.normal(size=(3, 3))
  with jax.enable_x64(True):
    f = lambda a: jnp.sum(geometry.axis_angle_to_matrix(a) * weights)
    g = lambda m: jnp.sum(geometry.matrix_to_axis_angle(m) * weights[0])
    points = np.stack([rng.normal(size=3) * 0.8, [3e-3, -2e-3, 1e-3], np.zeros(3)])
    analytic = np.asarray(jax.jit(jax.vmap(jax.grad(f)))(jnp.asarray(points)))
    for point, grad in zip(points, analytic):
      np.testing.assert_allclose(grad, _central_differences(f, jnp.asarray(point), 1e-6),
                                 atol=1e-8)
    matrix = geometry.axis_angle_to_matrix(jnp.asarray(rng.normal(size=3)))
    analytic = np.asarray(jax.jit(jax.grad(g))(matrix))
    np.testing.assert_allclose(analytic, _central_differences(g, matrix, 1e-6), atol=1e-7)


@pytest.mark.parametrize("shape", [(3,), (2, 4, 3)])
def test_batching_jit_and_vmap(shape):
  rng = np.random.default_rng(3)
  aa = jnp.asarray(rng.normal(size=shape), jnp.float32)
  to_matrix = jax.jit(geometry.axis_angle_to_matrix)
  direct = to_matrix(aa)
  assert direct.shape == shape[:-1] + (3, 3) and direct.dtype == jnp.float32
  mapped = jax.jit(jax.vmap(geometry.axis_angle_to_matrix))(aa.reshape(-1, 3))
  np.testing.assert_allclose(np.asarray(mapped).reshape(direct.shape), np.asarray(direct),
                             atol=1e-6)
  eye = np.asarray(direct).reshape(-1, 3, 3)
  np.testing.assert_allclose(eye @ np.swapaxes(eye, -1, -2), np.broadcast_to(np.eye(3), eye.shape),
                             atol=1e-5)
  assert jax.eval_shape(geometry.matrix_to_axis_angle, direct).shape == shape


def test_quaternion_round_trip():
  rng = np.random.default_rng(4)
  q = rng.normal(size=(50, 4))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  q *= np.sign(q[:, :1])
  with jax.enable_x64(True):
    round_trip = jax.jit(lambda x: geometry.matrix_to_quaternion(geometry.quaternion_to_matrix(x)))
    back = np.asarray(round_trip(jnp.asarray(q)))
  np.testing.assert_allclose(back, q, atol=1e-12)
