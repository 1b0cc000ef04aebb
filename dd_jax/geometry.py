"""Rotation helpers shared by MANO, the losses and the data code (axis-angle <-> matrix, quaternions).

All functions are pure jnp, broadcast over leading axes, work in float32 and float64 and keep
finite gradients at the zero rotation (series expansions behind a double `where`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this squared angle the closed forms are replaced by their Taylor series; with three terms
# the truncation error (theta^6 / 5040 < 2e-16) is under float64 rounding.
_SMALL_ANGLE_SQ = 1e-4


def skew(v: jax.Array) -> jax.Array:
  """Cross-product matrices: v (..., 3) -> K (..., 3, 3) with K @ x == cross(v, x)."""
  x, y, z = v[..., 0], v[..., 1], v[..., 2]
  zero = jnp.zeros_like(x)
  return jnp.stack([
      jnp.stack([zero, -z, y], -1),
      jnp.stack([z, zero, -x], -1),
      jnp.stack([-y, x, zero], -1),
  ], -2)


def axis_angle_to_matrix(axis_angle: jax.Array) -> jax.Array:
  """Rodrigues' formula: axis-angle (..., 3) (direction = axis, norm = angle in radians) -> (..., 3, 3).

  R = cos(t) I + (sin t / t) K + ((1 - cos t) / t^2) a a^T with K = skew(a), t = |a|; the two
  coefficients use their series below t^2 = 1e-4 so R and its gradient are exact at a = 0.
  """
  aa = jnp.asarray(axis_angle)
  if not jnp.issubdtype(aa.dtype, jnp.floating):
    aa = aa.astype(jnp.float32)
  theta_sq = jnp.sum(aa * aa, axis=-1)
  small = theta_sq < _SMALL_ANGLE_SQ
  safe_sq = jnp.where(small, jnp.ones_like(theta_sq), theta_sq)
  theta = jnp.sqrt(safe_sq)
  half_sinc = jnp.sin(0.5 * theta) / theta  # sin(t/2)/t, no cancellation unlike 1 - cos t
  sin_over = jnp.where(small, 1.0 - theta_sq / 6.0 + theta_sq * theta_sq / 120.0,
                       jnp.sin(theta) / theta)
  one_minus_cos_over = jnp.where(small, 0.5 - theta_sq / 24.0 + theta_sq * theta_sq / 720.0,
                                 2.0 * half_sinc * half_sinc)
  cos = 1.0 - one_minus_cos_over * theta_sq
  eye = jnp.eye(3, dtype=aa.dtype)
  outer = aa[..., :, None] * aa[..., None, :]
  return (cos[..., None, None] * eye + sin_over[..., None, None] * skew(aa)
          + one_minus_cos_over[..., None, None] * outer)


def _sqrt_positive(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) with a zero (not infinite) gradient at and below 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, jnp.ones_like(x))), 0.0)


def matrix_to_quaternion(matrix: jax.Array) -> jax.Array:
  """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z) with w >= 0.

  Picks, per matrix, the best-conditioned of the four standard formulas (the one dividing by the
  largest |q_i|), so it is accurate near 180 degrees as well as near the identity.
  """
  m = jnp.asarray(matrix)
  m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
  m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
  m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
  q_abs = _sqrt_positive(jnp.stack([
      1.0 + m00 + m11 + m22,
      1.0 + m00 - m11 - m22,
      1.0 - m00 + m11 - m22,
      1.0 - m00 - m11 + m22,
  ], -1))  # 2|w|, 2|x|, 2|y|, 2|z|
  candidates = jnp.stack([
      jnp.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
      jnp.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
      jnp.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
      jnp.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
  ], -2)  # row i is 2|q_i| * q (up to sign)
  candidates = candidates / (2.0 * jnp.maximum(q_abs[..., :, None], 0.1))
  best = jax.nn.one_hot(jnp.argmax(q_abs, axis=-1), 4, dtype=m.dtype)
  quat = jnp.sum(candidates * best[..., :, None], axis=-2)
  quat = quat * jnp.where(quat[..., :1] < 0, -1.0, 1.0)
  return quat / jnp.linalg.norm(quat, axis=-1, keepdims=True)


def quaternion_to_axis_angle(quaternion: jax.Array) -> jax.Array:
  """Quaternions (..., 4) as (w, x, y, z) -> axis-angle (..., 3) with angle in [0, pi]."""
  q = jnp.asarray(quaternion)
  q = q * jnp.where(q[..., :1] < 0, -1.0, 1.0)
  w, xyz = q[..., 0], q[..., 1:]
  norm_sq = jnp.sum(xyz * xyz, axis=-1)
  small = norm_sq < 1e-12
  norm = jnp.sqrt(jnp.where(small, jnp.ones_like(norm_sq), norm_sq))
  # angle / |xyz| = 2 atan2(n, w) / n -> 2/w - (2/3) n^2 / w^3 as n -> 0 (w ~ 1 there).
  scale = jnp.where(small, 2.0 / w - (2.0 / 3.0) * norm_sq / (w * w * w),
                    2.0 * jnp.arctan2(norm, w) / norm)
  return xyz * scale[..., None]


def matrix_to_axis_angle(matrix: jax.Array) -> jax.Array:
  """Rotation matrices (..., 3, 3) -> axis-angle (..., 3), angle in [0, pi]; stable at 0 and pi."""
  return quaternion_to_axis_angle(matrix_to_quaternion(matrix))


def quaternion_to_matrix(quaternion: jax.Array) -> jax.Array:
  """Quaternions (..., 4) as (w, x, y, z), normalised first -> rotation matrices (..., 3, 3)."""
  q = jnp.asarray(quaternion)
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  return jnp.stack([
      jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
      jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
      jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
  ], -2)


def rotation_6d_to_matrix(x: jax.Array) -> jax.Array:
  """Zhou et al.'s 6D rotation -> matrix, laid out as HaMeR lays it out: (..., 6) -> (..., 3, 3).

  a1 = x[..., 0:3], a2 = x[..., 3:6] (HaMeR reshapes to (2, 3) rows; SPIN's interleaved
  (3, 2) layout is a different map); b1 = a1/|a1|, b2 = the unit part of a2 orthogonal to b1,
  b3 = b1 x b2; the matrix has b1, b2, b3 as its COLUMNS. Norms are clamped at 1e-12 as
  torch.nn.functional.normalize clamps them.
  """
  a1, a2 = x[..., 0:3], x[..., 3:6]
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  b1 = unit(a1)
  b2 = unit(a2 - jnp.sum(b1 * a2, axis=-1, keepdims=True) * b1)
  b3 = jnp.cross(b1, b2)
  return jnp.stack([b1, b2, b3], axis=-1)
