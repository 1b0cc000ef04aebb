"""Loading pickles without running their code: an unpickler that admits only named globals.

MANO files, DINOv3 `.pth` files, Lightning `.ckpt` files and the EgoDorsal `.npy` dicts are all
pickles. `pickle.load` on them would execute whatever callable the file names; these helpers
resolve only the globals a caller lists and refuse everything else, naming the global and the file.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

Allowlist = Mapping[tuple[str, str], Any]
# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's ast is not thread-safe
# (gh-106905: "AST constructor recursion depth mismatch" when Grain's reader threads parse
# headers at once). Headers are parsed under this lock.
_NPY_HEADER_LOCK = threading.Lock()


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle named a global outside the allowlist; nothing from the file was executed."""


def _numpy_reconstruct():
  return np._core.multiarray._reconstruct  # pylint: disable=protected-access


def _numpy_scalar():
  return np._core.multiarray.scalar  # pylint: disable=protected-access


# What pickled numpy arrays and scalars need, under numpy 1.x (`numpy.core`) and 2.x
# (`numpy._core`) module names. `numpy.dtype` and `numpy.ndarray` are types whose
# reconstruction only fills in data.
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
  NUMPY_GLOBALS[(_module, "_reconstruct")] = _numpy_reconstruct()
  NUMPY_GLOBALS[(_module, "scalar")] = _numpy_scalar()
NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype

class StateDict(dict):
  """What a pickled collections.OrderedDict becomes: a dict that also takes `_metadata`.

  torch's `module.state_dict()` is an OrderedDict carrying a `_metadata` attribute (each
  submodule's version), which its pickle restores with BUILD; a plain dict cannot take it.
  Any other attribute is refused.
  """
  __slots__ = ("_metadata",)

  def __setstate__(self, state: Any) -> None:
    if (not isinstance(state, dict) or set(state) - {"_metadata"}
        or not isinstance(state.get("_metadata", {}), dict)):
      raise pickle.UnpicklingError(
          f"collections.OrderedDict: only a dict `_metadata` attribute is accepted, got "
          f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    self._metadata = state.get("_metadata")


# Plain containers some pickles name explicitly (protocol 2 writes sets as a global call).
CONTAINER_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("collections", "OrderedDict"): StateDict,
}


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file: BinaryIO, allowed: Allowlist, source: str,
               persistent_load: Callable[[Any], Any] | None, encoding: str):
    super().__init__(file, encoding=encoding)
    self._allowed = allowed
    self._source = source
    self._persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self._allowed)) or "none"
      raise UnsafePickleError(
          f"{self._source}: refusing to load global '{module}.{name}' "
          f"(not in the allowlist: {allowed}); nothing from the file was executed") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent_load is None:
      raise UnsafePickleError(f"{self._source}: unexpected persistent id {pid!r}")
    return self._persistent_load(pid)


def restricted_load(file: str | os.PathLike | bytes | BinaryIO, allowed: Allowlist, *,
                    source: str | None = None, encoding: str = "ASCII",
                    persistent_load: Callable[[Any], Any] | None = None) -> Any:
  """Unpickles `file` (a path, bytes or binary stream), resolving only globals in `allowed`.

  `allowed` maps (module, name) to the object to use; an entry may substitute a stand-in
  (e.g. a class that records a chumpy object's state). Python-2 pickles need encoding='latin1'.
  """
  if isinstance(file, (str, os.PathLike)):
    with open(file, "rb") as f:
      return restricted_load(f, allowed, source=source or os.fspath(file), encoding=encoding,
                             persistent_load=persistent_load)
  if isinstance(file, (bytes, bytearray)):
    file = io.BytesIO(file)
  unpickler = _RestrictedUnpickler(file, allowed, source or "<pickle>", persistent_load, encoding)
  try:
    return unpickler.load()
  except UnsafePickleError:
    raise
  except Exception as e:  # truncated or corrupt data
    raise pickle.UnpicklingError(f"{source or '<pickle>'}: not a readable pickle ({e})") from e


def load_npy(path: str | os.PathLike) -> Any:
  """Reads an `.npy` file like `np.load(path, allow_pickle=True)`, without executing code.

  Numeric arrays are returned as arrays. Object arrays (np.save of a dict, as the EgoDorsal
  annotation and HaMeR files are) are unpickled admitting only numpy arrays, scalars, dicts,
  lists and tuples; a 0-d object array is unwrapped to the object it holds.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      with _NPY_HEADER_LOCK:
        shape, fortran_order, dtype = read_header(f)
    except Exception as e:
      raise ValueError(f"{path}: not a valid .npy file ({e})") from e
    if not dtype.hasobject:
      count = int(np.prod(shape))
      array = np.fromfile(f, dtype=dtype, count=count)
      if array.size != count:
        raise ValueError(f"{path}: truncated .npy file ({array.size} of {count} values)")
      return array.reshape(shape, order="F" if fortran_order else "C")
    obj = restricted_load(f, {**NUMPY_GLOBALS, **CONTAINER_GLOBALS}, source=path,
                          encoding="latin1")
  if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
    return obj.item()
  return obj
