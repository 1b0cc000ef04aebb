"""Loading pickles without running their code: an unpickler that admits only named globals.

MANO files, DINOv3 `.pth` files, Lightning `.ckpt` files and the EgoDorsal `.npy` dicts are all
pickles. `pickle.load` on them would execute whatever callable the file names; these helpers
resolve only the globals a caller lists and refuse everything else, naming the global and the file.

The rules (docs/security.md explains each and the attack it stops):
- An allowlist maps (module, name) to a factory: each load gets its own stand-ins, all of them
  immutable (no attribute can be set, BUILD on them is refused), so one file cannot change how
  the next one, or the rest of itself, is read.
- numpy arrays and scalars are never built by numpy's own unpickling: `numpy.dtype` yields a spec
  naming one entry of a fixed table of plain numeric dtypes, or a fixed-width string (`U<n>`,
  `S<n>`: no pointers; unicode code points are checked), and the pickled dtype state may only pick
  the byte order; `_reconstruct` yields a placeholder that the load turns into an array from
  exactly shape x itemsize bytes. Object dtypes are refused, except for the outer 0-d or n-d
  object array of an `.npy` dict, which is built here from the already-vetted items.
- Every array's declared size is checked before it is built or read: at most `max_bytes` each
  (DD_JAX_MAX_ARRAY_BYTES, default 8 GiB), and all of a file's arrays together at most twice the
  file's size plus `max_bytes`, so a small file cannot make a loader (or a conversion after it)
  allocate far more than the file holds.
- Every refusal is a `RefusedFileError` (a ValueError) naming the file and the reason; a
  MemoryError while reading becomes one too.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import threading
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

MAX_BYTES_ENV = "DD_JAX_MAX_ARRAY_BYTES"
DEFAULT_MAX_BYTES = 8 << 30
# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's ast is not thread-safe
# (gh-106905: "AST constructor recursion depth mismatch" when Grain's reader threads parse
# headers at once). Headers are parsed under this lock.
_NPY_HEADER_LOCK = threading.Lock()


class RefusedFileError(pickle.UnpicklingError, ValueError):
  """A file was refused or is unreadable; the message names it and says why. Nothing from the file
  was executed."""


class UnsafePickleError(RefusedFileError):
  """A pickle named a global outside the allowlist; nothing from the file was executed."""


class Refusal(Exception):
  """Raised by stand-ins while a file loads; restricted_load adds the file's name."""


def max_bytes_default() -> int:
  """The per-array cap: $DD_JAX_MAX_ARRAY_BYTES or 8 GiB."""
  value = os.environ.get(MAX_BYTES_ENV)
  if not value:
    return DEFAULT_MAX_BYTES
  try:
    return int(float(value))
  except ValueError:
    raise ValueError(f"${MAX_BYTES_ENV}={value!r} is not a number of bytes") from None


class Load:
  """One file being read: its name, and the bytes its arrays may still declare."""

  def __init__(self, source: str, file_size: int | None = None, max_bytes: int | None = None):
    self.source = source
    self.max_bytes = max_bytes_default() if max_bytes is None else int(max_bytes)
    self.budget = 2 * (file_size or 0) + self.max_bytes
    self.declared = 0
    self.pending = 0  # array placeholders made, resolved after the unpickling

  def charge(self, nbytes: int, what: str) -> None:
    """Checks `what` (declaring nbytes) against the caps before anything is allocated."""
    if nbytes > self.max_bytes:
      raise Refusal(f"{what} declares {nbytes:,} bytes, over the {self.max_bytes:,}-byte cap "
                    f"per array (${MAX_BYTES_ENV})")
    self.declared += nbytes
    if self.declared > self.budget:
      raise Refusal(f"{what}: the file's arrays declare {self.declared:,} bytes in all, more "
                    f"than twice the file's size plus the cap ({self.budget:,} bytes)")


