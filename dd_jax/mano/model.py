"""The MANO hand model as pure JAX functions over a `ManoModel` pytree (no Python loops over the batch).

`mano_forward` follows smplx's MANO (SPEC.md section 3) and adds the 21 OpenPose keypoints. Speed
choices: shape and pose blend shapes are one matmul (betas and pose features against pre-flattened,
stacked directions), the rest-pose joints come from a pre-multiplied regressor, the kinematic
chain is composed level by level (MANO's tree is 4 levels deep) with its 3x3 products written as
multiply-adds, skinning is one matmul of the flattened (3, 4) joint transforms with the (778, 16)
weights applied along the vertex axis. The small per-hand quantities (blend coefficients, joint
transforms, joints) are computed for the whole batch at once; the mesh (both matmuls and the
skinning) runs in chunks of 256 hands so each chunk's (chunk, 12, 778) intermediate stays in cache
(measured ~3x faster than unchunked at batch 1024 on CPU). Matmuls ask for HIGHEST precision so
float32 on GPUs/TPUs keeps the 1e-6 m parity.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dd_jax import geometry

NUM_VERTICES = 778
NUM_FACES = 1538
NUM_JOINTS = 16
NUM_BETAS = 10
NUM_POSE_PARAMS = 45  # 15 hand joints x axis-angle
NUM_KEYPOINTS = 21

# Joint order: 0 wrist, 1-3 index, 4-6 middle, 7-9 pinky, 10-12 ring, 13-15 thumb.
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
JOINT_NAMES = ("wrist", "index1", "index2", "index3", "middle1", "middle2", "middle3", "pinky1",
               "pinky2", "pinky3", "ring1", "ring2", "ring3", "thumb1", "thumb2", "thumb3")

# Fingertip vertices in OpenPose order (thumb, index, middle, ring, pinky).
DELTADORSAL_TIP_IDS = (743, 333, 443, 554, 671)
SMPLX_TIP_IDS = (744, 320, 443, 554, 671)  # smplx's VERTEX_IDS['mano'], also HaMeR's

# OpenPose slot k takes row OPENPOSE_SOURCE[k] of concat([16 chain joints, 5 tip vertices]):
# 0 wrist, 1-4 thumb, 5-8 index, 9-12 middle, 13-16 ring, 17-20 pinky (tips last in each finger).
OPENPOSE_SOURCE = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)

_HIGHEST = jax.lax.Precision.HIGHEST


class _StaticArray:
  """A read-only numpy array usable as pytree metadata (hashable, compared by value)."""

  __slots__ = ("array", "_hash")

  def __init__(self, array: np.ndarray):
    array = np.array(array, copy=True)
    array.flags.writeable = False
    self.array = array
    self._hash = hash((array.shape, str(array.dtype), hashlib.sha1(array.tobytes()).hexdigest()))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return self is other or (isinstance(other, _StaticArray) and self._hash == other._hash
                             and self.array.shape == other.array.shape
                             and np.array_equal(self.array, other.array))

  def __repr__(self) -> str:
    return f"StaticArray(shape={self.array.shape}, dtype={self.array.dtype})"


_ARRAY_FIELDS = ("v_template", "blend_directions", "joint_template", "joint_shape_directions",
                 "j_regressor", "weights", "hands_components", "hands_mean")


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class ManoModel:
  """MANO's arrays as pytree leaves; the kinematic tree, faces and tip vertex ids are static.

  Build it with `make_mano_model` (or `dd_jax.mano.io.load_mano`, `synthetic_mano_model`), which
  derives the pre-flattened and pre-multiplied arrays below from the file's arrays.

  Attributes:
    v_template: (778, 3) rest-pose vertices in metres.
    blend_directions: (10 + 135, 3 * 778) shape directions (rows 0-9) then pose directions
      (rows 10-144), columns coordinate-major ((x of all vertices), (y ...), (z ...)), so
      v.T = v_template.T + ([betas, pose_feature] @ blend_directions).reshape(3, 778).
    joint_template: (16, 3) J_regressor @ v_template.
    joint_shape_directions: (10, 16 * 3) the regressor applied to each shape direction.
    j_regressor: (16, 778) dense joint regressor.
    weights: (778, 16) skinning weights.
    hands_components: (45, 45) PCA basis of the hand pose, one component per row.
    hands_mean: (45,) mean hand pose (axis-angle), added when flat_hand_mean=False.
    parents: 16 parent indices, -1 for the root.
    tip_ids: 5 fingertip vertex ids in OpenPose order (thumb, index, middle, ring, pinky).
  """

  v_template: jax.Array
  blend_directions: jax.Array
  joint_template: jax.Array
  joint_shape_directions: jax.Array
  j_regressor: jax.Array
  weights: jax.Array
  hands_components: jax.Array
  hands_mean: jax.Array
  parents: tuple[int, ...]
  faces_static: _StaticArray
  tip_ids: tuple[int, ...]

  @property
  def faces(self) -> np.ndarray:
    """(1538, 3) int32 triangle vertex ids (read-only numpy array)."""
    return self.faces_static.array

  @property
  def dtype(self) -> Any:
    return self.v_template.dtype

  @property
  def shapedirs(self) -> jax.Array:
    """(778, 3, 10) shape directions as in the file."""
    return self.blend_directions[:NUM_BETAS].reshape(NUM_BETAS, 3, NUM_VERTICES).transpose(2, 1, 0)

  @property
  def posedirs(self) -> jax.Array:
    """(778, 3, 135) pose-corrective directions as in the file."""
    return self.blend_directions[NUM_BETAS:].reshape(-1, 3, NUM_VERTICES).transpose(2, 1, 0)

  def tree_flatten_with_keys(self):
    children = tuple((jax.tree_util.GetAttrKey(name), getattr(self, name))
                     for name in _ARRAY_FIELDS)
    return children, (self.parents, self.faces_static, self.tip_ids)

  @classmethod
  def tree_unflatten(cls, aux, children):
    parents, faces_static, tip_ids = aux
    return cls(*children, parents=parents, faces_static=faces_static, tip_ids=tip_ids)

  def with_tip_ids(self, tip_ids: Sequence[int]) -> "ManoModel":
    """The same model reporting other fingertip vertices (e.g. SMPLX_TIP_IDS)."""
    return dataclasses.replace(self, tip_ids=_check_tip_ids(tip_ids))


class ManoOutput(NamedTuple):
  vertices: jax.Array  # (B, 778, 3)
  joints: jax.Array  # (B, 16, 3) kinematic-chain joints in MANO order
  keypoints: jax.Array  # (B, 21, 3) OpenPose order: 16 joints + 5 fingertip vertices


def _check_tip_ids(tip_ids: Sequence[int]) -> tuple[int, ...]:
  tip_ids = tuple(int(i) for i in tip_ids)
  if len(tip_ids) != 5 or not all(0 <= i < NUM_VERTICES for i in tip_ids):
    raise ValueError(f"tip_ids must be 5 vertex ids in [0, {NUM_VERTICES}) ordered thumb, index, "
                     f"middle, ring, pinky; got {tip_ids}")
  return tip_ids


def make_mano_model(arrays: dict[str, np.ndarray], *, tip_ids: Sequence[int] = DELTADORSAL_TIP_IDS,
                    dtype: Any = jnp.float32) -> ManoModel:
  """Builds a ManoModel from validated file arrays (see `dd_jax.mano.io.validate_mano_arrays`).

  Args:
    arrays: numpy arrays with MANO's keys: v_template (778,3), f (1538,3), J_regressor (16,778)
      dense, weights (778,16), posedirs (778,3,135), shapedirs (778,3,10), hands_components
      (45,45), hands_mean (45,), kintree_table (2,16) or parents (16,).
    tip_ids: fingertip vertex ids in OpenPose order.
    dtype: floating dtype of the arrays (float64 needs jax x64 enabled).
  """
  f64 = lambda key: np.asarray(arrays[key], dtype=np.float64)
  v_template = f64("v_template")
  shapedirs = f64("shapedirs")[:, :, :NUM_BETAS]
  posedirs = f64("posedirs")
  j_regressor = f64("J_regressor")
  # Derived in float64, then cast: more accurate than regressing the shaped mesh per call.
  # Vertex-last (coordinate-major) columns make skinning run along contiguous vertices.
  shape_flat = shapedirs.transpose(2, 1, 0).reshape(NUM_BETAS, 3 * NUM_VERTICES)
  pose_flat = posedirs.transpose(2, 1, 0).reshape(-1, 3 * NUM_VERTICES)
  joint_shape = np.einsum("jv,vck->kjc", j_regressor, shapedirs).reshape(NUM_BETAS, -1)
  if "parents" in arrays:
    parents = [int(p) for p in np.asarray(arrays["parents"]).reshape(-1)]
  else:
    parents = [int(p) for p in np.asarray(arrays["kintree_table"])[0]]
  parents[0] = -1  # stored as 4294967295 in the official file
  jnp_dtype = jnp.dtype(dtype)
  cast = lambda x: jnp.asarray(np.asarray(x, dtype=np.float64), dtype=jnp_dtype)
  return ManoModel(
      v_template=cast(v_template),
      blend_directions=cast(np.concatenate([shape_flat, pose_flat], 0)),
      joint_template=cast(j_regressor @ v_template),
      joint_shape_directions=cast(joint_shape),
      j_regressor=cast(j_regressor),
      weights=cast(f64("weights")),
      hands_components=cast(f64("hands_components")),
      hands_mean=cast(f64("hands_mean").reshape(-1)),
      parents=tuple(parents),
      faces_static=_StaticArray(np.asarray(arrays["f"], dtype=np.int32)),
      tip_ids=_check_tip_ids(tip_ids),
  )


@functools.lru_cache(maxsize=None)
def _chain_plan(parents: tuple[int, ...]):
  """The tree in level order: (order, levels ((start, stop, parent positions), ...), inverse).

  `order` lists joints by depth, so each level is a contiguous block; parent positions index
  that order; `inverse[j]` is joint j's position in it.
  """
  depth = [0] * len(parents)
  for j in range(1, len(parents)):
    if not 0 <= parents[j] < j:
      raise ValueError(f"kinematic tree: parent of joint {j} is {parents[j]}; parents must "
                       "precede their children")
    depth[j] = depth[parents[j]] + 1
  order = sorted(range(len(parents)), key=lambda j: (depth[j], j))
  position = {j: i for i, j in enumerate(order)}
  levels = []
  for d in range(max(depth) + 1):
    members = [j for j in order if depth[j] == d]
    start = position[members[0]]
    parent_pos = tuple(position[parents[j]] for j in members) if d else ()
    levels.append((start, start + len(members), parent_pos))
  return tuple(order), tuple(levels), tuple(position[j] for j in range(len(parents)))


def _take(x: jax.Array, positions: Sequence[int]) -> jax.Array:
  """x[:, positions] as a slice or a broadcast when the positions allow (cheaper than a gather)."""
  first = positions[0]
  if list(positions) == list(range(first, first + len(positions))):
    return x[:, first:first + len(positions)]
  if all(p == first for p in positions):
    return jnp.broadcast_to(x[:, first:first + 1], (x.shape[0], len(positions)) + x.shape[2:])
  return x[:, np.asarray(positions)]


def _matmul3(a: jax.Array, b: jax.Array) -> jax.Array:
  """(..., 3, 3) @ (..., 3, 3) as multiply-adds (fuses with its neighbours; exact float32)."""
  return sum(a[..., :, k, None] * b[..., None, k, :] for k in range(3))


def _matvec3(a: jax.Array, v: jax.Array) -> jax.Array:
  """(..., 3, 3) @ (..., 3) as multiply-adds."""
  return sum(a[..., :, k] * v[..., k, None] for k in range(3))


def _rotations(pose: jax.Array, count: int, name: str, batch: int) -> jax.Array:
  """Axis-angle (B, 3*count) / (B, count, 3) or matrices (B, count, 3, 3) -> (B, count, 3, 3)."""
  if pose.shape[-2:] == (3, 3) and pose.size == batch * count * 9:
    return pose.reshape(batch, count, 3, 3)
  if pose.size == batch * count * 3:
    return geometry.axis_angle_to_matrix(pose.reshape(batch, count, 3))
  raise ValueError(f"{name}: expected ({batch}, {3 * count}) axis-angle or ({batch}, {count}, 3, 3) "
                   f"rotation matrices, got shape {pose.shape}")


def mano_forward(model: ManoModel, betas: jax.Array, hand_pose: jax.Array,
                 global_orient: jax.Array | None = None, transl: jax.Array | None = None, *,
                 flat_hand_mean: bool = True, num_pca_comps: int | None = None) -> ManoOutput:
  """Poses and shapes MANO; computes in the model's dtype.

  Args:
    model: the ManoModel.
    betas: (B, 10) shape coefficients.
    hand_pose: (B, 45) axis-angle of the 15 hand joints, (B, 15, 3, 3) rotation matrices, or
      (B, num_pca_comps) PCA coefficients when num_pca_comps is set.
    global_orient: None (identity), (B, 3) axis-angle or (B, 3, 3) / (B, 1, 3, 3) rotation.
    transl: None or (B, 3), added to every output.
    flat_hand_mean: False adds the model's hands_mean to the axis-angle pose (smplx's default
      for MANO is False; DeltaDorsal uses True).
    num_pca_comps: interpret hand_pose as coefficients of the first n hands_components.

  Returns:
    ManoOutput(vertices (B, 778, 3), joints (B, 16, 3), keypoints (B, 21, 3) in OpenPose order).
  """
  dtype = model.v_template.dtype
  betas = jnp.asarray(betas, dtype)
  hand_pose = jnp.asarray(hand_pose, dtype)
  if betas.ndim != 2 or betas.shape[1] != NUM_BETAS:
    raise ValueError(f"betas: expected (B, {NUM_BETAS}), got {betas.shape}")
  batch = betas.shape[0]
  if hand_pose.shape[0] != batch:
    raise ValueError(f"hand_pose batch {hand_pose.shape[0]} != betas batch {batch}")

  # ---- pose parameters -> 16 rotations
  if num_pca_comps is not None:
    if hand_pose.shape != (batch, num_pca_comps):
      raise ValueError(f"hand_pose: expected ({batch}, {num_pca_comps}) PCA coefficients, "
                       f"got {hand_pose.shape}")
    hand_pose = jnp.matmul(hand_pose, model.hands_components[:num_pca_comps], precision=_HIGHEST)
  is_matrix = hand_pose.ndim >= 3 and hand_pose.shape[-2:] == (3, 3)
  if not flat_hand_mean:
    if is_matrix:
      raise ValueError("flat_hand_mean=False adds hands_mean to an axis-angle pose; pass hand_pose "
                       "as (B, 45) axis-angle or PCA coefficients, not rotation matrices")
    hand_pose = hand_pose.reshape(batch, -1) + model.hands_mean
  hand_rot = _rotations(hand_pose, NUM_JOINTS - 1, "hand_pose", batch)
  if global_orient is None:
    root_rot = jnp.broadcast_to(jnp.eye(3, dtype=dtype), (batch, 1, 3, 3))
  else:
    root_rot = _rotations(jnp.asarray(global_orient, dtype), 1, "global_orient", batch)
  rot = jnp.concatenate([root_rot, hand_rot], axis=1)  # (B, 16, 3, 3)
  if transl is None:
    shift = jnp.zeros((batch, 3), dtype)
  else:
    shift = jnp.asarray(transl, dtype)
    if shift.size != batch * 3:
      raise ValueError(f"transl: expected ({batch}, 3), got {shift.shape}")
    shift = shift.reshape(batch, 3)

  # ---- per-hand quantities for the whole batch: blend coefficients, joint transforms, joints
  pose_feature = (rot[:, 1:] - jnp.eye(3, dtype=dtype)).reshape(batch, -1)  # (B, 135)
  coefficients = jnp.concatenate([betas, pose_feature], axis=1)  # (B, 145)
  joints_rest = model.joint_template + jnp.matmul(
      betas, model.joint_shape_directions, precision=_HIGHEST).reshape(batch, -1, 3)
  transforms, joints = _joint_transforms(model.parents, rot, joints_rest)
  joints = joints + shift[:, None]

  # ---- the mesh, in chunks so that each chunk's (chunk, 12, 778) skinning intermediate stays
  # in cache
  if batch <= _CHUNK:
    vertices = _posed_vertices(model, coefficients, transforms, shift)
  else:
    head = batch // _CHUNK * _CHUNK
    vertices = jax.lax.map(lambda args: _posed_vertices(model, *args), jax.tree.map(
        lambda x: x[:head].reshape((-1, _CHUNK) + x.shape[1:]),
        (coefficients, transforms, shift))).reshape(head, NUM_VERTICES, 3)
    if head < batch:
      vertices = jnp.concatenate([vertices, _posed_vertices(
          model, coefficients[head:], transforms[head:], shift[head:])])
  keypoints = jnp.concatenate([joints, vertices[:, np.asarray(model.tip_ids)]], axis=1)
  return ManoOutput(vertices=vertices, joints=joints,
                    keypoints=keypoints[:, np.asarray(OPENPOSE_SOURCE)])


_CHUNK = 256


def _joint_transforms(parents: tuple[int, ...], rot: jax.Array,
                      joints_rest: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotations (B, 16, 3, 3) (root first), rest joints (B, 16, 3) -> the skinning transforms
  (B, 12, 16) (rows: the flattened 3x3 rotation, then the translation, of each joint's rest-to-
  posed transform [R | t - R J_rest]) and the posed joints (B, 16, 3)."""
  batch = rot.shape[0]
  # Kinematic chain in level order, one batched step per tree level (4 for MANO):
  # G_j = G_parent(j) @ [R_j | J_j - J_parent(j)], G_0 = [R_0 | J_0]
  order, levels, inverse = _chain_plan(parents)
  rot = rot[:, np.asarray(order)]
  rest = joints_rest[:, np.asarray(order)]
  world_rot, world_t = [], []
  for start, stop, parent_pos in levels:
    if not parent_pos:
      world_rot.append(rot[:, start:stop])
      world_t.append(rest[:, start:stop])
      continue
    done_rot = jnp.concatenate(world_rot, axis=1) if len(world_rot) > 1 else world_rot[0]
    done_t = jnp.concatenate(world_t, axis=1) if len(world_t) > 1 else world_t[0]
    parent_rot, parent_t = _take(done_rot, parent_pos), _take(done_t, parent_pos)
    local_t = rest[:, start:stop] - _take(rest, parent_pos)
    world_rot.append(_matmul3(parent_rot, rot[:, start:stop]))
    world_t.append(_matvec3(parent_rot, local_t) + parent_t)
  world_rot = jnp.concatenate(world_rot, axis=1)  # (B, 16, 3, 3), level order
  world_t = jnp.concatenate(world_t, axis=1)
  offset = world_t - _matvec3(world_rot, rest)
  transforms = jnp.concatenate([world_rot.reshape(batch, -1, 9), offset], axis=-1)
  transforms = transforms[:, np.asarray(inverse)].transpose(0, 2, 1)  # (B, 12, 16), joint order
  return transforms, world_t[:, np.asarray(inverse)]


