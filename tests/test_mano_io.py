"""Tests for dd_jax.mano.io: the three file layouts, the restricted unpickler, shape validation."""

import os
import pickle
import pickletools
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from dd_jax import safe_pickle
from dd_jax.mano import io as mano_io
from dd_jax.mano import model as mano_model
from dd_jax.synthetic import hand as synthetic

OFFICIAL_GLOBALS = {
    "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype", "__builtin__ set",
    "chumpy.ch Ch", "chumpy.reordering Select", "scipy.sparse.csc csc_matrix"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("mano")
  return {layout: synthetic.write_synthetic_mano(str(folder), layout=layout)
          for layout in ("official", "cleaned", "npz")}


def _globals(path):
  with open(path, "rb") as f:
    data = f.read()
  return data, {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_official_layout_is_a_python2_pickle_naming_only_the_official_globals(files):
  data, names = _globals(files["official"])
  assert data[:2] == b"\x80\x02"  # protocol 2
  assert names == OFFICIAL_GLOBALS
  assert os.path.basename(files["official"]) == "SYNTHETIC_MANO_RIGHT.pkl"


def test_all_layouts_read_to_identical_arrays(files):
  source = synthetic.make_synthetic_mano()
  read = {layout: mano_io.read_mano_arrays(path) for layout, path in files.items()}
  for key in list(mano_io.EXPECTED_SHAPES) + ["parents", "J", "hands_coeffs"]:
    for layout in ("cleaned", "npz"):
      np.testing.assert_array_equal(read[layout][key], read["official"][key], err_msg=key)
  # ... and equal to what was written (shapedirs through the Select's idxs, the csc J_regressor).
  for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "hands_mean"):
    np.testing.assert_array_equal(read["official"][key], source[key], err_msg=key)
  np.testing.assert_array_equal(read["official"]["f"], source["f"].astype(np.int64))
  assert read["official"]["parents"].tolist() == list(mano_model.MANO_PARENTS)
  assert read["official"]["bs_style"] == "lbs" and read["npz"]["bs_type"] == "lrotmin"


def test_official_file_loads_with_the_real_classes(files, tmp_path):
  """Independent check of the written format: plain pickle.load with real scipy and a minimal
  fake chumpy package (chumpy itself no longer installs) rebuilds the same matrices."""
  pytest.importorskip("scipy")
  fake = tmp_path / "chumpy"
  fake.mkdir()
  (fake / "__init__.py").write_text("")
  (fake / "ch.py").write_text("class Ch(object):\n  pass\n")
  (fake / "reordering.py").write_text("class Select(object):\n  pass\n")
  script = textwrap.dedent(f"""
      import pickle, sys, numpy as np
      sys.path.insert(0, {str(tmp_path)!r})
      with open({files['official']!r}, 'rb') as f:
        d = pickle.load(f, encoding='latin1')
      sel = d['shapedirs']
      shapedirs = sel.a.x.ravel()[sel.idxs].reshape(sel.preferred_shape)
      np.save({str(tmp_path / 'shapedirs.npy')!r}, shapedirs)
      np.save({str(tmp_path / 'regressor.npy')!r}, d['J_regressor'].toarray())
      print(type(d['J_regressor']).__name__, sel.a.x.shape)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert "csc_matrix (778, 3, 12)" in result.stdout  # the Ch holds extra components
  source = synthetic.make_synthetic_mano()
  np.testing.assert_array_equal(np.load(tmp_path / "shapedirs.npy"), source["shapedirs"])
  np.testing.assert_array_equal(np.load(tmp_path / "regressor.npy"), source["J_regressor"])


def test_loader_needs_neither_chumpy_nor_scipy(files):
  script = textwrap.dedent(f"""
      import sys
      sys.modules['scipy'] = None  # any import of scipy or chumpy now fails
      sys.modules['chumpy'] = None
      from dd_jax.mano import io
      arrays = io.read_mano_arrays({files['official']!r})
      print(arrays['J_regressor'].shape, arrays['shapedirs'].shape)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "(16, 778) (778, 3, 10)" in result.stdout


def test_load_mano_builds_a_model(files):
  model = mano_io.load_mano(files["official"], tip_ids=mano_model.SMPLX_TIP_IDS)
  assert model.tip_ids == mano_model.SMPLX_TIP_IDS
  assert model.v_template.dtype == jnp.float32 and model.faces.shape == (1538, 3)
  reference = synthetic.synthetic_mano_model()
  np.testing.assert_array_equal(np.asarray(model.blend_directions),
                                np.asarray(reference.blend_directions))
  np.testing.assert_array_equal(model.faces, reference.faces)


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refuses_other_globals_and_executes_nothing(tmp_path):
  marker = tmp_path / "executed"
  payload = {"v_template": np.zeros((778, 3)), "shapedirs": _RunsCode(marker)}
  for protocol in (2, 4):
    path = tmp_path / f"evil{protocol}.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"posix\.system|os\.system"):
      mano_io.read_mano_arrays(path)
    assert not marker.exists()
  # Hand-written protocol-0 opcodes: builtins.eval("open(marker, 'w').close()").
  code = f"open({str(marker)!r}, 'w').close()"
  evil = (b"cbuiltins\neval\n(" + pickle.dumps(code, protocol=0)[:-1] + b"tR.")
  path = tmp_path / "eval.pkl"
  path.write_bytes(evil)
  assert pickle.loads(evil) is None and marker.exists()  # the bytes really would execute...
  marker.unlink()
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"builtins\.eval"):
    mano_io.read_mano_arrays(path)
  assert not marker.exists()  # ... but not through the loader


def _write_cleaned(tmp_path, arrays, name="bad.pkl"):
  path = tmp_path / name
  path.write_bytes(pickle.dumps(arrays, protocol=4))
  return path


@pytest.mark.parametrize("key", sorted(mano_io.EXPECTED_SHAPES))
def test_wrong_shape_names_the_key(tmp_path, key):
  arrays = synthetic.make_synthetic_mano()
  arrays[key] = np.asarray(arrays[key])[..., :-1]
  with pytest.raises(ValueError, match=rf"'{key}' has shape .* expected"):
    mano_io.read_mano_arrays(_write_cleaned(tmp_path, arrays))


def test_validation_errors_name_the_file_and_key(tmp_path):
  arrays = synthetic.make_synthetic_mano()
  missing = dict(arrays)
  del missing["weights"]
  path = _write_cleaned(tmp_path, missing, "missing.pkl")
  with pytest.raises(ValueError, match=r"missing.pkl.*\['weights'\]"):
    mano_io.read_mano_arrays(path)
  bad = dict(arrays, posedirs=np.where(np.arange(3)[None, :, None] == 0, np.nan,
                                       arrays["posedirs"]))
  with pytest.raises(ValueError, match="'posedirs' contains non-finite"):
    mano_io.read_mano_arrays(_write_cleaned(tmp_path, bad))
  tree = arrays["kintree_table"].copy()
  tree[0, 5] = 0
  with pytest.raises(ValueError, match="'kintree_table' parents"):
    mano_io.read_mano_arrays(_write_cleaned(tmp_path, dict(arrays, kintree_table=tree)))
  faces = arrays["f"].astype(np.int64)
  faces[0, 0] = 778
  with pytest.raises(ValueError, match="'f' has vertex ids"):
    mano_io.read_mano_arrays(_write_cleaned(tmp_path, dict(arrays, f=faces)))
  npz = tmp_path / "object.npz"
  np.savez(npz, **dict(arrays, weights=np.array([None], dtype=object)))
  with pytest.raises(ValueError, match="'weights'"):
    mano_io.read_mano_arrays(npz)
  with pytest.raises(FileNotFoundError, match="nowhere.pkl"):
    mano_io.read_mano_arrays(tmp_path / "nowhere.pkl")


def test_root_parent_stored_as_uint32_max_or_minus_one(tmp_path):
  arrays = synthetic.make_synthetic_mano()
  assert arrays["kintree_table"][0, 0] == 4294967295
  for root in (4294967295, -1):
    tree = arrays["kintree_table"].copy()
    tree[0, 0] = root
    read = mano_io.read_mano_arrays(_write_cleaned(tmp_path, dict(arrays, kintree_table=tree)))
    assert read["parents"][0] == -1


def test_cleaned_pickle_with_scipy_sparse_regressor(tmp_path):
  """Cleaned files in the wild keep J_regressor as a scipy csc_matrix (new module path)."""
  sparse = pytest.importorskip("scipy.sparse")
  arrays = synthetic.make_synthetic_mano()
  arrays["J_regressor"] = sparse.csc_matrix(arrays["J_regressor"])
  path = _write_cleaned(tmp_path, arrays)
  read = mano_io.read_mano_arrays(path)
  np.testing.assert_array_equal(read["J_regressor"], arrays["J_regressor"].toarray())
