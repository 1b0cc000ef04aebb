"""DINOv3 weights -> dd_jax: Meta .pth and Hugging Face safetensors read without PyTorch.

`convert_to_folder` streams a file into the converted format of dd_jax.models.dinov3_weights:
the source is read lazily (torch_file's lazy=True) and each converted array is written before the
next is read, so host memory holds a few arrays, never the whole float32 tree (the bound:
docs/weights.md). `convert` returns (DinoV3Config, params) in the layout of
nnx.state(DinoV3(config)) through the same code, collecting the arrays in memory.
Key layouts read: SPEC.md §6 (Meta flat state_dict; HF DINOv3ViTModel, `model.layer.i`/`layer.i`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import numpy as np

from dd_jax import params as params_lib
from dd_jax.convert import torch_file
from dd_jax.models import dinov3 as dinov3_model
from dd_jax.models import dinov3_weights
from dd_jax.models.dinov3 import DinoV3Config

# Training-only Meta keys, dropped on purpose: mask_token replaces masked patches in iBOT
# training; local_cls_norm (7B, SAT493M ViT-L) normalises local crops' class token in training.
META_TRAINING_ONLY = ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias")
HF_TRAINING_ONLY = ("embeddings.mask_token",)


class ConversionError(ValueError):
  """The weights do not fit a DINOv3 model; the message lists every problem found."""


@dataclasses.dataclass
class ConversionResult:
  config: DinoV3Config
  # nested, np.float32, layout of nnx.to_pure_dict(nnx.state(DinoV3(config))); None when the
  # arrays were streamed into a folder (convert_to_folder)
  params: dict | None
  variant: str  # a VARIANTS name or "custom"
  layout: str  # "meta" or "hf"
  notes: list[str]
  num_params: int


# Where converted arrays go, one at a time: sink(path in the params tree, float32 array).
Sink = Callable[[tuple, np.ndarray], None]


# ---------------------------------------------------------------------------------------------
# Key tables: for each model variable, the source keys, their expected torch shapes, and how the
# torch arrays combine into the JAX array.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
  target: tuple  # path in the params tree
  sources: list[tuple[str, tuple, bool]]  # (key, torch shape, required)
  combine: Callable[..., np.ndarray]  # source arrays (None if optional and absent) -> array


class _EntryProblem(Exception):
  pass


def _identity(a):
  return a


def _linear_kernel(w):
  return w.T  # torch (out, in) -> (in, out)


def _k_mask(dim: int) -> np.ndarray:
  return np.concatenate([np.ones(dim), np.zeros(dim), np.ones(dim)]).astype(np.float32)


def _table(c: DinoV3Config, layout: str, hf_layer_prefix: str = "layer.") -> list[_Entry]:
  """The entries for `layout` 'meta' (SPEC.md §6 Meta keys) or 'hf' (DINOv3ViTModel keys)."""
  d, h, p, hf = c.dim, c.ffn_hidden, c.patch_size, layout == "hf"

  def simple(target, meta_key, hf_key, shape, combine=_identity):
    return _Entry(target, [(hf_key if hf else meta_key, shape, True)], combine)

  conv_kernel = lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d)
  default_periods = dinov3_model.default_rope_periods(c.head_dim, c.rope_base)
  table = [
      simple(("cls_token",), "cls_token", "embeddings.cls_token", (1, 1, d)),
      simple(("storage_tokens",), "storage_tokens", "embeddings.register_tokens",
             (1, c.num_storage_tokens, d)),
      simple(("patch_embed", "proj", "kernel"), "patch_embed.proj.weight",
             "embeddings.patch_embeddings.weight", (d, 3, p, p), conv_kernel),
      simple(("patch_embed", "proj", "bias"), "patch_embed.proj.bias",
             "embeddings.patch_embeddings.bias", (d,)),
      # HF keeps no periods (inv_freq is a non-persistent buffer): it recomputes them in float32.
      _Entry(("rope_periods",), [] if hf else [("rope_embed.periods", (c.head_dim // 4,), False)],
             lambda x=None: default_periods if x is None else x),
  ]
  ffn_layers = ({"fc1": ("up_proj", (h, d)), "fc2": ("down_proj", (d, h))} if c.ffn == "mlp"
                else {"w1": ("gate_proj", (h, d)), "w2": ("up_proj", (h, d)),
                      "w3": ("down_proj", (d, h))})
  for i in range(c.depth):
    m, f, t = f"blocks.{i}.", f"{hf_layer_prefix}{i}.", ("blocks", i)
    for norm in ("norm1", "norm2"):
      for suffix, leaf in (("weight", "scale"), ("bias", "bias")):
        table.append(simple(t + (norm, leaf), f"{m}{norm}.{suffix}", f"{f}{norm}.{suffix}", (d,)))
    a = f + "attention."
    if hf:
      table.append(_Entry(t + ("attn", "qkv", "kernel"),
                          [(a + f"{x}_proj.weight", (d, d), True) for x in "qkv"],
                          lambda q, k, v: np.concatenate([q, k, v], axis=0).T))
    else:
      table.append(simple(t + ("attn", "qkv", "kernel"), m + "attn.qkv.weight", "", (3 * d, d),
                          _linear_kernel))
    if c.qkv_bias and hf:
      table.append(_Entry(t + ("attn", "qkv", "bias"),
                          [(a + "q_proj.bias", (d,), True), (a + "k_proj.bias", (d,), False),
                           (a + "v_proj.bias", (d,), True)], _hf_qkv_bias(a + "k_proj.bias")))
    elif c.qkv_bias:
      table.append(_Entry(t + ("attn", "qkv", "bias"),
                          [(m + "attn.qkv.bias", (3 * d,), True),
                           (m + "attn.qkv.bias_mask", (3 * d,), False)],
                          _masked_qkv_bias(d, m + "attn.qkv.bias_mask")))
    table.append(simple(t + ("attn", "proj", "kernel"), m + "attn.proj.weight",
                        a + "o_proj.weight", (d, d), _linear_kernel))
    table.append(simple(t + ("attn", "proj", "bias"), m + "attn.proj.bias", a + "o_proj.bias",
                        (d,)))
    for ls, hf_ls in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
      table.append(simple(t + (ls, "gamma"), f"{m}{ls}.gamma", f"{f}{hf_ls}.lambda1", (d,)))
    for name, (hf_name, shape) in ffn_layers.items():
      table.append(simple(t + ("mlp", name, "kernel"), f"{m}mlp.{name}.weight",
                          f"{f}mlp.{hf_name}.weight", shape, _linear_kernel))
      table.append(simple(t + ("mlp", name, "bias"), f"{m}mlp.{name}.bias",
                          f"{f}mlp.{hf_name}.bias", shape[:1]))
  return table + [simple(("norm", "scale"), "norm.weight", "norm.weight", (d,)),
                  simple(("norm", "bias"), "norm.bias", "norm.bias", (d,))]


def _masked_qkv_bias(dim: int, mask_key: str):
  """Meta's LinearKMaskedBias multiplies the bias by bias_mask; it must be [1, 0, 1] by thirds."""

  def combine(bias, bias_mask):
    expected = _k_mask(dim)
    if bias_mask is not None and not np.array_equal(bias_mask, expected):
      raise _EntryProblem(
          f"{mask_key} is not ones/zeros/ones by thirds (zeros on the k part); got values "
          f"{np.unique(bias_mask)[:5]} (NaN: the mask was never initialised)")
    return bias * expected  # what the forward uses; the model masks the k third anyway

  return combine


