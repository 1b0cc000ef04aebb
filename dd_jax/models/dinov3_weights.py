"""The converted DINOv3 weights format, and loading it into a DinoV3 model.


Converted format (what `config.model.backbone.weights` points at), a folder holding:
  dinov3.json  {"format": "dd_jax.dinov3", "format_version": 1, "variant": "dinov3_vitl16" or
               "custom", "config": {DinoV3Config fields}, "num_params": int, "source": str,
               "notes": [str]}
  params/      an Orbax PyTree checkpoint of nnx.to_pure_dict(nnx.state(DinoV3(config))), every
               array float32, block indices as strings "0".."depth-1":
               cls_token (1,1,D), storage_tokens (1,S,D), rope_periods (hd/4,),
               patch_embed.proj.{kernel (p*p*3, D) rows in (kh, kw, c) order, bias},
               blocks.i.{norm1,norm2}.{scale,bias}, blocks.i.attn.qkv.{kernel (D,3D), bias (3D,)
               with the k third zero, absent without qkv bias}, blocks.i.attn.proj.{kernel,bias},
               blocks.i.{ls1,ls2}.gamma, blocks.i.mlp.{fc1,fc2 | w1,w2,w3}.{kernel (in,out), bias},
               norm.{scale,bias}.
Key layouts read: SPEC.md §6 (Meta flat state_dict; HF DINOv3ViTModel, `model.layer.i`/`layer.i`).
tools/convert_dinov3.py writes it (from Meta or Hugging Face files, dd_jax.convert.dinov3);
`load_weights` reads it into a built, possibly sharded model.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dd_jax import params as params_lib
from dd_jax.models.dinov3 import DinoV3, DinoV3Config, config_differences, variant_name

FORMAT = "dd_jax.dinov3"
FORMAT_VERSION = 1
CONFIG_FILE = "dinov3.json"
PARAMS_DIR = "params"


def save_converted(out_dir: str | os.PathLike, config: DinoV3Config, params: dict, *,
                   source: str = "", notes: list[str] | None = None) -> None:
  """Writes `out_dir`/dinov3.json and `out_dir`/params (Orbax); replaces an earlier conversion."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  params_lib.save_tree(os.path.join(out_dir, PARAMS_DIR), params)
  meta = dict(format=FORMAT, format_version=FORMAT_VERSION,
              variant=variant_name(config), config=dataclasses.asdict(config),
              num_params=params_lib.count_params(params), source=str(source),
              notes=list(notes or []))
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)


def read_config(out_dir: str | os.PathLike) -> DinoV3Config:
  """The architecture a save_converted folder holds (its dinov3.json; no arrays read)."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  meta_path = os.path.join(out_dir, CONFIG_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{out_dir}: no {CONFIG_FILE}; convert weights with "
                            f"tools/convert_dinov3.py first")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')}, "
                     f"expected {FORMAT!r} v{FORMAT_VERSION}")
  try:
    return DinoV3Config(**meta["config"])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{meta_path}: bad config {meta.get('config')} ({e})") from None


def load_converted(out_dir: str | os.PathLike) -> tuple[DinoV3Config, dict]:
  """Reads a save_converted folder -> (config, params tree of np.float32, int block keys)."""
  config = read_config(out_dir)
  return config, params_lib.load_tree(os.path.join(os.path.abspath(os.fspath(out_dir)),
                                                   PARAMS_DIR))


def load_weights(model: DinoV3, path: str) -> None:
  """Loads a converted DINOv3 folder (tools/convert_dinov3.py) into `model`.

  The folder's architecture must equal `model.config`; otherwise every differing field is named.
  """
  file_config, params = load_converted(path)
  config = model.config
  if file_config != config:
    raise ValueError(f"{path}: the converted backbone ({variant_name(file_config)}) is not "
                     f"the configured one ({variant_name(config)}): "
                     + "; ".join(config_differences(file_config, config, found_as="checkpoint")))
  params_lib.assign_params(model, params, source=path)
