"""Copying nested parameter dicts into NNX modules; the converted-weights folder format."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# nnx.List children (DinoV3.blocks) have int indices in nnx.to_pure_dict; file names are strings.
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


def _assign(module: nnx.Module, shapes: dict[str, tuple], make, source: str,
            allow_missing: tuple[str, ...]) -> None:
  """Fills `module`'s variables named in `shapes` with make(key, old value, dtype) after
  checking that they fit (fit_problems, all problems in one error naming `source`)."""
  state = nnx.state(module)
  current = {path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
  problems = fit_problems(state, shapes, allow_missing=allow_missing)
  if problems:
    raise ValueError(f"{source}: does not fit the {type(module).__name__}:\n  "
                     + "\n  ".join(problems))
  pure: dict = {}
  for key in shapes:
    path, var = current[key]
    node = pure
    for part in path[:-1]:
      node = node.setdefault(part, {})
    # var.get_value(), not var[...]: the latter fails on an abstract (eval_shape) variable.
    node[path[-1]] = make(key, var.get_value(), var.dtype)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


def assign_params(module: nnx.Module, params: dict, *, source: str = "params",
                  allow_missing: tuple[str, ...] = ()) -> None:
  """Copies a nested dict of arrays (the layout of nnx.to_pure_dict(nnx.state(module)); block
  indices int or str) into `module` with nnx.update.

  What must fit is `fit_problems`'s rule. Arrays take the existing variables' dtype and
  sharding, so this works on a sharded model (and on an abstract one from nnx.eval_shape, whose
  arrays then land on the default device). All problems are reported at once, naming `source`.
  """
  given = {path_str(path): value for path, value in flatten_params(params)}

  def make(key, old, dtype):
    new = jnp.asarray(given[key], dtype=dtype)
    return jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new

  _assign(module, {k: jnp.shape(v) for k, v in given.items()}, make, source, allow_missing)


# --- converted folders -------------------------------------------------------------------------
# What the converters write (DINOv3, HaMeR, DeltaDorsal Lightning): a folder holding a meta JSON
# ({"format": ..., "format_version": CONVERTED_VERSION, "num_params": int, "arrays": {dotted path:
# shape}, ...the format's own fields}) and params/<dotted path>.npy, one float32 array each.
# One file per array lets a converter write each array as soon as it is made and a loader read
# only the slices its devices hold (np.load's memory map). v1 held params/ as an Orbax checkpoint.

CONVERTED_VERSION = 2
PARAMS_DIR = "params"


class ConvertedWriter:
  """Writes a converted folder array by array (`write`), then `commit(meta)`.

  Everything goes to a hidden `<out_dir>.partial-*` folder beside `out_dir` (made at the first
  write); commit writes the meta JSON last and renames the folder into place, replacing an earlier
  converted folder only then. Leaving the `with` block on an exception deletes the partial
  folder: a failed conversion leaves nothing that looks valid, and what was there stays.
  """

  def __init__(self, out_dir: str | os.PathLike, meta_file: str):
    self.out_dir = os.path.abspath(os.fspath(out_dir))
    self.meta_file = meta_file
    self.shapes: dict[str, list[int]] = {}
    self._tmp: str | None = None
    if os.path.exists(self.out_dir) and (
        not os.path.isdir(self.out_dir)
        or (os.listdir(self.out_dir) and not os.path.isfile(os.path.join(self.out_dir,
                                                                          meta_file)))):
      raise FileExistsError(f"{self.out_dir}: exists and is not a converted folder (no "
                            f"{meta_file}); not replacing it")

  def __enter__(self) -> ConvertedWriter:
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is not None and self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None

  def _folder(self) -> str:
    if self._tmp is None:
      parent, name = os.path.split(self.out_dir)
      os.makedirs(parent, exist_ok=True)
      self._tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
      os.mkdir(os.path.join(self._tmp, PARAMS_DIR))
    return self._tmp

  def write(self, path: tuple, array: Any) -> None:
    """Writes one array (as float32) now; `path` as in flatten_params."""
    key = path_str(path)
    if key in self.shapes:
      raise ValueError(f"{self.out_dir}: {key} written twice")
    array = np.ascontiguousarray(array, dtype=np.float32)
    np.save(os.path.join(self._folder(), PARAMS_DIR, key + ".npy"), array, allow_pickle=False)
    self.shapes[key] = list(array.shape)

  @property
  def num_params(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes.values())

  def commit(self, meta: dict) -> dict:
    """Writes the meta JSON (`meta` + format_version, num_params, arrays) and moves the folder
    into place; returns the meta written."""
    meta = {**meta, "format_version": CONVERTED_VERSION, "num_params": self.num_params,
            "arrays": self.shapes}
    folder = self._folder()
    with open(os.path.join(folder, self.meta_file), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=list)
    old = None
    if os.path.exists(self.out_dir):
      old = folder + ".replaced"
      os.rename(self.out_dir, old)
    os.rename(folder, self.out_dir)
    self._tmp = None
    if old is not None:
      shutil.rmtree(old)
    return meta


def write_converted(out_dir: str | os.PathLike, meta_file: str, meta: dict, params: dict) -> dict:
  """A nested dict of arrays -> a converted folder (ConvertedWriter); returns the meta written."""
  with ConvertedWriter(out_dir, meta_file) as writer:
    for path, value in flatten_params(params):
      writer.write(path, value)
    return writer.commit(meta)


def read_converted_meta(out_dir: str | os.PathLike, meta_file: str, fmt: str, tool: str) -> dict:
  """The meta JSON of a converted folder of format `fmt`, checked (format and version); `tool`
  is named in the errors as what writes one."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  meta_path = os.path.join(out_dir, meta_file)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{out_dir}: no {meta_file}; convert with {tool} first")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  found, version = (meta.get("format"), meta.get("format_version")) if isinstance(meta, dict) \
      else (None, None)
  if found != fmt or version != CONVERTED_VERSION:
    hint = (f"; v1 folders (Orbax params/) are no longer read: re-run {tool} on the original "
            f"file" if found == fmt and version == 1 else "")
    raise ValueError(f"{meta_path}: format {found!r} v{version}, expected {fmt!r} "
                     f"v{CONVERTED_VERSION}{hint}")
  return meta