def _hf_qkv_bias(k_key: str):

  def combine(q, k, v):
    if k is not None and np.any(k != 0):
      raise _EntryProblem(f"{k_key} is non-zero, but DINOv3 masks the k bias (SPEC.md §2.1)")
    return np.concatenate([q, np.zeros_like(q), v])

  return combine


def _problems_error(source: str, config: DinoV3Config, problems: list[str]) -> ConversionError:
  return ConversionError(
      f"{source}: does not fit DINOv3 {dinov3_model.variant_name(config)} ({config}):\n  "
      + "\n  ".join(problems))


def _check_table(state_dict: dict[str, Any], table: list[_Entry], ignorable: tuple[str, ...],
                 config: DinoV3Config, source: str) -> None:
  """Raises ConversionError listing every missing, unexpected or mis-shaped key; reads only the
  shapes (no tensor data: a lazy state_dict stays unread)."""
  missing, mismatched, invalid = [], [], []
  used = set()
  for entry in table:
    for key, shape, required in entry.sources:
      if key not in state_dict:
        if required:
          missing.append(key)
        continue
      used.add(key)
      value = state_dict[key]
      if not isinstance(value, (np.ndarray, torch_file.LazyTensor)):
        invalid.append(f"{key}: a {type(value).__name__}, not an array")
      elif tuple(value.shape) != tuple(shape):
        mismatched.append(f"{key}: {tuple(value.shape)}, expected {tuple(shape)}")
  unexpected = [k for k in state_dict if k not in used and k not in ignorable]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if mismatched:
    problems.append(f"shapes that do not match ({len(mismatched)}): " + "; ".join(mismatched))
  if invalid:
    problems.append("invalid values: " + "; ".join(invalid))
  if problems:
    raise _problems_error(source, config, problems)


