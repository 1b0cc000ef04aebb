"""Torch-free readers for PyTorch `.pth`/`.ckpt` files and safetensors files, as numpy arrays.

A `.pth` written by torch.save is a zip holding `<name>/data.pkl` (a pickle whose tensors point to
storages by key) and `<name>/data/<key>` (raw little-endian storage bytes). The pickle is read with
dd_jax.safe_pickle's allowlist, so a crafted file cannot run code and no torch is needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from dd_jax import safe_pickle


class TorchFileError(ValueError):
  """A checkpoint file is malformed, truncated or uses a feature these readers do not support."""


class LazyTensor:
  """A tensor of a file whose bytes are read only by `read()` (the readers' lazy=True): its
  shape and dtype come from the header / pickle, checked against the file like an eager read."""
  __slots__ = ("shape", "dtype", "_read")

  def __init__(self, shape: tuple, dtype: np.dtype, read):
    self.shape, self.dtype, self._read = tuple(shape), np.dtype(dtype), read

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def read(self) -> np.ndarray:
    """A fresh array owning its memory (no memory map of the file is kept)."""
    return np.array(self._read(), copy=True)

  def __repr__(self):
    return f"<lazy tensor {self.shape} x {self.dtype}>"


class _LazyBuffer:
  """A storage's flat bytes in the file, mapped (or decompressed) only by `array()`."""
  __slots__ = ("dtype", "size", "array")

  def __init__(self, dtype: np.dtype, size: int, array):
    self.dtype, self.size, self.array = dtype, size, array


def materialize(value: Any) -> Any:
  """A LazyTensor's array; anything else as it is."""
  return value.read() if isinstance(value, LazyTensor) else value


# torch.<X>Storage -> numpy dtype (the storage classes torch.save names in its pickles).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
Refusal = safe_pickle.Refusal


class _StorageType(safe_pickle.Frozen):
  """What the allowlist substitutes for torch.<X>Storage: only carries the dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str, dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "dtype", np.dtype(dtype))

  def __repr__(self):
    return f"<allowlisted torch.{self.name}>"


class _Storage(safe_pickle.Frozen):
  """A storage of the archive (what persistent_load returns): the only thing tensors view."""
  __slots__ = ("key", "array")

  def __init__(self, key: str, array: np.ndarray):
    object.__setattr__(self, "key", key)
    object.__setattr__(self, "array", array)

  def __repr__(self):
    return f"<storage {self.key!r} of {self.array.size} x {self.array.dtype}>"


def _index(value: Any, what: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool):
    raise Refusal(f"{what} must be an int, got {type(value).__name__}")
  return value


def _rebuild_tensor(load: safe_pickle.Load, storage: Any, storage_offset: Any, size: Any,
                    stride: Any, *_unused) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2) on a storage of the archive, bounds-checked.

  The view must lie inside the storage's real buffer (as_strided would read outside it), and its
  declared size is charged to the load before it is made.
  """
  if not isinstance(storage, _Storage):
    raise Refusal(f"tensor data must be a storage of the archive, got {type(storage).__name__}")
  if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) > 64:
    raise Refusal(f"invalid tensor layout size={size!r:.100} stride={stride!r:.100}")
  size = tuple(_index(n, "tensor size") for n in size)
  stride = tuple(_index(n, "tensor stride") for n in stride)
  offset = _index(storage_offset, "storage offset")
  if len(size) != len(stride) or any(n < 0 for n in size + stride) or offset < 0:
    raise Refusal(f"invalid tensor layout size={size} stride={stride} offset={offset}")
  buffer = storage.array
  load.charge(math.prod(size) * buffer.dtype.itemsize,
              f"tensor of size {size} on storage {storage.key!r}")
  if 0 in size:
    return np.zeros(size, buffer.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= buffer.size:
    raise Refusal(f"tensor (size={size}, stride={stride}, offset={offset}) reaches element "
                  f"{last} of storage {storage.key!r}, which holds {buffer.size}")
  item = buffer.dtype.itemsize

  def view(flat):
    return np.lib.stride_tricks.as_strided(flat[offset:last + 1], size,
                                           tuple(s * item for s in stride), writeable=False)

  if isinstance(buffer, _LazyBuffer):
    return LazyTensor(size, buffer.dtype, lambda: view(buffer.array()))
  return view(buffer)


def _rebuild_parameter(load, data, requires_grad=None, backward_hooks=None, state=None):
  del load, requires_grad, backward_hooks, state  # nn.Parameter -> its data
  return data


class _TensorType(safe_pickle.Marker):
  """Stands for torch.Tensor / nn.Parameter as the `new_type` of _rebuild_from_type_v2."""
  __slots__ = ()


def _rebuild_from_type_v2(load, func, new_type, args, state=None):
  del load, new_type, state
  if not isinstance(func, safe_pickle.AllowedCallable) or not isinstance(args, tuple):
    raise Refusal(f"_rebuild_from_type_v2 needs an allowlisted function, got {func!r:.80}")
  return func(*args)


def _codecs_encode(load, text: Any, encoding: str = "utf-8") -> bytes:
  # Protocol-2 pickles spell bytes (e.g. inside numpy arrays) as _codecs.encode(str, 'latin1').
  del load
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise Refusal(f"_codecs.encode({type(text).__name__}, {encoding!r:.40}) is not allowed")
  return text.encode(encoding)


_fn = safe_pickle._factory  # pylint: disable=protected-access
TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _fn("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _fn("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _fn("torch._utils._rebuild_parameter",
                                                _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _fn(
        "torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _fn("torch._tensor._rebuild_from_type_v2",
                                                    _rebuild_from_type_v2),
    ("torch", "Tensor"): lambda load: _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): lambda load: _TensorType("torch.nn.Parameter"),
    ("_codecs", "encode"): _fn("_codecs.encode", _codecs_encode),
    **{("torch", name): (lambda load, n=name, d=dtype: _StorageType(n, d))
       for name, dtype in _STORAGE_DTYPES.items()},
}


# --- stub mode ---------------------------------------------------------------------------------


class StubObject:
  """Inert stand-in for a global outside the allowlist ("stub" mode): nothing of it runs.

  `global_name` is the pickled "module.name"; `args`, `kwargs`, `state`, `items`, `list_items`
  keep what the pickle passed to it (constructor arguments, __setstate__, dict/list contents).
  Each load makes its own subclasses.
  """
  global_name = "?"
  pickled_fields = ("args", "kwargs", "state", "items", "list_items")

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs = args, kwargs
    obj.state, obj.items, obj.list_items = None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  def __repr__(self):
    return f"<stub {self.global_name}>"


class _StubAllowlist(dict):
  """An allowlist that answers every other global with a factory of a fresh StubObject subclass."""

  def __init__(self, allowed, stub_names: list[str]):
    super().__init__(allowed)
    self._stub_names = stub_names

  def __missing__(self, key: tuple[str, str]):
    name = f"{key[0]}.{key[1]}"
    self._stub_names.append(name)
    return lambda load: type(f"Stub[{name}]", (StubObject,), {"global_name": name})


# --- .pth / .ckpt ------------------------------------------------------------------------------


def _check_compression(info: zipfile.ZipInfo) -> None:
  """torch.save stores entries uncompressed; deflate is read in bounded steps. zipfile decompresses
  bzip2 / lzma in unbounded chunks (a 2 KB entry becomes GBs at once), so those are refused."""
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise Refusal(f"entry {info.filename!r}: compression method {info.compress_type} is not "
                  f"accepted (torch.save writes stored entries; deflate is also read)")


def _entry_array(path: str, archive: zipfile.ZipFile, name: str, dtype: np.dtype, numel: int,
                 load: safe_pickle.Load, lazy: bool) -> np.ndarray | _LazyBuffer:
  """The storage `name` as a flat read-only array: a memory map when the entry is stored; else
  exactly the bytes the pickle declares are decompressed (never the whole entry). `lazy`: every
  check now, the mapping / decompression later (a _LazyBuffer)."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise Refusal(f"storage entry {name!r} is missing from the archive") from None
  nbytes = numel * dtype.itemsize
  if info.file_size < nbytes:
    raise Refusal(f"storage {name!r} holds {info.file_size} bytes, the pickle needs {nbytes} "
                  f"({numel} x {dtype})")
  _check_compression(info)
  if numel == 0:
    return np.zeros((0,), dtype)
  if info.compress_type == zipfile.ZIP_STORED:
    with open(path, "rb") as f:
      f.seek(info.header_offset)
      header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
      raise Refusal(f"bad local header for {name!r} (truncated file?)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + nbytes > os.path.getsize(path):
      raise Refusal(f"storage {name!r} runs past the end of the file (truncated?)")
    make = lambda: np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(numel,))
  else:
    load.charge(nbytes, f"compressed storage {name!r}")  # decompressed into memory

    def inflate(zf: zipfile.ZipFile) -> np.ndarray:
      with zf.open(name) as f:
        data = f.read(nbytes)
      if len(data) != nbytes:
        raise Refusal(f"storage {name!r} decompresses to {len(data)} bytes, the pickle needs "
                      f"{nbytes}")
      return np.frombuffer(data, dtype=dtype, count=numel)

    if not lazy:
      return inflate(archive)

    def make():
      try:
        with zipfile.ZipFile(path) as again:
          return inflate(again)
      except Refusal as e:
        raise TorchFileError(f"{path}: refused: {e}") from None
      except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise TorchFileError(f"{path}: unreadable zip archive ({e})") from e

  return _LazyBuffer(dtype, numel, make) if lazy else make()


def read_torch_file(path: str | os.PathLike, *, unknown_globals: str = "refuse",
                    stub_names: list[str] | None = None, max_bytes: int | None = None,
                    lazy: bool = False) -> Any:
  """Reads a zip-format torch.save file (.pth, Lightning .ckpt) without torch.

  Tensors become numpy arrays (bf16 as ml_dtypes.bfloat16; read-only, memory-mapped from the file
  where possible); nn.Parameters become their data. Globals outside the tensor/container allowlist:
  unknown_globals="refuse" raises safe_pickle.UnsafePickleError naming the first one;
  "stub" substitutes inert StubObject subclasses, records their names in `stub_names` (if given)
  and logs them. Nothing from the file is ever executed. Every array's declared size is checked
  against `max_bytes` (safe_pickle.Load) before it is read. Other problems raise TorchFileError
  naming the file. lazy=True: tensors are LazyTensors (every check made; bytes read by `read()`).
  """
  path = os.fspath(path)
  if unknown_globals not in ("refuse", "stub"):
    raise ValueError(f"unknown_globals={unknown_globals!r}: expected 'refuse' or 'stub'")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    is_zip = zipfile.is_zipfile(path)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
    raise TorchFileError(f"{path}: unreadable zip archive ({e})") from e
  if not is_zip:
    with open(path, "rb") as f:
      head = f.read(2)
    hint = (" (a legacy pre-1.6 torch pickle: re-save it with torch.save to get the zip format)"
            if head[:1] == b"\x80" else " (truncated, or not a torch.save file)")
    raise TorchFileError(f"{path}: not a zip archive{hint}")
  load = safe_pickle.Load(path, os.path.getsize(path), max_bytes)
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
    raise TorchFileError(f"{path}: unreadable zip archive ({e})") from e
  with archive:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise TorchFileError(f"{path}: expected one */data.pkl entry, found {pickles or 'none'}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    try:
      if prefix + "byteorder" in archive.namelist():
        _check_compression(archive.getinfo(prefix + "byteorder"))
        with archive.open(prefix + "byteorder") as f:
          byteorder = f.read(16).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
          raise TorchFileError(f"{path}: unknown byteorder {byteorder!r:.40}")
      _check_compression(archive.getinfo(pickles[0]))
      pickle_size = archive.getinfo(pickles[0]).file_size
      load.charge(pickle_size, "the pickle (data.pkl)")
    except safe_pickle.Refusal as e:
      raise TorchFileError(f"{path}: refused: {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
      raise TorchFileError(f"{path}: unreadable zip archive ({e})") from e
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise Refusal(f"unsupported persistent id {pid!r:.100}")
      _, storage_type, key, _location, numel = pid
      if not isinstance(storage_type, _StorageType):
        raise Refusal(f"storage {key!r:.40} has unsupported type {storage_type!r:.80}")
      if not isinstance(key, str) or not key.isalnum():
        raise Refusal(f"storage key {key!r:.40} is not a plain name")
      numel = _index(numel, "storage size")
      if numel < 0:
        raise Refusal(f"storage {key!r} has negative size {numel}")
      if key not in storages:
        dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
        array = _entry_array(path, archive, f"{prefix}data/{key}", dtype, numel, load, lazy)
        if byteorder == "big":
          load.charge(numel * dtype.itemsize, f"big-endian storage {key!r}")
          if lazy:
            array = _LazyBuffer(storage_type.dtype, numel,
                                lambda a=array.array, t=storage_type.dtype: a().astype(t))
          else:
            array = array.astype(storage_type.dtype)
        storages[key] = _Storage(key, array)
      elif (storages[key].array.dtype.newbyteorder("=") != storage_type.dtype
            or storages[key].array.size != numel):
        raise Refusal(f"storage {key!r} is declared twice with different types or sizes")
      return storages[key]

    allowed = {**safe_pickle.NUMPY_GLOBALS, **safe_pickle.CONTAINER_GLOBALS, **TENSOR_GLOBALS}
    stubbed: list[str] = []
    if unknown_globals == "stub":
      allowed = _StubAllowlist(allowed, stubbed)
    try:
      with archive.open(pickles[0]) as f:
        obj = safe_pickle.restricted_load(f, allowed, encoding="utf-8", load=load,
                                          size=pickle_size, persistent_load=persistent_load)
    except safe_pickle.UnsafePickleError:
      raise
    except safe_pickle.RefusedFileError as e:
      raise TorchFileError(str(e)) from None
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
      raise TorchFileError(f"{path}: unreadable zip archive ({e})") from e
    except MemoryError:
      raise TorchFileError(f"{path}: refused: out of memory while reading") from None
  if stubbed:
    logging.info("%s: loaded %d global(s) as inert stubs: %s", path, len(stubbed),
                 ", ".join(stubbed))
    if stub_names is not None:
      stub_names.extend(stubbed)
  return obj


# --- safetensors -------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def read_safetensors(path: str | os.PathLike, *, lazy: bool = False) -> dict[str, Any]:
  """Reads a .safetensors file (u64-LE header length, JSON header, raw LE bytes) as arrays.

  Arrays are read-only memory maps of the file (lazy=True: LazyTensors, read by `read()`); every
  entry's extent is checked against the file, and entries may not overlap (as the safetensors
  library requires), so the arrays together never declare more bytes than the file holds.
  """
  path = os.fspath(path)
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) < 8:
      raise TorchFileError(f"{path}: too short for a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > _MAX_SAFETENSORS_HEADER:
      raise TorchFileError(f"{path}: refused: a {header_len:,}-byte header (safetensors allows "
                           f"{_MAX_SAFETENSORS_HEADER:,})")
    if 8 + header_len > file_size:
      raise TorchFileError(f"{path}: header of {header_len} bytes runs past the end of the "
                           f"{file_size}-byte file (truncated, or not safetensors)")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise TorchFileError(f"{path}: unreadable safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise TorchFileError(f"{path}: safetensors header is not a JSON object")
  data_start = 8 + header_len
  arrays = {}
  problems = []
  extents = []
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
      problems.append(f"{name}: bad entry {entry!r} ({type(e).__name__}: {e})")
      continue
    numel = math.prod(shape)
    if end - begin != numel * dtype.itemsize or begin < 0:
      problems.append(f"{name}: data_offsets {begin}..{end} do not hold {shape} x {dtype}")
      continue
    if data_start + end > file_size:
      problems.append(f"{name}: data ends at byte {data_start + end}, past the end of the file "
                      f"({file_size} bytes; truncated?)")
      continue
    extents.append((begin, end, name))
    if numel == 0:
      arrays[name] = np.zeros(shape, dtype)
      continue
    make = (lambda d=dtype, o=data_start + begin, s=shape:
            np.memmap(path, dtype=d, mode="r", offset=o, shape=s))
    arrays[name] = LazyTensor(shape, dtype, make) if lazy else make()
  extents.sort()
  for (_, end, first), (begin, _, second) in zip(extents, extents[1:]):
    if begin < end:
      problems.append(f"{second}: its data overlaps {first}'s")
  if problems:
    raise TorchFileError(f"{path}: " + "; ".join(problems))
  return arrays


def _index_shards(index: str) -> list[str]:
  """The shard file names of a model.safetensors.index.json; each must be a plain file name in
  the index's own folder (no path, no '..')."""
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    names = set(weight_map.values())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
          AttributeError, RecursionError) as e:
    raise TorchFileError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
  bad = sorted(repr(n) for n in names if not isinstance(n, str) or os.path.basename(n) != n
               or n in ("", ".", "..") or not n.endswith(".safetensors"))
  if bad:
    raise TorchFileError(f"{index}: shard names must be .safetensors files beside the index, "
                         f"got {', '.join(bad)}")
  return sorted(names)


