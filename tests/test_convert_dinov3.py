"""DINOv3 conversion: parity with transformers' DINOv3ViTModel through Meta .pth and HF safetensors
files, the torch-free readers (allowlist, stubs, truncation) and the listed conversion errors."""

import collections
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dd_jax import params as params_lib
from dd_jax import safe_pickle
from dd_jax.convert import dinov3 as convert_dinov3
from dd_jax.convert import torch_file
from dd_jax.models import dinov3, dinov3_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 5e-5

# Reduced-depth stand-ins for the released families. SwiGLU widths are Meta's rule worked by hand:
# vits16plus: int(384*6)=2304 -> int(2*2304/3)=1536 (multiple of 8);
# 7B: int(256*3)=768 -> 512 (multiple of 64); 7B has head dim 128 and no qkv bias.
MODELS = {
    "vits16_like": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                        use_gated_mlp=False, hidden_act="gelu"),
    "vits16plus_like": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                            use_gated_mlp=True, hidden_act="silu"),
    "vit7b_like": dict(hidden_size=256, num_attention_heads=2, intermediate_size=512,
                       use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False),
}
SIZES = [(224, 224), (224, 320)]


# --- the torch side: a randomised HF model and its weights in Meta's and HF's layouts ---------


def make_hf_model(name: str, depth: int = 2) -> DINOv3ViTModel:
  torch.manual_seed(sorted(MODELS).index(name))
  config = DINOv3ViTConfig(num_hidden_layers=depth, num_register_tokens=4,
                           attn_implementation="eager", **MODELS[name])
  model = DINOv3ViTModel(config).eval()  # eval: no RoPE coordinate augmentation
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("lambda1"):
        p.uniform_(0.2, 1.0)
      elif "norm" in key and key.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif key.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      elif p.ndim >= 2 and "token" not in key:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)  # unit-scale activations
      else:
        p.copy_(torch.randn_like(p))
  return model