def _apply_table(state_dict: dict[str, Any], table: list[_Entry], ignorable: tuple[str, ...],
                 config: DinoV3Config, source: str, notes: list[str], sink: Sink) -> None:
  """Checks every key first (_check_table: nothing reaches `sink` if one is missing, unexpected
  or mis-shaped), then converts entry by entry into `sink`, reading each entry's sources only
  then (LazyTensor) and dropping them before the next. Invalid values (bias_mask, a non-zero k
  bias) are collected over all entries and raised together at the end."""
  _check_table(state_dict, table, ignorable, config, source)
  invalid = []
  for entry in table:
    arrays = [None if key not in state_dict
              else np.asarray(torch_file.materialize(state_dict[key]), dtype=np.float32)
              for key, _, _ in entry.sources]
    try:
      array = np.ascontiguousarray(entry.combine(*arrays), dtype=np.float32)
    except _EntryProblem as e:
      invalid.append(str(e))
      continue
    del arrays  # the sources go before the sink writes
    sink(entry.target, array)
    del array
  if invalid:
    raise _problems_error(source, config, ["invalid values: " + "; ".join(invalid)])
  ignored = [k for k in ignorable if k in state_dict]
  if ignored:
    notes.append("ignored training-only keys: " + ", ".join(ignored))


def _collect(flat: dict) -> Sink:
  """A sink keeping every array in `flat` ({path: array}): the in-memory conversion."""
  return flat.__setitem__


def _nest(flat: dict) -> dict:
  params: dict = {}
  for path, value in flat.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return params


# ---------------------------------------------------------------------------------------------
# Architecture detection from shapes
# ---------------------------------------------------------------------------------------------


def _first_shape(state_dict, keys):
  for key in keys:
    if key in state_dict and hasattr(state_dict[key], "shape"):
      return tuple(state_dict[key].shape)
  return None


def _block_indices(state_dict, pattern: str) -> list[int]:
  regex = re.compile(pattern)
  return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def _resolve_heads(fields: dict, head_dim: int | None, num_heads: int | None,
                   source: str) -> DinoV3Config:
  """Completes `fields` with num_heads from head_dim, the argument, or a unique variant match."""
  dim = fields["dim"]
  if num_heads is None and head_dim:
    if dim % head_dim:
      raise ConversionError(f"{source}: rope periods give head dim {head_dim}, which does not "
                            f"divide dim {dim}")
    num_heads = dim // head_dim
  if num_heads is None:
    matches = [c for c in dinov3_model.VARIANTS.values()
               if all(getattr(c, k) == v for k, v in fields.items())]
    if len(matches) != 1:
      raise ConversionError(
          f"{source}: cannot tell the number of heads from the shapes ({fields}, no rope periods "
          f"or config.json); pass num_heads (--num-heads) or --variant")
    num_heads = matches[0].num_heads
  try:
    return DinoV3Config(num_heads=num_heads, **fields)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from None