# --- any of them ---------------------------------------------------------------------------------


def read_weights(path: str | os.PathLike, *, lazy: bool = False
                 ) -> tuple[dict[str, Any], dict | None]:
  """(flat dict of arrays, config.json beside the weights or None) of a torch.save file holding a
  state_dict, a .safetensors file, or a folder of safetensors (sharded with an index, or not).
  lazy=True: the arrays are LazyTensors, whose bytes are read one by one by `read()`."""
  path = os.fspath(path)
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      files = _index_shards(index)
    else:
      files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
      raise TorchFileError(f"{path}: folder holds no .safetensors files")
    state_dict = {}
    for name in files:
      shard = read_safetensors(os.path.join(path, name), lazy=lazy)
      repeated = sorted(set(shard) & set(state_dict))
      if repeated:
        raise TorchFileError(f"{os.path.join(path, name)}: tensors also in an earlier shard: "
                             + ", ".join(repeated[:5]))
      state_dict.update(shard)
    config_path = os.path.join(path, "config.json")
  else:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file or folder")
    with open(path, "rb") as f:
      magic = f.read(2)
    if magic == b"PK" or not path.endswith(".safetensors"):
      state_dict = read_torch_file(path, lazy=lazy)
      if not isinstance(state_dict, dict):
        raise TorchFileError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    else:
      state_dict = read_safetensors(path, lazy=lazy)
    config_path = os.path.join(os.path.dirname(path), "config.json")
  config = None
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      try:
        config = json.load(f)
      except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TorchFileError(f"{config_path}: not JSON ({e})") from e
  return state_dict, config