def hf_to_meta(model: DINOv3ViTModel, periods: torch.Tensor) -> collections.OrderedDict:
  """Meta's flat state_dict for the same network: fused qkv with a random (masked) k bias."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  cfg = model.config
  d = cfg.hidden_size
  gen = torch.Generator().manual_seed(123)
  out = collections.OrderedDict()
  out["cls_token"] = sd["embeddings.cls_token"]
  out["storage_tokens"] = sd["embeddings.register_tokens"]
  out["mask_token"] = torch.randn(1, d, generator=gen)
  out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.weight"]
  out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.bias"]
  out["rope_embed.periods"] = periods
  for i in range(cfg.num_hidden_layers):
    h, b = f"model.layer.{i}.", f"blocks.{i}."
    for n in ("norm1", "norm2"):
      out[b + n + ".weight"], out[b + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
    out[b + "attn.qkv.weight"] = torch.cat(
        [sd[h + f"attention.{x}_proj.weight"] for x in "qkv"], 0)
    if cfg.query_bias:
      k_bias = torch.randn(d, generator=gen)  # Meta stores one; bias_mask keeps it out
      out[b + "attn.qkv.bias"] = torch.cat(
          [sd[h + "attention.q_proj.bias"], k_bias, sd[h + "attention.v_proj.bias"]])
      out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
    out[b + "attn.proj.weight"] = sd[h + "attention.o_proj.weight"]
    out[b + "attn.proj.bias"] = sd[h + "attention.o_proj.bias"]
    out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
    out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    names = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if cfg.use_gated_mlp
             else {"fc1": "up_proj", "fc2": "down_proj"})
    for meta_name, hf_name in names.items():
      for suffix in ("weight", "bias"):
        out[b + f"mlp.{meta_name}.{suffix}"] = sd[h + f"mlp.{hf_name}.{suffix}"]
  out["norm.weight"], out["norm.bias"] = sd["norm.weight"], sd["norm.bias"]
  if not cfg.query_bias:  # like the released 7B: a training-only norm the port must drop
    out["local_cls_norm.weight"] = torch.randn(d, generator=gen)
    out["local_cls_norm.bias"] = torch.randn(d, generator=gen)
  return out


def bf16_periods(model: DINOv3ViTModel) -> torch.Tensor:
  """Periods as released files hold them: 100**(4j/hd) rounded to bfloat16."""
  head_dim = model.config.hidden_size // model.config.num_attention_heads
  j = torch.arange(head_dim // 4, dtype=torch.float64)
  return (100.0 ** (4 * j / head_dim)).to(torch.bfloat16)


def torch_reference(model: DINOv3ViTModel, images: torch.Tensor, periods=None) -> np.ndarray:
  """last_hidden_state (B, T, D); `periods` replaces the recomputed ones (inv_freq = 1/periods)."""
  rope = model.rope_embeddings
  default = rope.inv_freq.clone()
  if periods is not None:
    rope.inv_freq.copy_(1.0 / periods.float())
  try:
    with torch.no_grad():
      return model(pixel_values=images).last_hidden_state.numpy()
  finally:
    rope.inv_freq.copy_(default)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """name -> (hf model, Meta .pth path, HF folder, bf16 periods), written once."""
  root = tmp_path_factory.mktemp("dinov3")
  built = {}
  for name in MODELS:
    model = make_hf_model(name)
    periods = bf16_periods(model)
    pth = root / f"{name}.pth"
    torch.save(hf_to_meta(model, periods), pth)
    model.save_pretrained(root / f"{name}_hf")
    built[name] = (model, str(pth), str(root / f"{name}_hf"), periods)
  return built


# --- the JAX side ---------------------------------------------------------------------------


@nnx.jit
def _forward(model, images):
  return model(images, return_extras=True)


def jax_forward(config, params, images: torch.Tensor) -> dict:
  model = dinov3.DinoV3(config, rngs=nnx.Rngs(0))
  params_lib.assign_params(model, params)
  out = _forward(model, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  return jax.tree.map(np.asarray, out)


def max_errors(out: dict, reference: np.ndarray) -> tuple[float, float]:
  b, h, w, d = out["patch"].shape
  patch_err = np.abs(out["patch"].reshape(b, h * w, d) - reference[:, 5:]).max()
  cls_err = np.abs(out["cls"] - reference[:, 0]).max()
  return float(patch_err), float(cls_err)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(MODELS))
def test_parity_with_transformers(cases, name, size):
  model, pth, hf_dir, periods = cases[name]
  images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
  results = {}
  for layout, path, ref_periods in (("meta", pth, periods), ("hf", hf_dir, None)):
    result = convert_dinov3.convert_with_report(path)
    assert result.layout == layout and result.variant == "custom"
    reference = torch_reference(model, images, ref_periods)
    out = jax_forward(result.config, result.params, images)
    assert out["patch"].dtype == np.float32
    results[layout] = max_errors(out, reference)
  print(f"{name} {size}: max abs (patch, cls) meta .pth {results['meta']}, "
        f"HF safetensors {results['hf']}")
  for layout, (patch_err, cls_err) in results.items():
    assert patch_err < TOLERANCE and cls_err < TOLERANCE, (layout, patch_err, cls_err)


def test_bf16_periods_in_file_are_honoured(cases):
  model, pth, _, periods = cases["vits16_like"]
  config, params = convert_dinov3.convert(pth)
  np.testing.assert_array_equal(params["rope_periods"], periods.float().numpy())
  computed = dinov3.default_rope_periods(config.head_dim)
  assert np.abs(params["rope_periods"] - computed).max() > 0  # bf16 rounding is visible
  images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
  out = jax_forward(config, params, images)
  with_file_periods = max_errors(out, torch_reference(model, images, periods))
  with_computed_periods = max_errors(out, torch_reference(model, images, None))
  assert max(with_file_periods) < TOLERANCE
  assert with_computed_periods[0] > 10 * TOLERANCE, with_computed_periods  # the test can tell


def test_training_only_keys_dropped_with_a_note(cases):
  result = convert_dinov3.convert_with_report(cases["vit7b_like"][1])
  assert result.config.qkv_bias is False and result.config.head_dim == 128
  note = next(n for n in result.notes if n.startswith("ignored training-only keys"))
  assert "mask_token" in note and "local_cls_norm.weight" in note
  result = convert_dinov3.convert_with_report(cases["vits16_like"][1])
  assert any("bias_mask checked" in n for n in result.notes)
  d = result.config.dim
  np.testing.assert_array_equal(result.params["blocks"][0]["attn"]["qkv"]["bias"][d:2 * d], 0)


# --- readers --------------------------------------------------------------------------------


def test_read_torch_file_matches_torch_load(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2).half(),
         "i64": torch.arange(5), "bool": torch.tensor([True, False]),
         "column": base[:, 2], "transposed": base.t(), "param": torch.nn.Parameter(torch.ones(3)),
         "scalar": torch.tensor(2.5), "nested": {"list": [torch.zeros(2), 3, "text"]}}
  torch.save(obj, tmp_path / "x.pth")
  ours = torch_file.read_torch_file(tmp_path / "x.pth")
  theirs = torch.load(tmp_path / "x.pth", weights_only=True)
  for key in ("f32", "bf16", "f16", "i64", "bool", "column", "transposed", "param", "scalar"):
    expected = theirs[key].detach().float().numpy()
    assert ours[key].shape == expected.shape, key
    np.testing.assert_array_equal(np.asarray(ours[key], np.float32), expected, err_msg=key)
  assert ours["bf16"].dtype == ml_dtypes.bfloat16 and ours["i64"].dtype == np.int64
  assert ours["nested"]["list"][1:] == [3, "text"]


class _SmallNet(torch.nn.Module):
  """Nested modules, a BatchNorm (int64 num_batches_tracked buffer) and a persistent buffer."""

  def __init__(self):
    super().__init__()
    self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                    torch.nn.GELU())
    self.head = torch.nn.Linear(4, 2).to(torch.bfloat16)
    self.register_buffer("scale", torch.tensor([0.5, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(3, 2), _SmallNet],
                         ids=["Linear", "SmallNet"])
def test_real_state_dict_pickles_load(tmp_path, make):
  """torch.save(module.state_dict()) pickles an OrderedDict whose `_metadata` comes by BUILD."""
  torch.manual_seed(0)
  module = make()
  torch.save(module.state_dict(), tmp_path / "m.pth")
  ours = torch_file.read_torch_file(tmp_path / "m.pth")
  theirs = torch.load(tmp_path / "m.pth", weights_only=True)
  assert list(ours) == list(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(np.asarray(ours[key], np.float64),
                                  value.double().numpy(), err_msg=key)
  assert ours._metadata == theirs._metadata  # pylint: disable=protected-access


def test_transformers_state_dict_pth_converts_with_the_tool(tmp_path):
  """torch.save(DINOv3ViTModel.state_dict()) -> tools/convert_dinov3.py -> parity."""
  model = make_hf_model("vits16_like")
  torch.save(model.state_dict(), tmp_path / "hf_state_dict.pth")
  assert _tool().main([str(tmp_path / "hf_state_dict.pth"), str(tmp_path / "out"),
                       "--num-heads", "6"]) == 0
  config, params = dinov3_weights.load_converted(tmp_path / "out")
  images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
  patch_err, cls_err = max_errors(jax_forward(config, params, images),
                                  torch_reference(model, images))
  print(f"state_dict .pth via the tool: max abs (patch, cls) {patch_err:.1e}, {cls_err:.1e}")
  assert patch_err < TOLERANCE and cls_err < TOLERANCE


def test_sharded_save_pretrained_converts(tmp_path):
  """save_pretrained with a small max_shard_size: several safetensors files and an index."""
  model = make_hf_model("vits16plus_like")
  model.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
  shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file(), shards
  result = convert_dinov3.convert_with_report(tmp_path / "hf")
  assert result.layout == "hf"
  images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
  patch_err, cls_err = max_errors(jax_forward(result.config, result.params, images),
                                  torch_reference(model, images))
  print(f"{len(shards)} shards: max abs (patch, cls) {patch_err:.1e}, {cls_err:.1e}")
  assert patch_err < TOLERANCE and cls_err < TOLERANCE
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  index["weight_map"]["norm.weight"] = "../elsewhere.safetensors"
  (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(torch_file.TorchFileError, match=r"index\.json.*elsewhere"):
    convert_dinov3.convert(tmp_path / "hf")


def test_conversion_needs_no_torch(cases, tmp_path):
  """Runs the reader and the tool where `import torch` (and safetensors, transformers) fails."""
  _, pth, hf_dir, _ = cases["vits16plus_like"]
  script = (
      "import sys\n"
      "for name in ('torch', 'safetensors', 'transformers'): sys.modules[name] = None\n"
      "from dd_jax.convert import dinov3\n"
      f"meta = dinov3.convert({pth!r})[1]\n"
      f"hf = dinov3.convert({hf_dir!r})[1]\n"
      "from dd_jax.models import dinov3_weights\n"
      f"dinov3_weights.save_converted({str(tmp_path / 'out')!r}, *dinov3.convert({pth!r}))\n"
      "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
      "print('ok', meta['blocks'][1]['mlp']['w3']['kernel'].shape)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120, check=False)
  assert done.returncode == 0 and "ok (1536, 384)" in done.stdout, done.stderr[-2000:]


def _write_pickle_as_pth(path, pickle_bytes: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", "little")


def test_pth_naming_os_system_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / "pwned"
  # GLOBAL os.system, then REDUCE with a command: what a booby-trapped checkpoint holds.
  payload = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
  payload += f"touch {marker}".encode() + b"\x85R."
  pth = tmp_path / "evil.pth"
  _write_pickle_as_pth(pth, payload)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"os\.system"):
    torch_file.read_torch_file(pth)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"os\.system"):
    convert_dinov3.convert(pth)
  stubs = []
  obj = torch_file.read_torch_file(pth, unknown_globals="stub", stub_names=stubs)
  assert isinstance(obj, torch_file.StubObject) and obj.global_name == "os.system"
  assert obj.args == (f"touch {marker}",) and stubs == ["os.system"]
  assert not marker.exists()


class _Hyper:  # stands for a Lightning hyper-parameter object
  def __init__(self):
    self.lr = 1e-3


def test_stub_mode_loads_lightning_like_checkpoints(tmp_path):
  ckpt = tmp_path / "model.ckpt"
  torch.save({"state_dict": {"backbone.w": torch.ones(2)}, "hyper_parameters": _Hyper(),
              "epoch": 3}, ckpt)
  with pytest.raises(safe_pickle.UnsafePickleError,
                     match=r"global '[\w.]*test_convert_dinov3\._Hyper'"):
    torch_file.read_torch_file(ckpt)
  names = []
  obj = torch_file.read_torch_file(ckpt, unknown_globals="stub", stub_names=names)
  np.testing.assert_array_equal(obj["state_dict"]["backbone.w"], np.ones(2, np.float32))
  assert obj["epoch"] == 3 and len(names) == 1 and names[0].endswith("test_convert_dinov3._Hyper")
  hyper = obj["hyper_parameters"]
  assert isinstance(hyper, torch_file.StubObject) and hyper.state == {"lr": 1e-3}


def test_truncated_files_are_reported(cases, tmp_path):
  data = open(cases["vits16_like"][1], "rb").read()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(torch_file.TorchFileError, match="cut.pth: not a zip archive"):
    convert_dinov3.convert(cut)
  st = open(os.path.join(cases["vits16_like"][2], "model.safetensors"), "rb").read()
  cut_st = tmp_path / "cut.safetensors"
  cut_st.write_bytes(st[:len(st) - 1000])
  with pytest.raises(torch_file.TorchFileError, match="past the end of the file"):
    convert_dinov3.convert(cut_st, num_heads=6)


# --- listed conversion errors ------------------------------------------------------------------


def _meta_sd(cases, name="vits16_like"):
  model, _, _, periods = cases[name]
  return hf_to_meta(model, periods)


def test_missing_unexpected_and_misshaped_keys_all_listed(cases, tmp_path):
  sd = _meta_sd(cases)
  del sd["blocks.1.mlp.fc2.bias"], sd["norm.bias"]
  sd["blocks.0.attn.proj.weight"] = torch.zeros(384, 380)
  sd["head.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(convert_dinov3.ConversionError) as error:
    convert_dinov3.convert(tmp_path / "bad.pth")
  message = str(error.value)
  for expected in ("bad.pth", "missing keys (2): blocks.1.mlp.fc2.bias, norm.bias",
                   "unexpected keys (1): head.weight",
                   "blocks.0.attn.proj.weight: (384, 380), expected (384, 384)"):
    assert expected in message, message


def test_bias_mask_that_does_not_mask_k_is_an_error(cases, tmp_path):
  sd = _meta_sd(cases)
  sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 384)
  torch.save(sd, tmp_path / "mask.pth")
  with pytest.raises(convert_dinov3.ConversionError, match=r"blocks\.1\.attn\.qkv\.bias_mask"):
    convert_dinov3.convert(tmp_path / "mask.pth")


def test_variant_insisted_on_lists_the_differences(cases):
  with pytest.raises(convert_dinov3.ConversionError) as error:
    convert_dinov3.convert(cases["vits16_like"][1], variant="vits16")
  message = str(error.value)
  assert "not vits16" in message and "depth: file 2, vits16 12" in message
  assert "missing keys (140)" in message  # blocks 2..11, 14 keys each


def test_hf_model_layer_prefix_and_nonzero_k_bias(cases, tmp_path):
  """Files name blocks `layer.i` (save_pretrained) or `model.layer.i` (the module tree)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  hf_dir = cases["vits16_like"][2]
  tensors = {(("model." + k) if k.startswith("layer.") else k): np.array(v) for k, v in
             torch_file.read_safetensors(os.path.join(hf_dir, "model.safetensors")).items()}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  _, params = convert_dinov3.convert(tmp_path / "model.safetensors", num_heads=6)
  jax.tree.map(np.testing.assert_array_equal, params, convert_dinov3.convert(hf_dir)[1])
  tensors["model.layer.0.attention.k_proj.bias"] = np.ones(384, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert_dinov3.ConversionError,
                     match=r"model\.layer\.0\.attention\.k_proj\.bias is non-zero"):
    convert_dinov3.convert(tmp_path / "model.safetensors", num_heads=6)


