"""The converted HaMeR weights format, and loading it into a Hamer model.

Converted format (as dd_jax.models.dinov3_weights'), a folder holding:
  hamer.json  {"format": "dd_jax.hamer", "format_version": 1, "variant": "hamer_vith" or
              "custom", "config": {HamerConfig fields}, "num_params": int, "source": str,
              "notes": [str]}
  params/     an Orbax PyTree checkpoint of nnx.to_pure_dict(nnx.state(Hamer(config))), float32,
              block indices as strings: backbone.{patch_embed.proj.{kernel (p*p*3, D) rows in
              (kh, kw, c) order, bias}, pos_embed (1, 1+h*w, D), blocks.i.{norm1, norm2}.{scale,
              bias}, blocks.i.attn.{qkv, proj}.{kernel (in, out), bias}, blocks.i.mlp.{fc1, fc2},
              last_norm}; mano_head.{token_embedding, pos_embedding, blocks.i.self_attn.{norm,
              to_qkv, to_out}, blocks.i.cross_attn.{norm, to_q, to_kv, to_out},
              blocks.i.feed_forward.{norm, mlp.fc1, mlp.fc2}, decpose, decshape, deccam,
              init_hand_pose (1, 96), init_betas (1, 10), init_cam (1, 3)}.

tools/convert_hamer.py writes it (from HaMeR's .ckpt, dd_jax.convert.hamer); `load_weights`
reads it into a built, possibly sharded model.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dd_jax import params as params_lib
from dd_jax.models.hamer import Hamer, HamerConfig, variant_name

FORMAT = "dd_jax.hamer"
FORMAT_VERSION = 1
CONFIG_FILE = "hamer.json"
PARAMS_DIR = "params"
MEAN_PARAMS = ("init_hand_pose", "init_betas", "init_cam")


def save_converted(out_dir: str | os.PathLike, config: HamerConfig, params: dict, *,
                   source: str = "", notes: list[str] | None = None) -> None:
  """Writes out_dir/hamer.json and out_dir/params (Orbax); replaces an earlier conversion."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  params_lib.save_tree(os.path.join(out_dir, PARAMS_DIR), params)
  meta = dict(format=FORMAT, format_version=FORMAT_VERSION, variant=variant_name(config),
              config=dataclasses.asdict(config), num_params=params_lib.count_params(params),
              source=str(source), notes=list(notes or []))
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)


def read_config(out_dir: str | os.PathLike) -> HamerConfig:
  out_dir = os.path.abspath(os.fspath(out_dir))
  meta_path = os.path.join(out_dir, CONFIG_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{out_dir}: no {CONFIG_FILE}; convert HaMeR's checkpoint with "
                            "tools/convert_hamer.py first")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                     f"expected {FORMAT!r} v{FORMAT_VERSION}")
  try:
    return HamerConfig.from_dict(meta["config"])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{meta_path}: bad config ({e})") from None


def load_converted(out_dir: str | os.PathLike) -> tuple[HamerConfig, dict]:
  """A save_converted folder -> (config, params tree of np.float32, int block keys)."""
  config = read_config(out_dir)
  params = params_lib.load_tree(os.path.join(os.path.abspath(os.fspath(out_dir)), PARAMS_DIR))
  missing = [name for name in MEAN_PARAMS if name not in params.get("mano_head", {})]
  if missing:
    raise ValueError(f"{out_dir}: no mean parameters mano_head.{missing}")
  return config, params


def load_weights(model: Hamer, path: str) -> None:
  """Loads a converted HaMeR folder into `model` (shardings kept); its architecture must be
  `model.config`."""
  file_config, params = load_converted(path)
  if file_config != model.config:
    raise ValueError(f"{path}: the converted HaMeR ({variant_name(file_config)}: "
                     f"{file_config}) is not the configured one ({model.config})")
  params_lib.assign_params(model, params, source=path)
