"""Reading and writing MANO model files without chumpy or scipy (SPEC.md section 3).

Reads the official MANO_RIGHT.pkl (Python-2 pickle with chumpy Ch / Select and a scipy csc_matrix)
through `dd_jax.safe_pickle.restricted_load` with inert stand-ins for those classes, chumpy-free
("cleaned") pickles and `.npz` exports of the same keys. Writes all three layouts (the official
one is emitted byte-compatibly, naming chumpy/scipy globals without importing them).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from dd_jax import safe_pickle
from dd_jax.mano import model as mano_model

ROOT_PARENT_STORED = 4294967295  # uint32(-1): how the official file stores the root's parent

EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "v_template": (mano_model.NUM_VERTICES, 3),
    "f": (mano_model.NUM_FACES, 3),
    "J_regressor": (mano_model.NUM_JOINTS, mano_model.NUM_VERTICES),
    "weights": (mano_model.NUM_VERTICES, mano_model.NUM_JOINTS),
    "posedirs": (mano_model.NUM_VERTICES, 3, 9 * (mano_model.NUM_JOINTS - 1)),
    "shapedirs": (mano_model.NUM_VERTICES, 3, mano_model.NUM_BETAS),
    "hands_components": (mano_model.NUM_POSE_PARAMS, mano_model.NUM_POSE_PARAMS),
    "hands_mean": (mano_model.NUM_POSE_PARAMS,),
    "kintree_table": (2, mano_model.NUM_JOINTS),
}
OPTIONAL_KEYS = ("J", "hands_coeffs", "bs_style", "bs_type")


# ---------------------------------------------------------------- stand-ins for pickled classes


class _StateHolder:
  """Inert object that only records the state a pickle gives it (never runs third-party code).

  Each load gets its own subclass (`safe_pickle.fresh_subclass`); an instance takes one BUILD.
  """
  pickled_fields = ("state",)

  def __setstate__(self, state: Any) -> None:
    if "state" in self.__dict__:
      raise safe_pickle.Refusal(f"a second BUILD on a {type(self).__name__}")
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
      if not all(s is None or isinstance(s, dict) for s in state):
        raise safe_pickle.Refusal(f"{type(self).__name__}: unexpected state {type(state)}")
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise safe_pickle.Refusal(f"{type(self).__name__}: unexpected state {type(state)}")
    self.state = state

  def get(self, key: str, source: str) -> Any:
    try:
      return self.state[key]
    except (AttributeError, KeyError, TypeError):
      raise ValueError(f"{source}: pickled {type(self).__name__} has no '{key}' in its state") from None


class ChumpyCh(_StateHolder):
  """Stands in for chumpy.ch.Ch: the state's 'x' holds the array."""


class ChumpySelect(_StateHolder):
  """Stands in for chumpy.reordering.Select: a.x.ravel()[idxs].reshape(preferred_shape)."""


class ScipyCscMatrix(_StateHolder):
  """Stands in for scipy.sparse.csc_matrix: data, indices, indptr and _shape in the state."""


