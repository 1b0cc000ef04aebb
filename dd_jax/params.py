"""Copying nested parameter dicts into NNX modules and saving / loading them as Orbax trees."""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# nnx.List children (DinoV3.blocks) have int indices in nnx.to_pure_dict; Orbax keys are strings.
_INT_KEYED = ("blocks",)


def flatten_params(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """Yields (path tuple, leaf) of a nested dict of arrays."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from flatten_params(value, prefix + (key,))
  else:
    yield prefix, tree


def path_str(path: tuple) -> str:
  """("blocks", 1, "attn") -> "blocks.1.attn"."""
  return ".".join(str(p) for p in path)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs: a nested params dict, an
  nnx.State (e.g. nnx.state(model, nnx.Param) of an nnx.eval_shape model)."""
  return int(sum(math.prod(np.shape(x) if not hasattr(x, "shape") else x.shape)
                 for x in jax.tree.leaves(tree)))


def _listing(label: str, keys: list[str]) -> str:
  count = f" ({len(keys)} in all)" if len(keys) > 1 else ""
  return f"{label}: " + ", ".join(keys) + count


def fit_problems(state: nnx.State, shapes: dict[str, tuple], *,
                 allow_missing: tuple[str, ...] = ()) -> list[str]:
  """What keeps arrays of `shapes` ({"blocks.1.attn...": shape}) from filling `state`: every
  nnx.Param must be given (except under the dotted prefixes `allow_missing`) with its exact
  shape; other variables (RoPE periods) are optional; nothing else may be given."""
  current = {path_str(path): var for path, var in nnx.to_flat_state(state)}
  problems = []
  unexpected = sorted(set(shapes) - set(current))
  missing = sorted(k for k, var in current.items()
                   if k not in shapes and isinstance(var, nnx.Param)
                   and not any(k == p or k.startswith(p + ".") for p in allow_missing))
  if missing:
    problems.append(_listing("missing", missing))
  if unexpected:
    problems.append(_listing("unexpected", unexpected))
  for key, shape in shapes.items():
    if key in current and tuple(shape) != tuple(current[key].shape):
      problems.append(f"{key}: shape {tuple(shape)}, model expects {tuple(current[key].shape)}")
  return problems


def assign_params(module: nnx.Module, params: dict, *, source: str = "params",
                  allow_missing: tuple[str, ...] = ()) -> None:
  """Copies a nested dict of arrays (the layout of nnx.to_pure_dict(nnx.state(module)); block
  indices int or str) into `module` with nnx.update.

  What must fit is `fit_problems`'s rule. Arrays take the existing variables' dtype and
  sharding, so this works on a sharded model (and on an abstract one from nnx.eval_shape, whose
  arrays then land on the default device). All problems are reported at once, naming `source`.
  """
  state = nnx.state(module)
  current = {path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
  given = {path_str(path): value for path, value in flatten_params(params)}
  problems = fit_problems(state, {k: jnp.shape(v) for k, v in given.items()},
                          allow_missing=allow_missing)
  if problems:
    raise ValueError(f"{source}: does not fit the {type(module).__name__}:\n  "
                     + "\n  ".join(problems))
  pure: dict = {}
  for key, value in given.items():
    path, var = current[key]
    old = var.get_value()  # var[...] fails on an abstract (eval_shape) variable
    new = jnp.asarray(value, dtype=var.dtype)
    if isinstance(old, jax.Array):
      new = jax.device_put(new, old.sharding)
    node = pure
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = new
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


def _to_saved_tree(tree: dict) -> dict:
  return {str(k): _to_saved_tree(v) if isinstance(v, dict) else np.asarray(v, np.float32)
          for k, v in tree.items()}


def _from_saved_tree(tree: dict, parent: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    key = int(key) if parent in _INT_KEYED else key
    out[key] = _from_saved_tree(value, str(key)) if isinstance(value, dict) else np.asarray(value)
  return out


def save_tree(directory: str | os.PathLike, params: dict) -> None:
  """Writes a nested dict of arrays to `directory` (an Orbax PyTree checkpoint, replacing any
  earlier one): every array float32, every key a string."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.fspath(directory)), _to_saved_tree(params), force=True)


def load_tree(directory: str | os.PathLike) -> dict:
  """Reads a save_tree folder -> nested dict of np arrays, `blocks` children keyed by int."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  directory = os.path.abspath(os.fspath(directory))
  with ocp.PyTreeCheckpointer() as checkpointer:
    structure = checkpointer.metadata(directory).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
    tree = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return _from_saved_tree(tree)