# --- the tool and the converted format ---------------------------------------------------------


def _tool():
  spec = importlib.util.spec_from_file_location(
      "convert_dinov3_tool", os.path.join(ROOT, "tools", "convert_dinov3.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tool_writes_a_checkpoint_that_load_weights_loads(cases, tmp_path, capsys):
  pth = cases["vit7b_like"][1]
  out_dir = tmp_path / "converted"
  assert _tool().main([pth, str(out_dir)]) == 0
  printed = capsys.readouterr().out
  assert "variant custom" in printed and "ignored training-only keys" in printed
  meta = json.loads((out_dir / "dinov3.json").read_text())
  assert meta["format"] == "dd_jax.dinov3" and meta["config"]["dim"] == 256
  config, params = convert_dinov3.convert(pth)
  loaded_config, loaded = dinov3_weights.load_converted(out_dir)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  custom = dict(dim=256, depth=2, num_heads=2, ffn="swiglu", ffn_hidden=512, qkv_bias=False)
  model = dinov3.DinoV3(dinov3.get_config("custom", **custom), rngs=nnx.Rngs(0))
  dinov3_weights.load_weights(model, str(out_dir))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), params)
  deeper = dinov3.DinoV3(dinov3.get_config("custom", **{**custom, "depth": 3}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="depth: checkpoint 2, config 3"):
    dinov3_weights.load_weights(deeper, str(out_dir))
  assert _tool().main([pth, str(tmp_path / "x"), "--variant", "vitl16"]) == 1
  assert "not vitl16" in capsys.readouterr().err


def test_param_counts_match_transformers_for_every_variant():
  """Our count = HF's - mask_token + the k third of the qkv bias (HF has no k bias).

  At depth 2 to stay fast (the count is affine in depth); test_dinov3.py checks full depths
  against the PyTorch models' published counts.
  """
  hf_fields = {"mlp": dict(use_gated_mlp=False, hidden_act="gelu"),
               "swiglu": dict(use_gated_mlp=True, hidden_act="silu")}
  for name in dinov3.VARIANTS:
    config = dinov3.get_config(name, depth=2)
    hf_config = DINOv3ViTConfig(
        hidden_size=config.dim, num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_hidden,
        num_register_tokens=4, query_bias=config.qkv_bias, value_bias=config.qkv_bias,
        **hf_fields[config.ffn])
    with torch.device("meta"):
      hf_count = sum(p.numel() for p in DINOv3ViTModel(hf_config).parameters())
    abstract = nnx.eval_shape(lambda c=config: dinov3.DinoV3(c, rngs=nnx.Rngs(0)))
    k_bias = config.depth * config.dim if config.qkv_bias else 0
    assert params_lib.count_params(nnx.state(abstract, nnx.Param)) == hf_count - config.dim + k_bias, name


@pytest.mark.parametrize("name", ["vits16_like", "vits16plus_like"])
def test_gradients_match_transformers(cases, name):
  """Parameter and image gradients of every block (the hand-written backward passes of the
  attention, LayerNorm and GELU MLP) against torch autograd through DINOv3ViTModel."""
  model, _, hf_dir, _ = cases[name]
  gen = torch.Generator().manual_seed(7)
  images = torch.randn(2, 3, 32, 48, generator=gen, requires_grad=True)
  weights = torch.randn(2, 6 + 1, model.config.hidden_size, generator=gen)  # cls + 2x3 patches
  model.zero_grad()
  hidden = model(pixel_values=images).last_hidden_state
  (torch.sum(hidden[:, 0] * weights[:, 0]) + torch.sum(hidden[:, 5:] * weights[:, 1:])).backward()
  grad_sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
             for k, p in model.named_parameters()}
  result = convert_dinov3.convert_with_report(hf_dir)
  _, expected = convert_dinov3.hf_state_dict_to_params(grad_sd, result.config)
  expected = {params_lib.path_str(p): np.asarray(v) for p, v in params_lib.flatten_params(expected)
              if params_lib.path_str(p) != "rope_periods"}  # a buffer, not trained

  jmodel = dinov3.DinoV3(result.config, rngs=nnx.Rngs(0))
  params_lib.assign_params(jmodel, result.params)
  graphdef, params, rest = nnx.split(jmodel, nnx.Param, ...)
  w = jnp.asarray(weights.numpy())

  def loss(params, images):
    out = nnx.merge(graphdef, params, rest)(images, return_extras=True)
    return jnp.sum(out["cls"] * w[:, 0]) + jnp.sum(out["patch"].reshape(2, 6, -1) * w[:, 1:])

  grads, image_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      params, jnp.asarray(images.detach().numpy().transpose(0, 2, 3, 1)))
  got = {params_lib.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  assert set(got) == set(expected)
  for key, ref in expected.items():
    scale = max(np.abs(ref).max(), 1e-3)
    assert np.abs(got[key] - ref).max() < 2e-5 * scale, (key, np.abs(got[key] - ref).max(), scale)
  ref = images.grad.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(image_grad) - ref).max() < 2e-5 * np.abs(ref).max()