# ---------------------------------------------------------------- immutable stand-ins


class Frozen:
  """Base of the objects a pickle can name: no attributes, and BUILD on them is refused."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise Refusal(f"cannot set attribute {name!r} of allowlisted {self!r}")

  def __delattr__(self, name):
    raise Refusal(f"cannot delete attribute {name!r} of allowlisted {self!r}")

  def __setstate__(self, state):
    raise Refusal(f"BUILD on allowlisted {self!r} refused: allowlisted objects are immutable")

  def __reduce__(self):
    raise TypeError(f"{self!r} is a loader stand-in and cannot be pickled")


class AllowedCallable(Frozen):
  """An allowlisted function: calls `fn`; the pickle cannot change it."""
  __slots__ = ("name", "fn")

  def __init__(self, name: str, fn: Callable[..., Any]):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "fn", fn)

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    return f"<allowlisted {self.name}>"


class Marker(Frozen):
  """An allowlisted name that is only compared against (e.g. numpy.ndarray as _reconstruct's
  first argument), never called or built."""
  __slots__ = ("name",)

  def __init__(self, name: str):
    object.__setattr__(self, "name", name)

  def __repr__(self):
    return f"<allowlisted {self.name}>"


def fresh_subclass(base: type, name: str) -> type:
  """A new subclass of `base` for one load: a BUILD that reached the class (it cannot: pickle
  calls the class's __setstate__ with the state as `self`, a TypeError) would end with the load."""
  return type(base.__name__, (base,), {"__module__": base.__module__,
                                       "__qualname__": f"{base.__qualname__}[{name}]"})


# ---------------------------------------------------------------- numpy


# The only dtypes a pickle can produce: numpy's pickled names of the plain numeric types.
DTYPES = {name: np.dtype(name) for name in (
    "b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16")}
OBJECT_DTYPE_NAMES = ("O8", "O4")  # np.dtype(object) as numpy pickles it (64 / 32-bit)
# Fixed-width unicode / byte strings (numpy pickles np.dtype("U23") as "U23" with 92 bytes per
# item in its state): plain bytes like the numeric types; test outputs hold motion types in them.
_STRING_DTYPE = re.compile(r"([US])([1-9][0-9]{0,5})")
_BYTE_ORDERS = {"<": "<", ">": ">", "=": "=", "|": "|"}


class DtypeSpec(Frozen):
  """What `numpy.dtype(name, align, copy)` gives a pickle: a table entry, plus the byte order
  that one BUILD (numpy's dtype state) may choose. Every other field of that state is ignored."""
  __slots__ = ("load", "name", "dtype", "built")

  def __init__(self, load: Load, name: Any, align: Any = False, copy: Any = False):
    del align, copy  # layout flags of plain dtypes: nothing to honour
    string = _STRING_DTYPE.fullmatch(name) if isinstance(name, str) else None
    if not isinstance(name, str) or (name not in DTYPES and name not in OBJECT_DTYPE_NAMES
                                     and string is None):
      raise Refusal(f"dtype {name!r} is not a plain numeric dtype (allowed: "
                    f"{', '.join(DTYPES)}, U<n>, S<n>)")
    object.__setattr__(self, "load", load)
    object.__setattr__(self, "name", name)
    dtype = (np.dtype(f"{string[1]}{int(string[2])}") if string
             else None if name in OBJECT_DTYPE_NAMES else DTYPES[name])
    object.__setattr__(self, "dtype", dtype)
    object.__setattr__(self, "built", False)

  @property
  def is_object(self) -> bool:
    return self.name in OBJECT_DTYPE_NAMES

  def __setstate__(self, state):
    if self.built:
      raise Refusal(f"a second BUILD on dtype {self.name!r}")
    if not isinstance(state, tuple) or len(state) < 2 or state[1] not in _BYTE_ORDERS:
      raise Refusal(f"dtype {self.name!r}: unexpected state {state!r:.200}")
    if self.dtype is not None:
      order = state[1]
      if order == "|" and self.dtype.itemsize > 1 and self.dtype.kind != "S":
        raise Refusal(f"dtype {self.name!r}: byte order '|' on a multi-byte type")
      if self.dtype.kind in "US" and (len(state) < 6 or state[5] != self.dtype.itemsize):
        raise Refusal(f"dtype {self.name!r}: its state gives {state[5] if len(state) > 5 else None!r}"
                      f" bytes per item, the name {self.dtype.itemsize}")
      if order in "<>":
        object.__setattr__(self, "dtype", self.dtype.newbyteorder(order))
    object.__setattr__(self, "built", True)

  def __repr__(self):
    return f"<dtype spec {self.name}>"


def _dtype_of(spec: Any, load: Load, what: str) -> DtypeSpec:
  if not isinstance(spec, DtypeSpec) or spec.load is not load:
    raise Refusal(f"{what}: dtype must come from numpy.dtype in this file, got "
                  f"{type(spec).__name__}")
  return spec


def _as_bytes(data: Any, what: str) -> bytes | bytearray:
  if isinstance(data, str):  # Python-2 pickles read with encoding='latin1'
    return data.encode("latin1")
  if not isinstance(data, (bytes, bytearray)):
    raise Refusal(f"{what}: raw data must be bytes, got {type(data).__name__}")
  return data


def _shape_of(shape: Any, what: str) -> tuple[int, ...]:
  if isinstance(shape, int) and not isinstance(shape, bool):
    shape = (shape,)
  if (not isinstance(shape, tuple) or len(shape) > 32
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
    raise Refusal(f"{what}: invalid shape {shape!r:.200}")
  return shape


class PendingArray:
  """What `_reconstruct` gives a pickle; its one BUILD (ndarray's state) is checked here, and the
  load replaces it with the array afterwards. Unhashable, so it cannot hide in sets or keys."""
  __slots__ = ("load", "array", "items", "shape", "fortran")
  __hash__ = None

  def __init__(self, load: Load):
    self.load, self.array, self.items, self.shape, self.fortran = load, None, None, None, False
    load.pending += 1

  def __setstate__(self, state):
    if self.array is not None or self.items is not None:
      raise Refusal("a second BUILD on an array")
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise Refusal(f"array: unexpected state {type(state).__name__}")
    shape, spec, fortran, data = state[-4:]
    shape = _shape_of(shape, "array")
    spec = _dtype_of(spec, self.load, "array")
    numel = math.prod(shape)
    self.shape, self.fortran = shape, bool(fortran)
    if spec.is_object:
      if not isinstance(data, list) or len(data) != numel:
        raise Refusal(f"object array of shape {shape} needs a list of {numel} items")
      self.load.charge(8 * numel, f"object array of shape {shape}")
      self.items = data
      return
    data = _as_bytes(data, "array")
    nbytes = numel * spec.dtype.itemsize
    self.load.charge(nbytes, f"array of shape {shape} x {spec.dtype}")
    if len(data) != nbytes:
      raise Refusal(f"array of shape {shape} x {spec.dtype} needs {nbytes} bytes, the file "
                    f"gives {len(data)}")
    flat = _checked_strings(np.frombuffer(data, dtype=spec.dtype, count=numel), "array")
    self.array = flat.reshape(shape, order="F" if self.fortran else "C").copy(order="K")

  def build(self, *, allow_object: bool) -> Any:
    if self.array is not None:
      return self.array
    if self.items is None:
      raise Refusal("an array was never given its data (no BUILD)")
    if not allow_object:
      raise Refusal("object arrays are refused (only the outer array of an .npy dict may "
                    "hold objects)")
    out = np.empty(self.shape, dtype=object)
    flat = out.reshape(-1, order="F" if self.fortran else "C")
    for i, item in enumerate(self.items):
      flat[i] = item
    return out


def _reconstruct(load: Load, ndarray: Any, shape: Any, typecode: Any) -> PendingArray:
  if not (isinstance(ndarray, Marker) and ndarray.name == "numpy.ndarray"):
    raise Refusal(f"_reconstruct of {ndarray!r:.80}: only numpy.ndarray")
  del shape, typecode  # numpy always passes (0,), b'b'; the BUILD state gives the array
  return PendingArray(load)


def _scalar(load: Load, spec: Any, data: Any = None) -> np.generic:
  spec = _dtype_of(spec, load, "scalar")
  if spec.is_object:
    raise Refusal("object scalars are refused")
  data = _as_bytes(data, "scalar")
  if len(data) != spec.dtype.itemsize:
    raise Refusal(f"scalar of {spec.dtype} needs {spec.dtype.itemsize} bytes, got {len(data)}")
  return _checked_strings(np.frombuffer(data, dtype=spec.dtype, count=1), "scalar")[0]


def _checked_strings(values: np.ndarray, what: str) -> np.ndarray:
  """values, after checking that a unicode array's code points exist (numpy would otherwise make
  Python strings holding e.g. U+FFFFFFFF, which break whatever encodes them later)."""
  if values.dtype.kind == "U" and values.size:
    codes = values.view(np.dtype("u4").newbyteorder(values.dtype.byteorder))
    if codes.max() > 0x10FFFF:
      raise Refusal(f"{what} of {values.dtype}: code point {int(codes.max()):#x} is not unicode")
  return values


def _factory(name: str, fn: Callable[..., Any]) -> Callable[[Load], AllowedCallable]:
  """An allowlist entry: per load, the function `fn(load, *args)` as an immutable callable."""
  return lambda load: AllowedCallable(name, lambda *args: fn(load, *args))


# What pickled numpy arrays and scalars need, under numpy 1.x (`numpy.core`) and 2.x
# (`numpy._core`) module names.
NUMPY_GLOBALS: dict[tuple[str, str], Callable[[Load], Any]] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
  NUMPY_GLOBALS[(_module, "_reconstruct")] = _factory("numpy._reconstruct", _reconstruct)
  NUMPY_GLOBALS[(_module, "scalar")] = _factory("numpy.scalar", _scalar)
NUMPY_GLOBALS[("numpy", "ndarray")] = lambda load: Marker("numpy.ndarray")
NUMPY_GLOBALS[("numpy", "dtype")] = _factory("numpy.dtype", DtypeSpec)


# ---------------------------------------------------------------- containers


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
      raise Refusal(
          f"collections.OrderedDict: only a dict `_metadata` attribute is accepted, got "
          f"{sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__}")
    self._metadata = state.get("_metadata")


def _container(kind: type) -> Callable[..., Any]:
  def make(load: Load, *args):
    del load
    if len(args) > 1:
      raise Refusal(f"{kind.__name__} takes at most one argument")
    return kind(*args)
  return make


# Plain containers some pickles name explicitly (protocol 2 writes sets as a global call).
CONTAINER_GLOBALS: dict[tuple[str, str], Callable[[Load], Any]] = {
    ("builtins", "set"): _factory("set", _container(set)),
    ("builtins", "frozenset"): _factory("frozenset", _container(frozenset)),
    ("__builtin__", "set"): _factory("set", _container(set)),
    ("__builtin__", "frozenset"): _factory("frozenset", _container(frozenset)),
    ("collections", "OrderedDict"): _factory("collections.OrderedDict", _container(StateDict)),
}


# ---------------------------------------------------------------- the unpickler


Allowlist = Mapping[tuple[str, str], Callable[[Load], Any]]


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler: its memo is a dict. CPython's C unpickler sizes its memo array by
  the largest index a PUT names, so a 5-byte LONG_BINPUT 400000000 makes it allocate and zero
  GBs (found by tools/fuzz_loaders.py); the pure-Python one is a few times slower on the
  small pickles read here (a .ckpt's 17k opcodes: 25 ms instead of 6 ms)."""

  def __init__(self, file: BinaryIO, allowed: Allowlist, load: Load,
               persistent_load: Callable[[Any], Any] | None, encoding: str):
    super().__init__(file, encoding=encoding)
    self._allowed = allowed
    self._load = load
    self._made: dict[tuple[str, str], Any] = {}
    self._persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    key = (module, name)
    if key not in self._made:
      try:
        factory = self._allowed[key]
      except KeyError:
        allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self._allowed)) or "none"
        raise UnsafePickleError(
            f"{self._load.source}: refusing to load global '{module}.{name}' "
            f"(not in the allowlist: {allowed}); nothing from the file was executed") from None
      self._made[key] = factory(self._load)
    return self._made[key]

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent_load is None:
      raise Refusal(f"unexpected persistent id {pid!r:.100}")
    return self._persistent_load(pid)


def resolve(obj: Any, *, allow_object_root: bool = False) -> Any:
  """Replaces every array placeholder in `obj` (containers, stubs' recorded data) by its array."""
  seen: dict[int, Any] = {}

  def walk(x: Any, root: bool = False) -> Any:
    key = id(x)
    if key in seen:
      return seen[key]
    if isinstance(x, PendingArray):
      seen[key] = out = x.build(allow_object=root and allow_object_root)
      if out.dtype == object:
        flat = out.reshape(-1)
        for i in range(flat.size):
          flat[i] = walk(flat[i])
      return out
    if isinstance(x, list):
      seen[key] = x
      for i, item in enumerate(x):
        x[i] = walk(item)
    elif isinstance(x, dict):
      seen[key] = x
      for k in list(x):
        x[k] = walk(x[k])
    elif isinstance(x, tuple):
      seen[key] = x  # a cycle back to this tuple keeps the tuple
      items = [walk(item) for item in x]
      if any(a is not b for a, b in zip(items, x)):
        seen[key] = tuple(items)
    elif hasattr(type(x), "pickled_fields"):
      seen[key] = x
      for field in type(x).pickled_fields:
        setattr(x, field, walk(getattr(x, field)))
    return seen.get(key, x)

  try:
    return walk(obj, root=True)
  except RecursionError:
    raise Refusal("data nested too deeply") from None


def restricted_load(file: str | os.PathLike | bytes | BinaryIO, allowed: Allowlist, *,
                    source: str | None = None, encoding: str = "ASCII",
                    persistent_load: Callable[[Any], Any] | None = None,
                    load: Load | None = None, size: int | None = None,
                    allow_object_root: bool = False) -> Any:
  """Unpickles `file` (a path, bytes or binary stream), resolving only globals in `allowed`.

  `allowed` maps (module, name) to a factory making this load's stand-in (e.g. a class that
  records a chumpy object's state). Python-2 pickles need encoding='latin1'. `size`: the bytes
  the pickle may occupy (default: the rest of the file); `load`: the Load to charge arrays to
  (a .pth shares one across its storages). Raises RefusedFileError naming the file.
  """
  if isinstance(file, (str, os.PathLike)):
    path = os.fspath(file)
    with open(path, "rb") as f:
      return restricted_load(f, allowed, source=source or path, encoding=encoding,
                             persistent_load=persistent_load, load=load,
                             size=os.fstat(f.fileno()).st_size if size is None else size,
                             allow_object_root=allow_object_root)
  source = source or (load.source if load else "<pickle>")
  if not isinstance(file, (bytes, bytearray)):
    # The whole pickle in memory (at most the file), so no opcode's length field can make a read
    # larger than what is there.
    file = file.read() if size is None else file.read(size)
  if load is None:
    load = Load(source, len(file))
  try:
    obj = _RestrictedUnpickler(io.BytesIO(file), allowed, load, persistent_load,
                               encoding).load()
    if load.pending:
      obj = resolve(obj, allow_object_root=allow_object_root)
    return obj
  except UnsafePickleError:
    raise
  except Refusal as e:
    raise RefusedFileError(f"{source}: refused: {e}") from None
  except MemoryError:
    raise RefusedFileError(f"{source}: refused: out of memory while reading (the file declares "
                           f"more data than this machine holds)") from None
  except RecursionError:
    raise RefusedFileError(f"{source}: refused: data nested too deeply") from None
  except Exception as e:  # truncated or corrupt data  # pylint: disable=broad-except
    cause = e.__cause__ if isinstance(e.__cause__, Refusal) else e
    raise RefusedFileError(f"{source}: not a readable pickle ({cause})") from e


# ---------------------------------------------------------------- .npy


def _header_dtype_ok(dtype: np.dtype) -> bool:
  """A .npy header's dtype that holds no pointers: plain numeric, or fixed-width strings."""
  return (dtype.fields is None and dtype.subdtype is None
          and (dtype.newbyteorder("=") in [d.newbyteorder("=") for d in DTYPES.values()]
               or (dtype.kind in "US" and dtype.itemsize > 0)))


def read_npy_stream(f: BinaryIO, size: int, load: Load, *, allow_pickle: bool = True) -> Any:
  """One .npy from stream `f` of `size` bytes (a file, or a member of an .npz): its header is
  checked (dtype, declared size against the caps and the bytes present) before any data is read.
  Raises Refusal / RefusedFileError."""
  start = f.tell() if hasattr(f, "tell") else 0
  try:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    with _NPY_HEADER_LOCK:
      shape, fortran_order, dtype = read_header(f)
  except Exception as e:  # pylint: disable=broad-except
    raise RefusedFileError(f"{load.source}: not a valid .npy file ({e})") from e
  left = size - ((f.tell() - start) if hasattr(f, "tell") else 0)
  if not dtype.hasobject:
    if not _header_dtype_ok(dtype):
      raise Refusal(f"dtype {dtype} is not a plain numeric (or string) dtype")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    load.charge(nbytes, f"array of shape {shape} x {dtype}")
    if nbytes > left:
      raise RefusedFileError(f"{load.source}: truncated .npy file (shape {shape} x {dtype} needs "
                             f"{nbytes} bytes, {left} remain)")
    data, got = bytearray(nbytes), 0
    with memoryview(data) as view:
      while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
          raise RefusedFileError(f"{load.source}: truncated .npy file ({got} of {nbytes} bytes)")
        got += n
    return np.frombuffer(data, dtype=dtype, count=count).reshape(
        shape, order="F" if fortran_order else "C")
  if dtype != np.dtype(object) or not allow_pickle:
    raise Refusal(f"dtype {dtype} holds Python objects")
  obj = restricted_load(f, {**NUMPY_GLOBALS, **CONTAINER_GLOBALS}, encoding="latin1",
                        load=load, size=left, allow_object_root=True)
  if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
    return obj.item()
  return obj


def load_npy(path: str | os.PathLike, *, max_bytes: int | None = None) -> Any:
  """Reads an `.npy` file like `np.load(path, allow_pickle=True)`, without executing code.

  Numeric arrays (plain numeric or string dtypes) are returned as arrays. Object arrays (np.save
  of a dict, as the EgoDorsal annotation and HaMeR files are) are unpickled admitting only numpy
  arrays, scalars, dicts, lists and tuples; a 0-d object array is unwrapped to the object it
  holds. Raises RefusedFileError (a ValueError) naming the file.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    try:
      return read_npy_stream(f, size, Load(path, size, max_bytes))
    except Refusal as e:
      raise RefusedFileError(f"{path}: refused: {e}") from None
    except MemoryError:
      raise RefusedFileError(f"{path}: refused: out of memory while reading") from None