def _meta_config(sd: dict, num_heads: int | None, source: str) -> DinoV3Config:
  dim_shape = _first_shape(sd, ["cls_token", "norm.weight", "patch_embed.proj.bias"])
  patch = _first_shape(sd, ["patch_embed.proj.weight"])
  blocks = _block_indices(sd, r"blocks\.(\d+)\.")
  if dim_shape is None or not blocks:
    raise ConversionError(f"{source}: cannot find the model width (cls_token / norm.weight) or any "
                          f"blocks.N.* key; keys start: {sorted(sd)[:10]}")
  swiglu = any(k.endswith(".mlp.w1.weight") for k in sd)
  hidden = _first_shape(sd, [f"blocks.{i}.mlp.{'w1' if swiglu else 'fc1'}.weight" for i in blocks])
  storage = _first_shape(sd, ["storage_tokens"])
  periods = _first_shape(sd, ["rope_embed.periods"])
  fields = dict(dim=dim_shape[-1], depth=max(blocks) + 1, ffn="swiglu" if swiglu else "mlp",
                ffn_hidden=hidden[0] if hidden else 4 * dim_shape[-1],
                qkv_bias=any(k.endswith(".attn.qkv.bias") for k in sd),
                patch_size=patch[-1] if patch else 16,
                num_storage_tokens=storage[1] if storage and len(storage) == 3 else 4)
  head_dim = 4 * periods[0] if periods else None
  return _resolve_heads(fields, head_dim, num_heads, source)


def _hf_layer_prefix(sd: dict) -> str:
  return "model.layer." if any(k.startswith("model.layer.") for k in sd) else "layer."


def _hf_config(sd: dict, hf_json: dict | None, num_heads: int | None, source: str
               ) -> DinoV3Config:
  layer = _hf_layer_prefix(sd)
  dim_shape = _first_shape(sd, ["embeddings.cls_token", "norm.weight"])
  blocks = _block_indices(sd, re.escape(layer) + r"(\d+)\.")
  if dim_shape is None or not blocks:
    raise ConversionError(f"{source}: cannot find embeddings.cls_token / norm.weight or any "
                          f"{layer}N.* key; keys start: {sorted(sd)[:10]}")
  swiglu = any(k.endswith(".mlp.gate_proj.weight") for k in sd)
  hidden = _first_shape(sd, [f"{layer}{i}.mlp.up_proj.weight" for i in blocks])
  patch = _first_shape(sd, ["embeddings.patch_embeddings.weight"])
  storage = _first_shape(sd, ["embeddings.register_tokens"])
  fields = dict(dim=dim_shape[-1], depth=max(blocks) + 1, ffn="swiglu" if swiglu else "mlp",
                ffn_hidden=hidden[0] if hidden else 4 * dim_shape[-1],
                qkv_bias=any(k.endswith("attention.q_proj.bias") for k in sd),
                patch_size=patch[-1] if patch else 16,
                num_storage_tokens=storage[1] if storage and len(storage) == 3 else 4)
  if hf_json:
    if num_heads is None:
      num_heads = hf_json.get("num_attention_heads")
    fields["ln_eps"] = float(hf_json.get("layer_norm_eps", 1e-5))
    fields["rope_base"] = float(hf_json.get("rope_theta", 100.0))
  return _resolve_heads(fields, None, num_heads, source)