# --- streaming conversion ----------------------------------------------------------------------


def _state_dict_pth(cases, tmp_path_factory):
  """torch.save(DINOv3ViTModel.state_dict()) of the reference module: a .pth in HF's layout."""
  path = tmp_path_factory.mktemp("sd") / "vits16plus_state_dict.pth"
  torch.save(cases["vits16plus_like"][0].state_dict(), path)
  return str(path), 6


@pytest.mark.parametrize("source", ["vit7b_like meta .pth", "vits16_like meta .pth",
                                    "vits16plus_like save_pretrained", "module.state_dict() .pth"])
def test_streaming_conversion_equals_in_memory_conversion(cases, tmp_path, tmp_path_factory,
                                                          source):
  """convert_to_folder (lazy reads, one array written at a time) == convert(), bit for bit."""
  name = source.split()[0]
  num_heads = None
  if source.startswith("module"):
    path, num_heads = _state_dict_pth(cases, tmp_path_factory)
  else:
    path = cases[name][1] if "meta" in source else cases[name][2]
  expected = convert_dinov3.convert_with_report(path, num_heads=num_heads)
  streamed = convert_dinov3.convert_to_folder(path, tmp_path / "out", num_heads=num_heads)
  assert streamed.params is None and streamed.notes == expected.notes
  assert streamed.num_params == params_lib.count_params(expected.params)
  config, loaded = dinov3_weights.load_converted(tmp_path / "out")
  assert config == expected.config
  flat = dict(params_lib.flatten_params(loaded))
  want = dict(params_lib.flatten_params(expected.params))
  assert sorted(flat, key=str) == sorted(want, key=str)
  for key, value in want.items():
    assert flat[key].dtype == np.float32 and flat[key].tobytes() == value.tobytes(), key
  assert os.listdir(tmp_path) == ["out"]  # no partial folder left beside it