def _latin1_encode(load: Any, text: Any, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` as Python-3 protocol-2 pickles use it for bytes; only latin1 allowed."""
  del load
  if (not isinstance(text, str) or not isinstance(encoding, str)
      or encoding.lower().replace("_", "-") not in ("latin1", "latin-1")):
    raise safe_pickle.Refusal(f"_codecs.encode: only (str, 'latin1') is allowed, got "
                              f"{encoding!r:.40}")
  return text.encode("latin1")


def _stand_in(cls: type, name: str):
  return lambda load: safe_pickle.fresh_subclass(cls, name)


# Exactly what the official file names (SPEC.md section 3) plus the same classes under the module
# paths newer numpy / scipy / Python 3 write ("cleaned" pickles); everything else is refused.
MANO_GLOBALS: dict[tuple[str, str], Any] = {
    **safe_pickle.NUMPY_GLOBALS,
    ("__builtin__", "set"): safe_pickle.CONTAINER_GLOBALS[("__builtin__", "set")],
    ("builtins", "set"): safe_pickle.CONTAINER_GLOBALS[("builtins", "set")],
    ("chumpy.ch", "Ch"): _stand_in(ChumpyCh, "chumpy.ch.Ch"),
    ("chumpy.reordering", "Select"): _stand_in(ChumpySelect, "chumpy.reordering.Select"),
    ("scipy.sparse.csc", "csc_matrix"): _stand_in(ScipyCscMatrix, "scipy.sparse.csc_matrix"),
    ("scipy.sparse._csc", "csc_matrix"): _stand_in(ScipyCscMatrix, "scipy.sparse.csc_matrix"),
    ("_codecs", "encode"): safe_pickle._factory(  # pylint: disable=protected-access
        "_codecs.encode", _latin1_encode),
}


def _to_array(value: Any, key: str, source: str) -> Any:
  """Evaluates stand-ins to numpy arrays; strings and plain arrays pass through."""
  if isinstance(value, ChumpyCh):
    return _to_array(value.get("x", f"{source}: key '{key}'"), key, source)
  if isinstance(value, ChumpySelect):
    where = f"{source}: key '{key}'"
    base = np.asarray(_to_array(value.get("a", where), key, source))
    idxs = np.asarray(value.get("idxs", where), dtype=np.int64).reshape(-1)
    shape = tuple(int(s) for s in np.atleast_1d(value.get("preferred_shape", where)))
    if idxs.size and (idxs.min() < 0 or idxs.max() >= base.size):
      raise ValueError(f"{where}: Select indices out of range for an array of {base.size} values")
    return base.ravel()[idxs].reshape(shape)
  if isinstance(value, ScipyCscMatrix):
    return _csc_to_dense(value, key, source)
  if isinstance(value, (str, bytes)):
    return value
  return np.asarray(value)


def _csc_to_dense(matrix: ScipyCscMatrix, key: str, source: str) -> np.ndarray:
  where = f"{source}: key '{key}'"
  state = getattr(matrix, "state", {})
  shape = state.get("_shape", state.get("shape"))
  if shape is None:
    raise ValueError(f"{where}: pickled csc_matrix has no '_shape' in its state")
  if tuple(shape) != EXPECTED_SHAPES.get(key):
    raise ValueError(f"{where}: csc_matrix of shape {shape!r:.80}, expected "
                     f"{EXPECTED_SHAPES.get(key)}")
  rows, cols = (int(s) for s in shape)
  data = np.asarray(matrix.get("data", where), dtype=np.float64)
  indices = np.asarray(matrix.get("indices", where), dtype=np.int64)
  indptr = np.asarray(matrix.get("indptr", where), dtype=np.int64)
  if (indptr.shape != (cols + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
      or indptr[-1] != data.size or indices.size != data.size
      or (indices.size and (indices.min() < 0 or indices.max() >= rows))):
    raise ValueError(f"{where}: inconsistent csc_matrix (shape {(rows, cols)}, indptr "
                     f"{indptr.shape}, {indices.size} indices, {data.size} values)")
  dense = np.zeros((rows, cols), dtype=np.float64)
  np.add.at(dense, (indices, np.repeat(np.arange(cols), np.diff(indptr))), data)
  return dense


# ---------------------------------------------------------------- reading


def read_mano_arrays(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a MANO file (.pkl official or cleaned, or .npz) into validated numpy arrays.

  Returns float64 arrays for every key of EXPECTED_SHAPES (J_regressor dense), 'f' as int64,
  'parents' (16,) int64 with -1 at the root, and the optional keys that are present.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"MANO model file not found: {path}")
  try:
    raw = _read_npz(path) if path.endswith(".npz") else safe_pickle.restricted_load(
        path, MANO_GLOBALS, source=path, encoding="latin1")
    if not isinstance(raw, dict):
      raise ValueError(f"{path}: expected a dict of MANO arrays, got {type(raw).__name__}")
    arrays = {key: _to_array(value, key, path) for key, value in raw.items()
              if key in EXPECTED_SHAPES or key in OPTIONAL_KEYS}
  except (TypeError, AttributeError, IndexError, KeyError, OverflowError, RecursionError,
          MemoryError) as e:
    raise ValueError(f"{path}: not a usable MANO file ({type(e).__name__}: {e})") from None
  return validate_mano_arrays(arrays, source=path)


def _read_npz(path: str) -> dict[str, Any]:
  """The MANO keys of an .npz: each member's header is checked (plain dtype, declared size under
  the caps) before its data is decompressed; pickled object arrays are refused."""
  load = safe_pickle.Load(path, os.path.getsize(path))
  raw = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        key = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else None
        if key not in EXPECTED_SHAPES and key not in OPTIONAL_KEYS:
          continue
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
          raise ValueError(f"{path}: key '{key}': compression method {info.compress_type} is "
                           f"not accepted (np.savez stores, np.savez_compressed deflates)")
        with archive.open(info) as f:
          try:
            raw[key] = safe_pickle.read_npy_stream(f, info.file_size, load, allow_pickle=False)
          except safe_pickle.Refusal as e:
            raise safe_pickle.RefusedFileError(f"{path}: refused: key '{key}': {e}") from None
  except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
    raise ValueError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
  return raw


def validate_mano_arrays(arrays: dict[str, Any], source: str = "<MANO arrays>") -> dict[str, Any]:
  """Checks keys, shapes, finiteness and the kinematic tree; returns normalised copies.

  Raises ValueError naming the source and the key that is wrong and what was expected.
  """
  missing = [key for key in EXPECTED_SHAPES if key not in arrays]
  if missing:
    raise ValueError(f"{source}: missing MANO key(s) {missing} (present: {sorted(arrays)})")
  out: dict[str, Any] = {}
  for key, shape in EXPECTED_SHAPES.items():
    value = arrays[key]
    if isinstance(value, (str, bytes)) or not np.issubdtype(np.asarray(value).dtype, np.number):
      raise ValueError(f"{source}: key '{key}' should be a numeric array of shape {shape}, got "
                       f"{type(value).__name__}")
    value = np.asarray(value)
    if value.shape != shape:
      raise ValueError(f"{source}: key '{key}' has shape {value.shape}, expected {shape}")
    if key in ("f", "kintree_table"):
      if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{source}: key '{key}' should hold integers, got {value.dtype}")
      out[key] = value.astype(np.int64)
    else:
      value = value.astype(np.float64)
      if not np.all(np.isfinite(value)):
        raise ValueError(f"{source}: key '{key}' contains non-finite values")
      out[key] = value
  faces = out["f"]
  if faces.min() < 0 or faces.max() >= mano_model.NUM_VERTICES:
    raise ValueError(f"{source}: key 'f' has vertex ids outside [0, {mano_model.NUM_VERTICES})")
  parents = out["kintree_table"][0].copy()
  if parents[0] not in (-1, ROOT_PARENT_STORED):
    raise ValueError(f"{source}: key 'kintree_table' root parent is {parents[0]}, expected "
                     f"{ROOT_PARENT_STORED} or -1")
  parents[0] = -1
  if tuple(parents.tolist()) != mano_model.MANO_PARENTS:
    raise ValueError(f"{source}: key 'kintree_table' parents {parents.tolist()} differ from "
                     f"MANO's {list(mano_model.MANO_PARENTS)}")
  out["parents"] = parents
  for key in OPTIONAL_KEYS:
    if key in arrays:
      value = arrays[key]
      out[key] = value if isinstance(value, (str, bytes)) else np.asarray(value)
      if isinstance(out[key], np.ndarray) and out[key].dtype.kind in "US":
        out[key] = str(out[key])
  return out


def load_mano(path: str | os.PathLike, *, tip_ids: Sequence[int] = mano_model.DELTADORSAL_TIP_IDS,
              dtype: Any = jnp.float32) -> mano_model.ManoModel:
  """Loads MANO_RIGHT.pkl (official chumpy layout), a cleaned .pkl or an .npz as a ManoModel."""
  return mano_model.make_mano_model(read_mano_arrays(path), tip_ids=tip_ids, dtype=dtype)


def load_mano_or_synthetic(path: str | os.PathLike = "", *,
                           tip_ids: Sequence[int] = mano_model.DELTADORSAL_TIP_IDS,
                           dtype: Any = jnp.float32) -> mano_model.ManoModel:
  """config.mano.path semantics: a MANO file (any layout) or, for "", the synthetic hand of the
  tests and the demo (dd_jax.synthetic.hand, imported only then)."""
  if os.fspath(path):
    return load_mano(path, tip_ids=tip_ids, dtype=dtype)
  from dd_jax.synthetic import hand  # pylint: disable=import-outside-toplevel
  return hand.synthetic_mano_model(tip_ids=tip_ids, dtype=dtype)


# ---------------------------------------------------------------- writing


class _GlobalRef:
  """A class reference the writer emits as GLOBAL 'module name' without importing the module."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


_CH = _GlobalRef("chumpy.ch", "Ch")
_SELECT = _GlobalRef("chumpy.reordering", "Select")
_CSC = _GlobalRef("scipy.sparse.csc", "csc_matrix")


class _Placeholder:
  """An object pickled as `cls.__new__(cls)` + BUILD(state), like new-style Python-2 objects."""

  def __init__(self, cls: _GlobalRef, state: dict[str, Any]):
    self.cls, self.state = cls, state


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Protocol-2 pickler emitting what Python 2 wrote: byte strings as BINSTRING, numpy's array
  reconstructor under `numpy.core.multiarray`, and placeholder classes under their original names."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def reducer_override(self, obj):
    if isinstance(obj, _Placeholder):
      return (_new_object, (obj.cls,), obj.state)
    return NotImplemented

  def save_global(self, obj, name=None):
    if isinstance(obj, _GlobalRef):
      module, name = obj.module, obj.name
    elif obj is _numpy_reconstruct():
      module, name = "numpy.core.multiarray", "_reconstruct"
    else:
      return super().save_global(obj, name)
    self.write(pickle.GLOBAL + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n")
    self.memoize(obj)

  def save_reduce(self, func, args, state=None, listitems=None, dictitems=None, state_setter=None,
                  *, obj=None):
    if func is _new_object:  # class placeholder: GLOBAL, EMPTY_TUPLE, NEWOBJ, then BUILD
      self.save_global(args[0])
      self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
      if obj is not None:
        self.memoize(obj)
      self.save(state)
      self.write(pickle.BUILD)
      return
    super().save_reduce(func, args, state, listitems, dictitems, state_setter, obj=obj)

  def save_bytes(self, obj):
    size = len(obj)
    if size < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_bytes
  dispatch[_GlobalRef] = save_global


def _new_object(cls):  # marker only; never called
  raise NotImplementedError


def _numpy_reconstruct():
  return np._core.multiarray._reconstruct  # pylint: disable=protected-access


def official_layout(arrays: dict[str, Any], *, extra_shape_components: int = 2) -> dict[str, Any]:
  """Wraps arrays as the official file holds them: shapedirs as a Select over a Ch with extra
  (unused) components, J_regressor as a csc_matrix, kintree_table root stored as 4294967295."""
  shapedirs = np.asarray(arrays["shapedirs"], dtype=np.float64)
  num_vertices, _, num_betas = shapedirs.shape
  padded = np.concatenate(
      [shapedirs, np.zeros((num_vertices, 3, extra_shape_components))], axis=2)
  idxs = np.arange(padded.size).reshape(padded.shape)[:, :, :num_betas].ravel()
  ch = _Placeholder(_CH, {"x": padded, "_dirty_vars": set(), "_itr": None})
  select = _Placeholder(_SELECT, {"a": ch, "idxs": idxs, "preferred_shape": shapedirs.shape,
                                  "_dirty_vars": set()})
  regressor = np.asarray(arrays["J_regressor"], dtype=np.float64)
  rows, cols = np.nonzero(regressor.T)  # column-major order: CSC
  indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=regressor.shape[1]))])
  csc = _Placeholder(_CSC, {"data": regressor.T[rows, cols], "indices": cols.astype(np.int32),
                            "indptr": indptr.astype(np.int32), "_shape": regressor.shape,
                            "maxprint": 50})
  kintree = np.array(arrays["kintree_table"], dtype=np.int64)
  kintree[0, 0] = ROOT_PARENT_STORED
  out = dict(arrays)
  out.update(shapedirs=select, J_regressor=csc, kintree_table=kintree,
             f=np.asarray(arrays["f"], dtype=np.uint32))
  return out


def write_mano(arrays: dict[str, Any], path: str | os.PathLike, layout: str = "official") -> None:
  """Writes MANO arrays as 'official' (chumpy/scipy layout, Python-2 protocol-2 pickle),
  'cleaned' (plain numpy pickle that `pickle.load` and smplx read) or 'npz'."""
  path = os.fspath(path)
  plain = {}
  for key, value in arrays.items():
    if key == "parents":
      continue
    plain[key] = value if isinstance(value, str) else np.asarray(value)
  if layout == "official":
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(official_layout(plain))
    data = buffer.getvalue()
  elif layout == "cleaned":
    data = pickle.dumps(plain, protocol=4)
  elif layout == "npz":
    with open(path, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in plain.items()})
    return
  else:
    raise ValueError(f"layout must be 'official', 'cleaned' or 'npz', got {layout!r}")
  with open(path, "wb") as f:
    f.write(data)