# ---------------------------------------------------------------------------------------------
# Public conversion API
# ---------------------------------------------------------------------------------------------


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _check_variant(config: DinoV3Config, variant: str | None, source: str,
                   check: Callable[[DinoV3Config], Any]) -> DinoV3Config:
  """With `variant`, insist the detected architecture is that variant; list every difference
  (fields, then every key whose shape does not fit `variant`: `check`, shapes only)."""
  if variant is None:
    return config
  try:
    wanted = dinov3_model.get_config(variant)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  diffs = [f"{f.name}: file {getattr(config, f.name)!r}, {variant} {getattr(wanted, f.name)!r}"
           for f in dataclasses.fields(DinoV3Config)
           if getattr(config, f.name) != getattr(wanted, f.name)]
  if diffs:
    try:
      check(wanted)
      details = ""
    except ConversionError as e:
      details = "\n" + str(e)
    raise ConversionError(f"{source}: the weights are not {variant} (detected "
                          f"{dinov3_model.variant_name(config)}):\n  " + "\n  ".join(diffs)
                          + details)
  return wanted


def _meta_notes(sd: dict, config: DinoV3Config, notes: list[str]) -> None:
  if "rope_embed.periods" not in sd:
    notes.append("no rope_embed.periods: using float32 periods computed from rope_base")
  if config.qkv_bias and not any(k.endswith("attn.qkv.bias_mask") for k in sd):
    notes.append("no attn.qkv.bias_mask keys: k third of the qkv bias zeroed (the model masks it)")
  elif config.qkv_bias:
    notes.append("attn.qkv.bias_mask checked (zeros on the k third) and applied to the bias")


_HF_NOTE = ("HF weights carry no RoPE periods: using float32 periods computed from rope_theta "
            "(what transformers does)")


def meta_state_dict_to_params(state_dict: dict[str, Any], config: DinoV3Config | None = None, *,
                              prefix: str = "", source: str = "state_dict",
                              notes: list[str] | None = None) -> tuple[DinoV3Config, dict]:
  """Meta-layout keys under `prefix` (others are left alone) -> (config, params tree).

  `config` None detects the architecture from the shapes. Used by the Lightning converter with
  prefix "backbone.backbone.model.".
  """
  sd = _strip_prefix(state_dict, prefix)
  if config is None:
    config = _meta_config(sd, None, source)
  notes = [] if notes is None else notes
  flat: dict = {}
  _apply_table(sd, _table(config, "meta"), META_TRAINING_ONLY, config, source, notes,
               _collect(flat))
  _meta_notes(sd, config, notes)
  return config, _nest(flat)


def hf_state_dict_to_params(state_dict: dict[str, Any], config: DinoV3Config | None = None, *,
                            prefix: str = "", hf_json: dict | None = None,
                            num_heads: int | None = None, source: str = "state_dict",
                            notes: list[str] | None = None) -> tuple[DinoV3Config, dict]:
  """HF DINOv3ViTModel keys under `prefix` -> (config, params tree); hf_json = its config.json."""
  sd = _strip_prefix(state_dict, prefix)
  if config is None:
    config = _hf_config(sd, hf_json, num_heads, source)
  notes = [] if notes is None else notes
  flat: dict = {}
  _apply_table(sd, _table(config, "hf", _hf_layer_prefix(sd)), HF_TRAINING_ONLY, config, source,
               notes, _collect(flat))
  notes.append(_HF_NOTE)
  return config, _nest(flat)


def read_state_dict(path: str | os.PathLike, *, lazy: bool = False
                    ) -> tuple[dict[str, Any], str, dict | None]:
  """(flat state_dict, layout 'meta'|'hf', HF config.json or None) of a Meta .pth, a
  .safetensors file or an HF model folder; lazy=True: LazyTensors (torch_file.read_weights)."""
  path = os.fspath(path)
  state_dict, hf_json = torch_file.read_weights(path, lazy=lazy)
  if any(k.endswith("patch_embed.proj.weight") for k in state_dict):
    layout = "meta"
  elif any(k.endswith("embeddings.patch_embeddings.weight") for k in state_dict):
    layout = "hf"
  else:
    raise ConversionError(
        f"{path}: neither a Meta DINOv3 state_dict (patch_embed.proj.weight) nor a Hugging Face "
        f"DINOv3ViTModel (embeddings.patch_embeddings.weight); keys start: "
        f"{sorted(state_dict)[:8]}")
  if hf_json is not None and hf_json.get("model_type") != "dinov3_vit":
    hf_json = None
  return state_dict, layout, hf_json


