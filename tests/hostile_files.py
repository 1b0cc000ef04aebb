"""A corpus of crafted files for every loader (issue 15), generated here rather than committed.

`make_corpus(folder, marker_dir)` writes each file and returns `Case`s: the file, and per loader
the refusal its rule must give (a regex), when the case exists to exercise that rule. Code
payloads try to create a file in `marker_dir`; none may appear.

Files are assembled with a tiny pickler (`G`: a global by name, `Call`: REDUCE [+ BUILD],
`Build`: BUILD on any object, `Raw`: opcodes verbatim), so no dangerous object is ever built here.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

MiB = 1 << 20
CAP = 64 * MiB  # DD_JAX_MAX_ARRAY_BYTES for the corpus runs
LOADERS = ("npy", "torch", "ckpt", "mano", "hamer", "weights")


@dataclasses.dataclass
class Case:
  name: str
  path: str
  expect: dict[str, str]  # loader -> regex its refusal must match ("" = it must load)


# ------------------------------------------------------------------ a pickler of raw structures

class G:
  """A global, written as GLOBAL 'module name' (never imported)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self):  # pickle's save_reduce wants a callable
    raise AssertionError("never called")


class Call:
  """fn(*args), then BUILD(state) when state is given."""

  def __init__(self, fn, args=(), state=None):
    self.fn, self.args, self.state = fn, tuple(args), state

  def __call__(self):  # may itself be called (REDUCE on a REDUCE's result)
    raise AssertionError("never called")


class Build:
  """BUILD(state) applied to `target` (any object, e.g. a global)."""

  def __init__(self, target, state):
    self.target, self.state = target, state


class Raw:
  """Opcodes written verbatim (they must leave exactly one object on the stack)."""

  def __init__(self, data: bytes):
    self.data = data


class PersistentId:
  def __init__(self, pid):
    self.pid = pid


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, PersistentId) else None

  def reducer_override(self, obj):
    if isinstance(obj, Call):
      return (obj.fn, obj.args) if obj.state is None else (obj.fn, obj.args, obj.state)
    return NotImplemented

  def save_g(self, obj, name=None):
    del name
    self.write(pickle.GLOBAL + obj.module.encode() + b"\n" + obj.name.encode() + b"\n")

  def save_build(self, obj):
    self.save(obj.target)
    self.save(obj.state)
    self.write(pickle.BUILD)

  def save_raw(self, obj):
    self.write(obj.data)

  dispatch[G] = save_g
  dispatch[Build] = save_build
  dispatch[Raw] = save_raw


def dumps(obj, protocol: int = 2, fast: bool = False) -> bytes:
  """fast: no memo opcodes (for pieces spliced into another pickle as Raw)."""
  buffer = io.BytesIO()
  pickler = _Pickler(buffer, protocol=protocol)
  pickler.fast = fast
  pickler.dump(obj)
  return buffer.getvalue()


RECONSTRUCT = G("numpy._core.multiarray", "_reconstruct")
NDARRAY = G("numpy", "ndarray")


def dtype(name: str, state=(3, "<", None, None, None, -1, -1, 0)):
  return Call(G("numpy", "dtype"), (name, False, True), state)


def array(shape, dt, data, fortran=False):
  """A numpy array as numpy pickles it: _reconstruct(ndarray, (0,), b'b') + BUILD(state)."""
  return Call(RECONSTRUCT, (NDARRAY, (0,), b"b"), (1, tuple(shape), dt, fortran, data))


def f64(values):
  values = np.asarray(values, "<f8")
  return array(values.shape, dtype("f8"), values.tobytes())


# ------------------------------------------------------------------ containers

def write_npy_pickle(path, pickle_bytes: bytes, shape=()):
  """An .npy whose header says object dtype (np.save of a dict) and whose body is the pickle."""
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False,
                                             "shape": shape})
    f.write(pickle_bytes)


def write_npy_header(path, descr, shape, body: bytes):
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False,
                                             "shape": shape})
    f.write(body)


