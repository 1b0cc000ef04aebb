"""Bounded host memory of the streaming DINOv3 conversion, and converted weights restored straight
into their shardings (each device's slice read from the file, nothing else)."""

import collections
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from test_convert_dinov3 import bf16_periods, hf_to_meta
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dd_jax import parallel
from dd_jax import params as params_lib
from dd_jax.models import dinov3, dinov3_weights

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20



def _peak_growth(mode: str, path: str, out: str) -> int:
  """Peak RSS growth of a conversion in a fresh process: tools/measure_conversion_memory.py's."""
  spec = importlib.util.spec_from_file_location(
      "measure_conversion_memory", os.path.join(ROOT, "tools", "measure_conversion_memory.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool.measure(mode, path, out, ROOT)["growth"]


@pytest.mark.slow
def test_streaming_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path):
  """A 6-block width-1024 Meta .pth (~300 MB float32, largest tensor 16 MiB): the streaming
  conversion's peak RSS growth stays under 3 x the largest float32 entry + 32 MiB (docs/weights.md),
  which the in-memory conversion of the same file exceeds several times over."""
  torch.manual_seed(0)
  config = DINOv3ViTConfig(hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                           num_hidden_layers=6, num_register_tokens=4)
  model = DINOv3ViTModel(config).eval()
  pth = tmp_path / "wide.pth"
  torch.save(hf_to_meta(model, bf16_periods(model)), pth)
  del model
  largest = 4096 * 1024 * 4
  bound = 3 * largest + 32 * MIB
  file_size = os.path.getsize(pth)
  assert file_size > 3 * bound, file_size
  stream = _peak_growth("stream", str(pth), str(tmp_path / "stream"))
  memory = _peak_growth("memory", str(pth), str(tmp_path / "memory"))
  print(f"file {file_size / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB: peak RSS growth "
        f"streaming {stream / MIB:.0f} MiB, in memory {memory / MIB:.0f} MiB")
  assert stream < bound, (stream / MIB, bound / MIB)
  assert memory > bound, "the file is too small for the bound to tell the two apart"
  a = dinov3_weights.load_converted(tmp_path / "stream")[1]
  b = dinov3_weights.load_converted(tmp_path / "memory")[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- restoring into shardings ----------------------------------------------------------------


def _sharded_model(config, mesh):
  """An abstract DinoV3(config) holding zeros in its FSDP shardings (train_state.create_model's
  shardings; zeros instead of a compiled initialisation, to stay fast)."""
  model = nnx.eval_shape(lambda: dinov3.DinoV3(config, rngs=nnx.Rngs(1)))
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.zeros(x.shape, x.dtype)[i]),
      state, parallel.tree_shardings(mesh, state, True)))
  return model


def test_converted_weights_load_shard_by_shard(tmp_path, monkeypatch):
  """8 CPU devices, FSDP: load_weights gives the in-memory load's values in the target
  shardings, and reads from the file exactly each device's slice (never a whole sharded
  array)."""
  config = dinov3.get_config("custom", dim=512, depth=1, num_heads=4, ffn="mlp", ffn_hidden=1024)
  source = dinov3.DinoV3(config, rngs=nnx.Rngs(0))
  dinov3_weights.save_converted(tmp_path / "w", config, nnx.to_pure_dict(nnx.state(source)))
  _, expected = dinov3_weights.load_converted(tmp_path / "w")
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  model = _sharded_model(config, mesh)
  targets = {params_lib.path_str(p): v.get_value().sharding
             for p, v in nnx.to_flat_state(nnx.state(model))}
  sharded = {k for k, s in targets.items() if not s.is_fully_replicated}
  assert {"blocks.0.attn.qkv.kernel", "blocks.0.mlp.fc1.kernel"} <= sharded
  reads = collections.defaultdict(list)
  read_slice = params_lib.read_slice

  def recording(array, index):
    out = read_slice(array, index)
    reads[os.path.basename(array.filename)[:-len(".npy")]].append((index, out.size))
    return out

  monkeypatch.setattr(params_lib, "read_slice", recording)
  dinov3_weights.load_weights(model, str(tmp_path / "w"))
  loaded = nnx.to_flat_state(nnx.state(model))
  want = dict(params_lib.flatten_params(expected))
  assert len(loaded) == len(want)
  for path, var in loaded:
    key = params_lib.path_str(path)
    value = var.get_value()
    np.testing.assert_array_equal(np.asarray(value), want[path], err_msg=key)
    assert value.sharding == targets[key], key
    device_indices = targets[key].addressable_devices_indices_map(value.shape).values()
    allowed = {tuple((s.start, s.stop) for s in idx) for idx in device_indices}
    for index, size in reads[key]:
      assert tuple((s.start, s.stop) for s in index) in allowed, (key, index)
      if key in sharded:
        assert size == np.prod(value.shape) // 8, (key, index, size)
    read = [tuple((s.start, s.stop) for s in i) for i, _ in reads[key]]
    assert len(read) == len(set(read)), (key, read)  # each slice read once
    if key in sharded:  # one slice per device
      assert set(read) == allowed and len(read) == 8, key