def _convert(path: str, variant: str | None, num_heads: int | None, sink: Sink
             ) -> ConversionResult:
  """Reads `path` lazily, checks every key, then converts entry by entry into `sink`."""
  state_dict, layout, hf_json = read_state_dict(path, lazy=True)
  marker = "patch_embed.proj.weight" if layout == "meta" else "embeddings.patch_embeddings.weight"
  prefix = next(k for k in state_dict if k.endswith(marker))[:-len(marker)]
  unprefixed = [k for k in state_dict if not k.startswith(prefix)]
  if unprefixed:
    raise ConversionError(f"{path}: keys outside the model prefix {prefix!r}: "
                          + ", ".join(unprefixed))
  sd = _strip_prefix(state_dict, prefix)
  del state_dict
  notes = [f"keys prefixed {prefix!r}"] if prefix else []
  if variant is not None and num_heads is None:
    try:  # only used where the shapes cannot tell
      num_heads = dinov3_model.get_config(variant).num_heads
    except ValueError as e:
      raise ConversionError(str(e)) from None
  if layout == "meta":
    table = lambda c: _table(c, "meta")
    ignorable, detected = META_TRAINING_ONLY, _meta_config(sd, num_heads, path)
  else:
    table = lambda c: _table(c, "hf", _hf_layer_prefix(sd))
    ignorable, detected = HF_TRAINING_ONLY, _hf_config(sd, hf_json, num_heads, path)
  config = _check_variant(detected, variant, path,
                          lambda c: _check_table(sd, table(c), ignorable, c, path))
  count = [0]

  def counting_sink(target, array):
    count[0] += array.size
    sink(target, array)

  _apply_table(sd, table(config), ignorable, config, path, notes, counting_sink)
  if layout == "meta":
    _meta_notes(sd, config, notes)
  else:
    notes.append(_HF_NOTE)
  return ConversionResult(config, None, dinov3_model.variant_name(config), layout, notes,
                          count[0])


def convert_with_report(path: str | os.PathLike, variant: str | None = None, *,
                        num_heads: int | None = None) -> ConversionResult:
  """Reads and converts `path` in memory; the architecture comes from the shapes (`variant`
  insists)."""
  flat: dict = {}
  result = _convert(os.fspath(path), variant, num_heads, _collect(flat))
  result.params = _nest(flat)
  return result


def convert_to_folder(path: str | os.PathLike, out_dir: str | os.PathLike,
                      variant: str | None = None, *, num_heads: int | None = None
                      ) -> ConversionResult:
  """Streams `path` into the converted folder `out_dir` (dd_jax.models.dinov3_weights), one
  array at a time (result.params None). Key problems are raised before anything is written; a
  failed conversion leaves no folder behind and an earlier `out_dir` as it was."""
  path = os.fspath(path)
  with params_lib.ConvertedWriter(out_dir, dinov3_weights.CONFIG_FILE) as writer:
    result = _convert(path, variant, num_heads, writer.write)
    writer.commit(dinov3_weights.converted_meta(result.config, path, result.notes))
  return result


def convert(path: str | os.PathLike, variant: str | None = None, *,
            num_heads: int | None = None) -> tuple[DinoV3Config, dict]:
  """A Meta .pth / HF safetensors file or folder -> (config, params tree of np.float32)."""
  result = convert_with_report(path, variant, num_heads=num_heads)
  return result.config, result.params
