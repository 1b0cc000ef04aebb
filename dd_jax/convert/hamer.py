"""HaMeR's released checkpoint -> dd_jax, without torch: the Lightning `.ckpt` (+ optionally
`mano_mean_params.npz`) to the params of dd_jax.models.hamer.Hamer, which tools/convert_hamer.py
saves in the converted format of dd_jax.models.hamer_weights.

The checkpoint is read through dd_jax's allowlisted torch reader: its hyper_parameters (an
omegaconf DictConfig) and any other pickled object become inert stubs and nothing in the file
runs. Skipped on purpose: discriminator.* (adversarial training only), mano.* (smplx's MANO
buffers: dd_jax computes keypoints with its own MANO from the user's MANO_RIGHT.pkl) and
`initialized` (an ActNorm flag). Every missing, unexpected or mis-shaped key is listed at once.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import numpy as np
from flax import nnx

from dd_jax.convert import lightning
from dd_jax.models import hamer as hamer_model
from dd_jax.models.hamer import HamerConfig

SKIPPED_PREFIXES = {"discriminator.": "the adversarial discriminator (training only)",
                    "mano.": "smplx MANO buffers (dd_jax uses its own MANO)"}
SKIPPED_KEYS = {"initialized": "ActNorm initialisation flag (unused)"}
MEAN_PARAMS = {"init_hand_pose": "pose", "init_betas": "shape", "init_cam": "cam"}


class ConversionError(ValueError):
  """The checkpoint does not fit the HaMeR network; the message lists every problem."""


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  return w.T  # torch (out, in) -> (in, out)


def _key_table(config: HamerConfig) -> dict[str, tuple[tuple, Any]]:
  """checkpoint key -> (params path, torch array -> dd_jax array)."""
  p = config.backbone.patch_size
  d = config.backbone.dim
  table: dict[str, tuple[tuple, Any]] = {}

  def linear(key, path, bias=True):
    table[key + ".weight"] = (path + ("kernel",), _linear_kernel)
    if bias:
      table[key + ".bias"] = (path + ("bias",), None)

  def norm(key, path):
    table[key + ".weight"] = (path + ("scale",), None)
    table[key + ".bias"] = (path + ("bias",), None)

  table["backbone.patch_embed.proj.weight"] = (
      ("backbone", "patch_embed", "proj", "kernel"),
      lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d))
  table["backbone.patch_embed.proj.bias"] = (("backbone", "patch_embed", "proj", "bias"), None)
  table["backbone.pos_embed"] = (("backbone", "pos_embed"), None)
  for i in range(config.backbone.depth):
    k, t = f"backbone.blocks.{i}.", ("backbone", "blocks", i)
    norm(k + "norm1", t + ("norm1",))
    norm(k + "norm2", t + ("norm2",))
    linear(k + "attn.qkv", t + ("attn", "qkv"), bias=config.backbone.qkv_bias)
    linear(k + "attn.proj", t + ("attn", "proj"))
    linear(k + "mlp.fc1", t + ("mlp", "fc1"))
    linear(k + "mlp.fc2", t + ("mlp", "fc2"))
  norm("backbone.last_norm", ("backbone", "last_norm"))

  h = "mano_head."
  table[h + "transformer.pos_embedding"] = (("mano_head", "pos_embedding"), None)
  linear(h + "transformer.to_token_embedding", ("mano_head", "token_embedding"))
  for i in range(config.head.depth):
    k, t = f"{h}transformer.transformer.layers.{i}.", ("mano_head", "blocks", i)
    norm(k + "0.norm", t + ("self_attn", "norm"))
    linear(k + "0.fn.to_qkv", t + ("self_attn", "to_qkv"), bias=False)
    linear(k + "0.fn.to_out.0", t + ("self_attn", "to_out"))
    norm(k + "1.norm", t + ("cross_attn", "norm"))
    linear(k + "1.fn.to_q", t + ("cross_attn", "to_q"), bias=False)
    linear(k + "1.fn.to_kv", t + ("cross_attn", "to_kv"), bias=False)
    linear(k + "1.fn.to_out.0", t + ("cross_attn", "to_out"))
    norm(k + "2.norm", t + ("feed_forward", "norm"))
    linear(k + "2.fn.net.0", t + ("feed_forward", "mlp", "fc1"))
    linear(k + "2.fn.net.3", t + ("feed_forward", "mlp", "fc2"))
  for name in ("decpose", "decshape", "deccam"):
    linear(h + name, ("mano_head", name))
  for name in MEAN_PARAMS:
    table[h + name] = (("mano_head", name), None)
  return table


@functools.lru_cache(maxsize=4)
def expected_shapes(config: HamerConfig) -> dict[tuple, tuple[int, ...]]:
  """params path -> shape of every variable of Hamer(config), without allocating it."""
  abstract = nnx.eval_shape(lambda: hamer_model.Hamer(config, rngs=nnx.Rngs(0)))
  return {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(abstract))}


def read_mean_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """mano_mean_params.npz -> {init_hand_pose (1, 96), init_betas (1, 10), init_cam (1, 3)}.
  An .npz holds no pickles unless asked: np.load(allow_pickle=False) runs nothing."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      found = {k: np.asarray(npz[k], np.float32) for k in npz.files}
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: not a readable .npz of mean parameters ({e})") from None
  missing = [k for k in MEAN_PARAMS.values() if k not in found]
  if missing:
    raise ConversionError(f"{path}: missing keys {missing} (has {sorted(found)})")
  return {name: found[key].reshape(1, -1) for name, key in MEAN_PARAMS.items()}