def write_pth(path, pickle_bytes: bytes, storages=None, *, pickle_compression=zipfile.ZIP_STORED,
              entries=None):
  """A torch.save-style zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(zipfile.ZipInfo("archive/data.pkl"), pickle_bytes, pickle_compression)
    z.writestr("archive/byteorder", "little")
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)
  for name, (data, size, method) in (entries or {}).items():
    _append_entry(path, name, data, size, method)


def _append_entry(path, name, compressed: bytes, size: int, method: int):
  """Adds a pre-compressed zip entry declaring `size` uncompressed bytes (a bomb's body)."""
  with zipfile.ZipFile(path, "a") as z:
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    z.writestr(info, b"")  # placeholder, rewritten below
  # Rebuild the archive with the raw compressed payload for `name`.
  with zipfile.ZipFile(path) as z:
    others = [(i, z.read(i.filename)) for i in z.infolist() if i.filename != name]
  with open(path, "wb") as f:
    central = []
    for info, data in others:
      offset = f.tell()
      comp = data if info.compress_type == zipfile.ZIP_STORED else zlib.compress(data)[2:-4]
      method_used = zipfile.ZIP_STORED if info.compress_type == zipfile.ZIP_STORED else 8
      central.append(_local(f, info.filename, comp, len(data), zlib.crc32(data), method_used,
                            offset))
    offset = f.tell()
    central.append(_local(f, name, compressed, size, 0, method, offset))
    start = f.tell()
    for record in central:
      f.write(record)
    f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(central), len(central),
                        f.tell() - start, start, 0))


def _local(f, name, comp, size, crc, method, offset) -> bytes:
  name_b = name.encode()
  f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(comp), size,
                      len(name_b), 0) + name_b + comp)
  return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(comp), size,
                     len(name_b), 0, 0, 0, 0, 0, offset) + name_b