# Each of 2 processes (2 CPU devices each) fills a DinoV3 in FSDP shardings over the 4 devices
# from the converted folder, recording what it reads.
_PROCESS = """
import json, os, sys
import jax, numpy as np
from flax import nnx
from dd_jax import parallel, params as params_lib
from dd_jax.models import dinov3, dinov3_weights

folder, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
parallel.join_processes(f"127.0.0.1:{port}", 2, pid, False, 30)
config = dinov3_weights.read_config(folder)
model = nnx.eval_shape(lambda: dinov3.DinoV3(config, rngs=nnx.Rngs(0)))
state = nnx.state(model)
shardings = parallel.tree_shardings(parallel.make_mesh(), state, True)
zeros = jax.tree.map(lambda x, s: jax.make_array_from_callback(
    x.shape, s, lambda i: np.zeros(x.shape, x.dtype)[i]), state, shardings)
nnx.update(model, zeros)
read = {}
original = params_lib.read_slice
def recording(array, index):
  out = original(array, index)
  read[os.path.basename(array.filename)[:-4]] = read.get(os.path.basename(array.filename)[:-4], 0) + out.size
  return out
params_lib.read_slice = recording
dinov3_weights.load_weights(model, folder)
params_lib.read_slice = original
full = dict(params_lib.flatten_params(dinov3_weights.load_converted(folder)[1]))
for path, var in nnx.to_flat_state(nnx.state(model)):
  value = var.get_value()
  for shard in value.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full[path][shard.index])
sizes = {params_lib.path_str(p): int(np.prod(v.get_value().shape))
         for p, v in nnx.to_flat_state(nnx.state(model))}
sharded = sorted(params_lib.path_str(p) for p, v in nnx.to_flat_state(nnx.state(model))
                 if not v.get_value().sharding.is_fully_replicated)
print(json.dumps(dict(read=read, sizes=sizes, sharded=sharded)))
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_each_read_only_their_half(tmp_path):
  """2 processes x 2 devices, FSDP over 4: each process reads from the converted folder only
  the half of each sharded array that its devices hold (and the shards it holds are right)."""
  config = dinov3.get_config("custom", dim=512, depth=1, num_heads=4, ffn="mlp", ffn_hidden=1024)
  source = dinov3.DinoV3(config, rngs=nnx.Rngs(0))
  dinov3_weights.save_converted(tmp_path / "w", config, nnx.to_pure_dict(nnx.state(source)))
  outputs = tiny.run_processes(_PROCESS, str(tmp_path / "w"))
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  sizes, sharded = results[0]["sizes"], results[0]["sharded"]
  assert "blocks.0.mlp.fc1.kernel" in sharded
  for result in results:
    assert set(result["read"]) == set(sizes)
    for key, size in sizes.items():
      assert result["read"][key] == (size // 2 if key in sharded else size), key