def _posed_vertices(model: ManoModel, coefficients: jax.Array, transforms: jax.Array,
                    shift: jax.Array) -> jax.Array:
  """Blend coefficients (B, 145), skinning transforms (B, 12, 16), translation (B, 3) -> the
  posed vertices (B, 778, 3)."""
  batch = coefficients.shape[0]
  # Shape and pose blend shapes in one matmul: (B, 3, 778), vertices last.
  v_posed = model.v_template.T + jnp.matmul(
      coefficients, model.blend_directions, precision=_HIGHEST).reshape(batch, 3, NUM_VERTICES)
  # Skinning: blend the joint transforms per vertex with one matmul (B*12, 16) x (16, 778),
  # whose output needs no transpose, then apply them along the contiguous vertex axis.
  blended = jax.lax.dot_general(
      transforms.reshape(batch * 12, -1), model.weights, (((1,), (1,)), ((), ())),
      precision=_HIGHEST).reshape(batch, 12, NUM_VERTICES)
  # Written out as multiply-adds: XLA:CPU reduces a size-3 middle axis ~40x slower.
  return jnp.stack([
      blended[:, 3 * i] * v_posed[:, 0] + blended[:, 3 * i + 1] * v_posed[:, 1]
      + blended[:, 3 * i + 2] * v_posed[:, 2] + blended[:, 9 + i] + shift[:, i, None]
      for i in range(3)], axis=-1)


def mano_keypoints(model: ManoModel, betas: jax.Array, hand_pose: jax.Array,
                   **kwargs: Any) -> jax.Array:
  """Shortcut for mano_forward(...).keypoints: (B, 21, 3) OpenPose-order keypoints."""
  return mano_forward(model, betas, hand_pose, **kwargs).keypoints