def converted_arrays(out_dir: str | os.PathLike, meta: dict) -> dict[str, np.ndarray]:
  """{dotted path: read-only memory map} of a converted folder whose meta is `meta`; nothing is
  read but the .npy headers, each checked against the meta's shape."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  arrays = {}
  for key, shape in meta["arrays"].items():
    path = os.path.join(out_dir, PARAMS_DIR, key + ".npy")
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: unreadable ({e}); re-run the converter") from None
    if array.shape != tuple(shape) or array.dtype != np.float32:
      raise ValueError(f"{path}: {array.shape} x {array.dtype}, the meta says {tuple(shape)} x "
                       f"float32; re-run the converter")
    arrays[key] = array
  return arrays


def read_slice(array: np.ndarray, index: tuple) -> np.ndarray:
  """The part `index` (a tuple of slices) of a memory-mapped array, read into memory: all that
  load_converted_into reads for one device."""
  return np.array(array[index])


def load_converted_tree(out_dir: str | os.PathLike, meta: dict) -> dict:
  """The arrays of a converted folder as a nested dict of np.float32 (`blocks` children keyed by
  int), read in full."""
  tree: dict = {}
  for key, array in converted_arrays(out_dir, meta).items():
    parts = key.split(".")
    path = [int(p) if i and parts[i - 1] in _INT_KEYED else p for i, p in enumerate(parts)]
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = read_slice(array, ())
  return tree


def load_converted_into(module: nnx.Module, out_dir: str | os.PathLike, meta: dict, *,
                        allow_missing: tuple[str, ...] = ()) -> None:
  """Fills `module` from a converted folder (what must fit: assign_params's rule, all problems
  at once). A variable holding a jax.Array keeps its sharding and is made with
  jax.make_array_from_callback: each process reads from the file only the slices its own devices
  hold (read_slice), and no full float32 tree is ever built."""
  arrays = converted_arrays(out_dir, meta)

  def make(key, old, dtype):
    array = arrays[key]
    if isinstance(old, jax.Array):
      return jax.make_array_from_callback(
          array.shape, old.sharding, lambda index: read_slice(array, index).astype(dtype))
    return jnp.asarray(read_slice(array, ()), dtype=dtype)

  _assign(module, {k: v.shape for k, v in arrays.items()}, make, os.fspath(out_dir),
          allow_missing)