def test_failed_streaming_conversion_leaves_no_folder_and_keeps_the_old_one(cases, tmp_path):
  """Key problems are raised before anything is written; a value problem found half-way
  (bias_mask of the last block) removes the partial folder; an earlier conversion survives."""
  good = cases["vits16_like"][1]
  out = tmp_path / "out"
  convert_dinov3.convert_to_folder(good, out)
  before = {p.name: p.read_bytes() for p in (out / "params").iterdir()}
  sd = _meta_sd(cases)
  del sd["norm.bias"]
  torch.save(sd, tmp_path / "missing.pth")
  sd = _meta_sd(cases)
  sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 384)
  torch.save(sd, tmp_path / "mask.pth")
  for bad, match in (("missing.pth", r"missing keys \(1\): norm\.bias"),
                     ("mask.pth", r"blocks\.1\.attn\.qkv\.bias_mask")):
    for target in (out, tmp_path / "new"):
      with pytest.raises(convert_dinov3.ConversionError, match=match):
        convert_dinov3.convert_to_folder(tmp_path / bad, target)
  assert sorted(os.listdir(tmp_path)) == ["mask.pth", "missing.pth", "out"]
  assert {p.name: p.read_bytes() for p in (out / "params").iterdir()} == before
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "mine.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not a converted folder"):
    convert_dinov3.convert_to_folder(good, tmp_path / "notes")
  assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


def test_v1_converted_folder_is_refused_with_the_fix(tmp_path):
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "dinov3.json").write_text(json.dumps(
      {"format": "dd_jax.dinov3", "format_version": 1, "config": {}}))
  with pytest.raises(ValueError, match=r"v1 folders \(Orbax params/\) are no longer read: "
                                       r"re-run tools/convert_dinov3.py"):
    dinov3_weights.read_config(tmp_path / "old")