def state_dict_to_params(state_dict: dict[str, Any], config: HamerConfig, *,
                         mean_params: dict[str, np.ndarray] | None = None,
                         source: str = "checkpoint", notes: list[str] | None = None) -> dict:
  """HaMeR's state_dict -> nested params of Hamer(config) (np.float32).

  `mean_params` (read_mean_params) stands in for init_* buffers the checkpoint lacks; where the
  checkpoint has them they win (as load_from_checkpoint lets them), and a difference is noted.
  Raises ConversionError listing every problem.
  """
  notes = [] if notes is None else notes
  table = _key_table(config)
  shapes = expected_shapes(config)
  params: dict = {}
  missing, mismatched, invalid, unexpected = [], [], [], []
  skipped: dict[str, int] = {}
  for key in state_dict:
    reason = next((why for prefix, why in SKIPPED_PREFIXES.items() if key.startswith(prefix)),
                  SKIPPED_KEYS.get(key))
    if reason is not None:
      skipped[reason] = skipped.get(reason, 0) + 1
    elif key not in table:
      unexpected.append(key)
  for key, (path, transform) in table.items():
    name = key.rpartition(".")[2]
    if key not in state_dict:
      if name in MEAN_PARAMS and mean_params is not None:
        _set(params, path, mean_params[name])
        notes.append(f"{key}: not in the checkpoint, taken from the mean-parameter file")
      else:
        missing.append(key)
      continue
    value = state_dict[key]
    if not isinstance(value, np.ndarray):
      invalid.append(f"{key}: a {type(value).__name__}, not a tensor")
      continue
    array = np.asarray(value, np.float32)
    try:
      array = transform(array) if transform is not None else array
    except ValueError:
      pass  # a shape the transform cannot take: reported just below
    if tuple(array.shape) != shapes[path]:
      mismatched.append(f"{key}: {tuple(value.shape)}, the configured network expects "
                        f"{shapes[path]} (after converting to (in, out) layout)")
      continue
    if name in MEAN_PARAMS and mean_params is not None:
      diff = float(np.max(np.abs(array - mean_params[name].reshape(array.shape))))
      if diff > 0:
        notes.append(f"{key}: the checkpoint's buffer differs from the mean-parameter file by up "
                     f"to {diff:.3g}; the checkpoint's is used (as load_from_checkpoint does)")
    _set(params, path, np.ascontiguousarray(array))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
  if mismatched:
    problems.append(f"shapes that do not match ({len(mismatched)}): " + "; ".join(mismatched))
  if invalid:
    problems.append("invalid values: " + "; ".join(invalid))
  if problems:
    raise ConversionError(f"{source}: does not fit HaMeR {hamer_model.variant_name(config)} "
                          f"({_describe(config)}):\n  " + "\n  ".join(problems))
  for reason, count in skipped.items():
    notes.append(f"skipped {count} key(s): {reason}")
  return params


def _set(tree: dict, path: tuple, value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _describe(config: HamerConfig) -> str:
  b, h = config.backbone, config.head
  return (f"ViT dim {b.dim} depth {b.depth} heads {b.num_heads}; decoder dim {h.dim} depth "
          f"{h.depth} heads {h.heads}x{h.dim_head}")


def detect_sizes(state_dict: dict[str, Any]) -> dict[str, Any]:
  """What the shapes say (for a clearer error when the configured sizes are wrong)."""
  out: dict[str, Any] = {}
  pos = state_dict.get("backbone.pos_embed")
  if isinstance(pos, np.ndarray) and pos.ndim == 3:
    out["backbone.dim"] = pos.shape[2]
  blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
  if blocks:
    out["backbone.depth"] = max(blocks) + 1
  layers = {int(m.group(1)) for k in state_dict
            if (m := re.match(r"mano_head\.transformer\.transformer\.layers\.(\d+)\.", k))}
  if layers:
    out["head.depth"] = max(layers) + 1
  return out


def convert(path: str | os.PathLike, config: HamerConfig | None = None, *,
            mean_params_path: str | os.PathLike | None = None) -> tuple[HamerConfig, dict,
                                                                       list[str]]:
  """Reads a HaMeR .ckpt -> (config, params, notes). `config` defaults to the released sizes."""
  path = os.fspath(path)
  config = config or hamer_model.get_config()
  state_dict, notes = lightning.read_lightning_state_dict(path)
  mean_params = read_mean_params(mean_params_path) if mean_params_path else None
  try:
    params = state_dict_to_params(state_dict, config, mean_params=mean_params, source=path,
                                  notes=notes)
  except ConversionError as e:
    sizes = detect_sizes(state_dict)
    wanted = {"backbone.dim": config.backbone.dim, "backbone.depth": config.backbone.depth,
              "head.depth": config.head.depth}
    diffs = [f"{k}: file {v}, config {wanted[k]}" for k, v in sizes.items() if wanted[k] != v]
    if diffs:
      raise ConversionError(f"{e}\n  the file's sizes differ from the config: "
                            + "; ".join(diffs)) from None
    raise
  return config, params, notes
