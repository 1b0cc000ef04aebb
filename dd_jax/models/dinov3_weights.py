"""The converted DINOv3 weights format, and loading it into a DinoV3 model.


Converted format (what `config.model.backbone.weights` points at), a folder (dd_jax.params'
converted folders) holding:
  dinov3.json  {"format": "dd_jax.dinov3", "format_version": 2, "variant": "dinov3_vitl16" or
               "custom", "config": {DinoV3Config fields}, "num_params": int, "source": str,
               "notes": [str], "arrays": {dotted path: shape}}
  params/      <dotted path>.npy, one float32 array per variable of
               nnx.to_pure_dict(nnx.state(DinoV3(config))), block indices "0".."depth-1":
               cls_token (1,1,D), storage_tokens (1,S,D), rope_periods (hd/4,),
               patch_embed.proj.{kernel (p*p*3, D) rows in (kh, kw, c) order, bias},
               blocks.i.{norm1,norm2}.{scale,bias}, blocks.i.attn.qkv.{kernel (D,3D), bias (3D,)
               with the k third zero, absent without qkv bias}, blocks.i.attn.proj.{kernel,bias},
               blocks.i.{ls1,ls2}.gamma, blocks.i.mlp.{fc1,fc2 | w1,w2,w3}.{kernel (in,out), bias},
               norm.{scale,bias}.
Key layouts read: SPEC.md §6 (Meta flat state_dict; HF DINOv3ViTModel, `model.layer.i`/`layer.i`).
tools/convert_dinov3.py writes it (from Meta or Hugging Face files, dd_jax.convert.dinov3, one
array at a time); `load_weights` reads it into a built, possibly sharded model, each process
reading only the slices its devices hold. v1 folders (Orbax params/) are refused: re-convert.
"""

from __future__ import annotations

import dataclasses
import os

from dd_jax import params as params_lib
from dd_jax.models.dinov3 import DinoV3, DinoV3Config, config_differences, variant_name

FORMAT = "dd_jax.dinov3"
FORMAT_VERSION = params_lib.CONVERTED_VERSION
CONFIG_FILE = "dinov3.json"
TOOL = "tools/convert_dinov3.py"


def converted_meta(config: DinoV3Config, source: str = "", notes: list[str] | None = None
                   ) -> dict:
  """The format's own fields of dinov3.json (ConvertedWriter.commit adds the rest)."""
  return dict(format=FORMAT, variant=variant_name(config), config=dataclasses.asdict(config),
              source=str(source), notes=list(notes or []))


def save_converted(out_dir: str | os.PathLike, config: DinoV3Config, params: dict, *,
                   source: str = "", notes: list[str] | None = None) -> None:
  """Writes a params tree as a converted folder; replaces an earlier conversion."""
  params_lib.write_converted(out_dir, CONFIG_FILE, converted_meta(config, source, notes), params)


def _meta(out_dir: str | os.PathLike) -> tuple[dict, DinoV3Config]:
  meta = params_lib.read_converted_meta(out_dir, CONFIG_FILE, FORMAT, TOOL)
  try:
    return meta, DinoV3Config(**meta["config"])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{os.path.join(os.fspath(out_dir), CONFIG_FILE)}: bad config "
                     f"{meta.get('config')} ({e})") from None


def read_config(out_dir: str | os.PathLike) -> DinoV3Config:
  """The architecture a converted folder holds (its dinov3.json; no arrays read)."""
  return _meta(out_dir)[1]


def load_converted(out_dir: str | os.PathLike) -> tuple[DinoV3Config, dict]:
  """Reads a converted folder in full -> (config, params tree of np.float32, int block keys)."""
  meta, config = _meta(out_dir)
  return config, params_lib.load_converted_tree(out_dir, meta)


def load_weights(model: DinoV3, path: str) -> None:
  """Loads a converted DINOv3 folder (tools/convert_dinov3.py) into `model`, each array straight
  into its sharding (params.load_converted_into: a process reads only its devices' slices).

  The folder's architecture must equal `model.config`; otherwise every differing field is named.
  """
  meta, file_config = _meta(path)
  config = model.config
  if file_config != config:
    raise ValueError(f"{path}: the converted backbone ({variant_name(file_config)}) is not "
                     f"the configured one ({variant_name(config)}): "
                     + "; ".join(config_differences(file_config, config, found_as="checkpoint")))
  params_lib.load_converted_into(model, path, meta)
