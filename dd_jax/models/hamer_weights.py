"""The converted HaMeR weights format, and loading it into a Hamer model.

Converted format (dd_jax.params' converted folders, as dd_jax.models.dinov3_weights'):
  hamer.json  {"format": "dd_jax.hamer", "format_version": 2, "variant": "hamer_vith" or
              "custom", "config": {HamerConfig fields}, "num_params": int, "source": str,
              "notes": [str], "arrays": {dotted path: shape}}
  params/     <dotted path>.npy, one float32 array per variable of
              nnx.to_pure_dict(nnx.state(Hamer(config))), block indices as strings:
              backbone.{patch_embed.proj.{kernel (p*p*3, D) rows in (kh, kw, c) order, bias},
              pos_embed (1, 1+h*w, D), blocks.i.{norm1, norm2}.{scale, bias},
              blocks.i.attn.{qkv, proj}.{kernel (in, out), bias}, blocks.i.mlp.{fc1, fc2},
              last_norm}; mano_head.{token_embedding, pos_embedding, blocks.i.self_attn.{norm,
              to_qkv, to_out}, blocks.i.cross_attn.{norm, to_q, to_kv, to_out},
              blocks.i.feed_forward.{norm, mlp.fc1, mlp.fc2}, decpose, decshape, deccam,
              init_hand_pose (1, 96), init_betas (1, 10), init_cam (1, 3)}.

tools/convert_hamer.py writes it (from HaMeR's .ckpt, dd_jax.convert.hamer); `load_weights`
reads it into a built, possibly sharded model.
"""

from __future__ import annotations

import dataclasses
import os

from dd_jax import params as params_lib
from dd_jax.models.hamer import Hamer, HamerConfig, variant_name

FORMAT = "dd_jax.hamer"
FORMAT_VERSION = params_lib.CONVERTED_VERSION
CONFIG_FILE = "hamer.json"
TOOL = "tools/convert_hamer.py"
MEAN_PARAMS = ("init_hand_pose", "init_betas", "init_cam")


def save_converted(out_dir: str | os.PathLike, config: HamerConfig, params: dict, *,
                   source: str = "", notes: list[str] | None = None) -> None:
  """Writes a params tree as a converted folder; replaces an earlier conversion."""
  meta = dict(format=FORMAT, variant=variant_name(config), config=dataclasses.asdict(config),
              source=str(source), notes=list(notes or []))
  params_lib.write_converted(out_dir, CONFIG_FILE, meta, params)


def _meta(out_dir: str | os.PathLike) -> tuple[dict, HamerConfig]:
  meta = params_lib.read_converted_meta(out_dir, CONFIG_FILE, FORMAT, TOOL)
  try:
    config = HamerConfig.from_dict(meta["config"])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{os.path.join(os.fspath(out_dir), CONFIG_FILE)}: bad config ({e})") from None
  missing = [name for name in MEAN_PARAMS if f"mano_head.{name}" not in meta["arrays"]]
  if missing:
    raise ValueError(f"{out_dir}: no mean parameters mano_head.{missing}")
  return meta, config


def read_config(out_dir: str | os.PathLike) -> HamerConfig:
  return _meta(out_dir)[1]


def load_converted(out_dir: str | os.PathLike) -> tuple[HamerConfig, dict]:
  """A converted folder, read in full -> (config, params tree of np.float32, int block keys)."""
  meta, config = _meta(out_dir)
  return config, params_lib.load_converted_tree(out_dir, meta)


def load_weights(model: Hamer, path: str) -> None:
  """Loads a converted HaMeR folder into `model` (shardings kept, each array read straight into
  them); its architecture must be `model.config`."""
  meta, file_config = _meta(path)
  if file_config != model.config:
    raise ValueError(f"{path}: the converted HaMeR ({variant_name(file_config)}: "
                     f"{file_config}) is not the configured one ({model.config})")
  params_lib.load_converted_into(model, path, meta)