def deflate_zeros(n: int) -> bytes:
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  chunk = bytes(MiB)
  out = [c.compress(chunk) for _ in range(n // MiB)]
  return b"".join(out) + c.flush()


def bzip2_zeros(n: int) -> bytes:
  c = bz2.BZ2Compressor(9)
  chunk = bytes(MiB)
  out = [c.compress(chunk) for _ in range(n // MiB)]
  return b"".join(out) + c.flush()


STORAGE = G("torch", "FloatStorage")
REBUILD = G("torch._utils", "_rebuild_tensor_v2")
ORDERED = G("collections", "OrderedDict")


def tensor(key, numel, size, stride, offset=0, storage_type=STORAGE):
  return Call(REBUILD, (PersistentId(("storage", storage_type, key, "cpu", numel)), offset,
                        tuple(size), tuple(stride), False, Call(ORDERED, ())))


def mano_dict(**overrides):
  """The MANO keys with tiny arrays (wrong shapes: the reader refuses them after loading)."""
  d = {"v_template": f64(np.zeros((2, 3))), "f": f64(np.zeros((1, 3))), "kintree_table":
       f64(np.zeros((2, 16)))}
  d.update(overrides)
  return d


# ------------------------------------------------------------------ the corpus

def payloads(marker_dir):
  """name -> a pickled object whose loading, if executed, creates a marker file."""
  def touch(name):
    return os.path.join(marker_dir, name)
  inner = dumps(Call(G("os", "system"), (f"touch {touch('nested')}",)))
  return {
      "os_system": Call(G("os", "system"), (f"touch {touch('os_system')}",)),
      "posix_system": Call(G("posix", "system"), (f"touch {touch('posix_system')}",)),
      "eval": Call(G("builtins", "eval"), (f"__import__('os').system('touch {touch('eval')}')",)),
      "exec": Call(G("builtins", "exec"), (f"import os; os.system('touch {touch('exec')}')",)),
      "subprocess": Call(G("subprocess", "check_call"), (["touch", touch("subprocess")],)),
      "importlib": Call(Call(G("builtins", "getattr"),
                             (Call(G("importlib", "import_module"), ("os",)), "system")),
                        (f"touch {touch('importlib')}",)),
      "pickle_loads": Call(G("pickle", "loads"), (inner,)),
      "nt_system": Call(G("nt", "system"), (f"type nul > {touch('nt_system')}",)),
  }


GLOBAL_REFUSED = r"refusing to load global"
FORGED = (3, "|", None, None, None, -1, -1, 0)  # issue 15's state on dtype('O8')


def make_corpus(folder: str, marker_dir: str) -> list[Case]:
  os.makedirs(folder, exist_ok=True)
  cases: list[Case] = []

  def add(name, expect, writer, *args, **kwargs):
    path = os.path.join(folder, name)
    writer(path, *args, **kwargs)
    cases.append(Case(name, path, expect))

  def npy(name, obj, expect, protocol=3, **kw):  # np.save pickles with protocol 3 or 4
    add(name, {"npy": expect, "hamer": expect} if expect is not None else {}, write_npy_pickle,
        dumps(obj, protocol), **kw)

  def pth(name, obj, expect, storages=None, ckpt_expect=None, **kw):
    exp = {"torch": expect} if expect is not None else {}
    if ckpt_expect is not None:
      exp["ckpt"] = ckpt_expect
    add(name, exp, write_pth, dumps(obj), storages, **kw)

  def mano(name, obj, expect, protocol=2):
    add(name, {"mano": expect} if expect is not None else {},
        lambda p: open(p, "wb").write(dumps(obj, protocol)))

  # --- forged dtypes (rule: dtypes only from the table; object dtype only for the outer array)
  npy("npy_forged_object_dtype.npy", {"a": array((4,), dtype("O8", FORGED), b"A" * 32)},
      r"object array of shape \(4,\) needs a list")
  npy("npy_object_array_inside.npy", {"a": array((1,), dtype("O8"), [b"x"])},
      r"object arrays are refused")
  npy("npy_dtype_not_in_table.npy", {"a": array((1,), dtype("V8"), b"A" * 8)},
      r"dtype 'V8' is not a plain numeric dtype")
  npy("npy_dtype_datetime.npy", {"a": array((1,), dtype("M8"), b"A" * 8)},
      r"dtype 'M8' is not a plain numeric dtype")
  npy("npy_dtype_built_twice.npy",
      {"a": array((1,), Build(dtype("f8"), (3, ">", None, None, None, -1, -1, 0)), b"A" * 8)},
      r"second BUILD on dtype")
  npy("npy_dtype_state_claims_objects.npy",  # flags say "holds objects": ignored, read as f8
      {"a": array((1,), dtype("f8", (3, "<", None, None, None, 8, 8, 63)), b"\0" * 8)}, None)
  npy("npy_dtype_bad_byteorder.npy",
      {"a": array((1,), dtype("f8", (3, "X", None, None, None, -1, -1, 0)), b"A" * 8)},
      r"unexpected state")
  # fixed-width strings (test outputs' motion types): the state's item size must match the name,
  # unicode code points must exist, the width is bounded
  string_state = lambda order, size: (3, order, None, None, None, size, 4, 8)
  add("npy_string_dtype.npy", {"npy": ""}, write_npy_pickle, dumps(
      {"a": array((2,), dtype("U3", string_state("<", 12)), "abcdef".encode("utf-32-le")),
       "b": array((2,), dtype("S2", string_state("|", 2)), b"abcd")}, 3))
  npy("npy_string_dtype_size_mismatch.npy",
      {"a": array((3,), dtype("U3", string_state("<", 4)), b"A" * 12)},
      r"dtype 'U3': its state gives 4 bytes per item, the name 12")
  npy("npy_string_not_unicode.npy", {"a": array((1,), dtype("U1", string_state("<", 4)),
                                                b"\xff" * 4)}, r"code point 0xffffffff")
  npy("npy_string_dtype_too_wide.npy", {"a": array((1,), dtype("U10000000"), b"")},
      r"dtype 'U10000000' is not a plain numeric dtype")
  npy("npy_object_scalar.npy",
      {"a": Call(G("numpy._core.multiarray", "scalar"), (dtype("O8"), b"A" * 8))},
      r"object scalars are refused")
  # --- sizes declared before conversion, with a cap
  npy("npy_shape_claims_more.npy", {"a": array((1000,), dtype("f8"), b"A" * 8)},
      r"needs 8000 bytes, the file gives 8")
  npy("npy_shape_over_cap.npy", {"a": array((10 ** 10,), dtype("f8"), b"A" * 8)},
      r"over the .*-byte cap")
  npy("npy_negative_shape.npy", {"a": array((-1,), dtype("f8"), b"")}, r"invalid shape")
  one_mib = b"\0" * MiB
  npy("npy_memo_budget_bomb.npy",  # one 1 MiB bytes object shared by 200 arrays: 200 MiB
      {"a": [array((MiB // 8,), dtype("f8"), one_mib) for _ in range(200)]},
      r"more than twice the file's size plus the cap")
  add("npy_header_over_cap.npy", {"npy": r"over the .*-byte cap", "hamer": r"over the"},
      write_npy_header, "<f8", (10 ** 10,), b"\0" * 64)
  add("npy_header_truncated.npy", {"npy": r"truncated .npy file", "hamer": r"truncated"},
      write_npy_header, "<f8", (1000,), b"\0" * 64)
  add("npy_header_structured_objects.npy", {"npy": r"holds Python objects"},
      write_npy_header, [("a", "O"), ("b", "<f8")], (1,), b"\0" * 16)
  add("npy_header_dtype_void.npy", {"npy": r"not a plain numeric"}, write_npy_header,
      "|V16", (2,), b"\0" * 32)
  npy("npy_huge_bytes_opcode.npy",
      Raw(b"\x8e" + struct.pack("<Q", 1 << 40) + b"tiny"),
      r"not a readable pickle|out of memory while reading")
  # CPython's C unpickler sizes its memo array by the largest PUT index: 800 MB here
  npy("npy_memo_index_bomb.npy",
      {"hand_pose": Raw(pickle.NONE + pickle.LONG_BINPUT + struct.pack("<I", 50_000_000))}, "")
  # --- allowlisted objects are immutable (BUILD on them is refused)
  npy("npy_build_on_reconstruct.npy", Build(RECONSTRUCT, {"x": 1}), r"BUILD on allowlisted")
  npy("npy_build_on_ndarray_marker.npy", Build(NDARRAY, (None, {"name": "x"})),
      r"BUILD on allowlisted|cannot set attribute")
  npy("npy_build_on_ordereddict.npy", Build(ORDERED, {"a": 1}), r"BUILD on allowlisted")
  npy("npy_array_built_twice.npy", {"a": Build(f64([1.0]), (1, (1,), dtype("f8"), False,
                                                           b"B" * 8))},
      r"second BUILD on an array")
  npy("npy_unbuilt_array.npy", {"a": Call(RECONSTRUCT, (NDARRAY, (0,), b"b"))},
      r"never given its data")
  npy("npy_array_in_a_set.npy", {"a": Call(G("builtins", "set"), ([f64([1.0])],))},
      r"unhashable")
  deep = Raw(pickle.MARK * 5000 + dumps(f64([1.0]), 3, fast=True)[2:-1] + pickle.LIST * 5000)
  npy("npy_deep_nesting.npy", {"a": deep}, r"nested too deeply")
  # --- code payloads, every protocol
  for name, payload in payloads(marker_dir).items():
    npy(f"npy_{name}.npy", {"hand_pose": payload}, GLOBAL_REFUSED)
    pth(f"pth_{name}.pth", {"state_dict": {}, "hyper_parameters": payload}, GLOBAL_REFUSED,
        ckpt_expect="" if name != "importlib" else "not callable")
    mano(f"mano_{name}.pkl", mano_dict(shapedirs=payload), GLOBAL_REFUSED)
  for protocol in range(6):
    npy(f"npy_os_system_protocol{protocol}.npy",
        {"hand_pose": payloads(marker_dir)["os_system"]}, GLOBAL_REFUSED, protocol=protocol)
    real = {"hand_pose": np.zeros((1, 15, 3, 3)), "betas": np.zeros((1, 10), np.float32)}
    add(f"npy_real_dict_protocol{protocol}.npy",
        {"npy": "" if protocol in (3, 4) else GLOBAL_REFUSED}, write_npy_pickle,
        pickle.dumps(real, protocol=protocol))
  # --- torch: arrays only from the archive's storages, bounds against the real buffer
  four = np.arange(4, dtype="<f4").tobytes()
  pth("pth_valid.pth", {"w": tensor("0", 4, (2, 2), (2, 1))}, "", {"0": four}, ckpt_expect=None)
  pth("pth_tensor_on_pickled_array.pth",  # issue 15 item 2: a 4-byte array claiming N elements
      {"w": Call(REBUILD, (array((1,), dtype("f4"), b"AAAA"), 0, (10 ** 6,), (0,), False,
                           Call(ORDERED, ())))},
      r"must be a storage of the archive", ckpt_expect=r"must be a storage of the archive")
  pth("pth_view_past_storage.pth", {"w": tensor("0", 4, (100,), (1,))},
      r"reaches element 99 of storage '0', which holds 4", {"0": four})
  pth("pth_offset_past_storage.pth", {"w": tensor("0", 4, (1,), (1,), offset=10)},
      r"reaches element 10", {"0": four})
  pth("pth_stride0_over_cap.pth", {"w": tensor("0", 4, (10 ** 9,), (0,))}, r"over the .*cap",
      {"0": four})
  pth("pth_stride0_budget.pth",  # 500 stride-0 views of 4 floats, 1 MiB each: 500 MiB
      {f"w{i}": tensor("0", 4, (MiB // 4,), (0,)) for i in range(500)},
      r"more than twice the file's size", {"0": four})
  pth("pth_negative_stride.pth", {"w": tensor("0", 4, (2,), (-1,))}, r"invalid tensor layout",
      {"0": four})
  pth("pth_bool_size.pth", {"w": tensor("0", 4, (True,), (1,))}, r"must be an int",
      {"0": four})
  pth("pth_storage_key_path.pth", {"w": tensor("../../x", 4, (4,), (1,))}, r"not a plain name",
      {"0": four})
  pth("pth_negative_storage_size.pth", {"w": tensor("0", -4, (4,), (1,))}, r"negative size",
      {"0": four})
  pth("pth_storage_declared_twice.pth",
      {"a": tensor("0", 1, (1,), (1,)), "b": tensor("0", 4, (4,), (1,))},
      r"declared twice", {"0": four})
  pth("pth_storage_missing.pth", {"w": tensor("7", 4, (4,), (1,))}, r"missing from the archive",
      {"0": four})
  pth("pth_storage_short.pth", {"w": tensor("0", 400, (4,), (1,))}, r"holds 16 bytes",
      {"0": four})
  pth("pth_persistent_id_junk.pth", {"w": PersistentId(("storage", "x"))},
      r"unsupported persistent id")
  pth("pth_storage_type_forged.pth", {"w": tensor("0", 4, (4,), (1,), storage_type="f8")},
      r"unsupported type", {"0": four})
  pth("pth_rebuild_from_type_junk.pth",
      {"w": Call(G("torch._tensor", "_rebuild_from_type_v2"),
                 ([1, 2], G("torch", "Tensor"), (), {}))},
      r"needs an allowlisted function")
  # item 3: BUILD on the shared FloatStorage stand-in (dict state and slot state)
  pth("pth_build_on_storage_type.pth",
      {"x": Build(STORAGE, {"dtype": "O"}), "w": tensor("0", 4, (4,), (1,))},
      r"BUILD on allowlisted", {"0": four})
  pth("pth_slotstate_on_storage_type.pth",
      {"x": Build(STORAGE, (None, {"dtype": "O"})), "w": tensor("0", 4, (4,), (1,))},
      r"BUILD on allowlisted|cannot set attribute", {"0": four})
  pth("pth_build_on_rebuild_function.pth", {"x": Build(REBUILD, (None, {"__defaults__": (1,)}))},
      r"BUILD on allowlisted|cannot set attribute")
  # zip bombs: only the bytes the pickle declares are decompressed, after the cap check
  bomb = deflate_zeros(256 * MiB)
  pth("pth_deflate_bomb_small_view.pth", {"w": tensor("0", 4, (4,), (1,))}, "",
      entries={"archive/data/0": (bomb, 256 * MiB, zipfile.ZIP_DEFLATED)}, ckpt_expect=None)
  pth("pth_deflate_bomb_declared.pth", {"w": tensor("0", 64 * MiB, (4,), (1,))},
      r"compressed storage .* over the .*cap",
      entries={"archive/data/0": (bomb, 256 * MiB, zipfile.ZIP_DEFLATED)})
  pth("pth_bzip2_bomb.pth", {"w": tensor("0", 4, (4,), (1,))},  # zipfile cannot bound bzip2
      r"compression method 12 .* not accepted",
      entries={"archive/data/0": (bzip2_zeros(128 * MiB), 128 * MiB, zipfile.ZIP_BZIP2)})
  add("pth_pickle_bomb.pth", {"torch": r"data.pkl.* over the .*cap"}, _pickle_bomb, bomb)
  add("pth_not_a_zip.pth", {"torch": r"not a zip archive"},
      lambda p: open(p, "wb").write(dumps({"a": 1})))
  # --- Lightning: unknown globals are inert stubs, which cannot be modified either
  pth("ckpt_os_system_in_hparams.ckpt",
      {"state_dict": {"w": tensor("0", 4, (4,), (1,))},
       "hyper_parameters": payloads(marker_dir)["os_system"]}, GLOBAL_REFUSED, {"0": four},
      ckpt_expect="")
  pth("ckpt_slotstate_on_stub_class.ckpt",
      {"state_dict": {}, "x": Build(G("mymodule", "Thing"), (None, {"global_name": "x"}))},
      GLOBAL_REFUSED, ckpt_expect=r"positional argument")
  # --- safetensors (read_weights)
  st = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
  add("st_valid.safetensors", {"weights": ""}, write_safetensors, st, 16)
  add("st_overlap.safetensors", {"weights": r"b: its data overlaps a's"}, write_safetensors,
      {**st, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16)
  add("st_past_end.safetensors", {"weights": r"past the end of the file"}, write_safetensors,
      {"a": {"dtype": "F32", "shape": [2 ** 28], "data_offsets": [0, 2 ** 30]}}, 16)
  add("st_object_dtype.safetensors", {"weights": r"bad entry"}, write_safetensors,
      {"a": {"dtype": "O", "shape": [2], "data_offsets": [0, 16]}}, 16)
  add("st_huge_header.safetensors", {"weights": r"-byte header"},
      lambda p: open(p, "wb").write(struct.pack("<Q", 1 << 40) + b"{}"))
  # --- MANO
  mano("mano_forged_dtype.pkl", mano_dict(v_template=array((4,), dtype("O8", FORGED), b"A" * 32)),
       r"object array of shape \(4,\) needs a list")
  mano("mano_build_on_ch_class.pkl",
       mano_dict(x=Build(G("chumpy.ch", "Ch"), (None, {"get": 1}))), r"positional argument")
  csc = Call(G("copy_reg", "_reconstructor"), ())  # not allowlisted: refused by name
  mano("mano_copyreg.pkl", mano_dict(J_regressor=csc), GLOBAL_REFUSED)
  add("mano_csc_bomb.pkl", {"mano": r"csc_matrix of shape"}, _mano_csc_bomb)
  add("mano_select_cycle.pkl", {"mano": r"RecursionError|nested too deeply"}, _mano_cycle)
  add("mano_npz_bomb.npz", {"mano": r"key 'v_template': .*over the .*cap"}, _npz_bomb, bomb)
  add("mano_npz_object.npz", {"mano": r"holds Python objects"}, _npz_object)
  return cases


def write_safetensors(path, header: dict, data_size: int):
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + bytes(data_size))


def _pickle_bomb(path, bomb):
  write_pth(path, dumps({"a": 1}))
  with zipfile.ZipFile(path) as z:
    keep = {n: z.read(n) for n in z.namelist() if n != "archive/data.pkl"}
  with zipfile.ZipFile(path, "w") as z:
    for n, d in keep.items():
      z.writestr(n, d)
  _append_entry(path, "archive/data.pkl", bomb, 256 * MiB, zipfile.ZIP_DEFLATED)


def _new_object(module, name, state):
  """cls.__new__(cls) + BUILD(state), as Python 2 pickled new-style objects (the MANO file)."""
  return Raw(pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.EMPTY_TUPLE + pickle.NEWOBJ
             + dumps(state, fast=True)[2:-1] + pickle.BUILD)


def _mano_csc_bomb(path):
  csc = _new_object("scipy.sparse.csc", "csc_matrix",
                    {"_shape": (10 ** 6, 10 ** 6), "data": f64([1.0]),
                     "indices": f64([0.0]), "indptr": f64([0.0])})
  with open(path, "wb") as f:
    f.write(dumps(mano_dict(J_regressor=csc)))


def _mano_cycle(path):
  # a Ch whose x is itself: GLOBAL, EMPTY_TUPLE, NEWOBJ, PUT 0, {x: GET 0}, BUILD
  slot = struct.pack("<I", 1 << 20)  # far above the outer pickle's memo slots
  ch = Raw(pickle.GLOBAL + b"chumpy.ch\nCh\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ
           + pickle.LONG_BINPUT + slot + pickle.EMPTY_DICT + pickle.SHORT_BINUNICODE + b"\x01x"
           + pickle.LONG_BINGET + slot + pickle.SETITEM + pickle.BUILD)
  with open(path, "wb") as f:
    f.write(dumps(mano_dict(shapedirs=ch)))


def _npz_bomb(path, bomb):
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                "shape": (32 * MiB,)})
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("placeholder.txt", b"")
  del bomb
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  body = c.compress(header.getvalue())
  chunk = bytes(MiB)
  body += b"".join(c.compress(chunk) for _ in range(256)) + c.flush()
  _append_entry(path, "v_template.npy", body, len(header.getvalue()) + 256 * MiB,
                zipfile.ZIP_DEFLATED)


def _npz_object(path):
  np.savez(path, v_template=np.array([None, 1], dtype=object))
