"""Small networks for the end-to-end prediction tests: a tiny random HaMeR written as HaMeR's
.ckpt and converted, and a random DeltaDorsal saved as a converted original checkpoint."""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax.convert import hamer as convert_hamer
from dd_jax.convert import lightning
from dd_jax.models import deltadorsal, dinov3, hamer, hamer_weights

import tiny
from reference import hamer as ref

# HaMeR's camera scale (pred_cam[0]) of the test network: a hand about half its crop, as a
# trained HaMeR sees it (the random tiny network's own scale puts a few-pixel hand there).
HAMER_CAM_SCALE = 3.5
HAMER_HEAD_SCALE = 0.05  # output layers scaled down: near the mean hand, still image dependent


def hamer_folder(folder: str) -> str:
  """A tiny random HaMeR saved with torch as HaMeR's .ckpt, converted; returns the folder."""
  import torch  # pylint: disable=import-outside-toplevel
  model = ref.tiny_model(os.path.join(folder, "mano"), seed=7)
  head = model.mano_head
  with torch.no_grad():
    for layer in (head.decpose, head.decshape, head.deccam):
      layer.weight.mul_(HAMER_HEAD_SCALE)
      layer.bias.mul_(HAMER_HEAD_SCALE)
    head.deccam.bias[0] += HAMER_CAM_SCALE - float(head.init_cam[0, 0])
  ckpt = os.path.join(folder, "hamer.ckpt")
  ref.save_checkpoint(ckpt, model, ref.omegaconf_hyper_parameters())
  config, params, notes = convert_hamer.convert(ckpt, hamer.get_config("custom",
                                                                       **ref.TINY_CUSTOM))
  converted = os.path.join(folder, "converted")
  hamer_weights.save_converted(converted, config, params, notes=notes)
  return converted


def deltadorsal_folder(folder: str, task: str = "pose", seed: int = 3) -> str:
  """A random tiny DeltaDorsal (tiny.config) as a converted original checkpoint."""
  config = tiny.config(task, "/unused")
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(0))))
  backbone = deltadorsal.backbone_config_from(config)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param):
      value = rng.normal(0.0, 0.2, var.shape)
    else:
      value = dinov3.default_rope_periods(backbone.head_dim, backbone.rope_base)
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  path = os.path.join(folder, f"deltadorsal_{task}")
  lightning.save_deltadorsal_checkpoint(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                        config, source="random weights")
  return path
