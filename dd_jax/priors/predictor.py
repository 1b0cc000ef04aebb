"""HaMeR + MANO as one compiled function over a device mesh: crops in, per-hand outputs out.

The network is created directly in its shardings (parameters replicated, or with FSDP split over
the data axis, as dd_jax.train_state builds DeltaDorsal's) and filled from a converted folder or
straight from HaMeR's `.ckpt` (converted in memory through the allowlisted reader). Batches are
split over the mesh's data axis; the function is compiled once for its fixed global batch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dd_jax import parallel
from dd_jax import params as params_lib
from dd_jax.convert import hamer as convert_hamer
from dd_jax.mano import model as mano_model
from dd_jax.models import hamer as hamer_model
from dd_jax.models import hamer_weights

OUTPUT_KEYS = ("global_orient", "hand_pose", "betas", "pred_cam", "keypoints_3d",
               "keypoints_2d_crop")


def read_weights(path: str, variant: str = "hamer_vith", custom: dict | None = None
                 ) -> tuple[hamer_model.HamerConfig, dict, list[str]]:
  """(config, params, notes) from a converted folder, or from a HaMeR .ckpt (converted here;
  `variant` / `custom` give its sizes, which a .ckpt does not store)."""
  if os.path.isdir(path):
    config, params = hamer_weights.load_converted(path)
    return config, params, [f"converted HaMeR {hamer_model.variant_name(config)} from {path}"]
  config = hamer_model.get_config(variant, **(custom or {}))
  config, params, notes = convert_hamer.convert(path, config)
  return config, params, notes


def build_model(config: hamer_model.HamerConfig, params: dict, mesh: jax.sharding.Mesh, *,
                dtype: Any = jnp.float32, fsdp: bool = False,
                attention_implementation: str | None = None, source: str = "params"
                ) -> hamer_model.Hamer:
  """Hamer(config) holding `params`, each array placed in its sharding on `mesh`. Built from
  the abstract model: no random initialisation is drawn only to be overwritten, and no
  full-size array exists besides `params` and the placed copy."""
  build = lambda: hamer_model.Hamer(config, dtype=dtype,
                                    attention_implementation=attention_implementation,
                                    rngs=nnx.Rngs(0))
  model = nnx.eval_shape(build)
  params_lib.assign_params(model, params, source=source)  # checks names and shapes, all at once
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, parallel.tree_shardings(mesh, state, fsdp)))
  return model


class HamerPredictor:
  """Compiled crops (B, S, S, 3) -> {global_orient (B,1,3,3), hand_pose (B,15,3,3), betas (B,10),
  pred_cam (B,3), keypoints_3d (B,21,3) model frame, keypoints_2d_crop (B,21,2) in HaMeR's crop
  units}, B a multiple of the mesh size, inputs and outputs split over its data axis."""

  def __init__(self, model: hamer_model.Hamer, mano: mano_model.ManoModel,
               mesh: jax.sharding.Mesh):
    self.config = model.config
    self.mesh = mesh
    graphdef, state = nnx.split(model)
    self._state = state
    mano = mano.with_tip_ids(mano_model.SMPLX_TIP_IDS)
    mano = jax.device_put(mano, parallel.replicated(mesh))
    config = self.config

    def forward(state, mano, crops):
      net = nnx.merge(graphdef, state)
      out = net(crops)
      keypoints = hamer_model.keypoints_3d(mano, out)
      _, keypoints_2d = hamer_model.crop_camera(out, keypoints, config)
      out = {k: v.astype(jnp.float32) for k, v in out.items()}
      return dict(out, keypoints_3d=keypoints, keypoints_2d_crop=keypoints_2d)

    batch = parallel.batch_sharding(mesh)
    self._mano = mano
    self._jitted = jax.jit(forward, out_shardings=batch)
    self._forward = self._jitted

  @classmethod
  def from_weights(cls, path: str, mano: mano_model.ManoModel, mesh: jax.sharding.Mesh, *,
                   variant: str = "hamer_vith", custom: dict | None = None, dtype: Any = "float32",
                   fsdp: bool = False, attention_implementation: str | None = None
                   ) -> tuple["HamerPredictor", list[str]]:
    config, params, notes = read_weights(path, variant, custom)
    model = build_model(config, params, mesh, dtype=jnp.dtype(dtype), fsdp=fsdp,
                        attention_implementation=attention_implementation, source=path)
    return cls(model, mano, mesh), notes

  def compile(self, global_batch: int) -> None:
    """Compiles for crops of `global_batch` hands (the only shape it will see)."""
    s = self.config.image_size
    crops = jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32,
                                 sharding=parallel.batch_sharding(self.mesh))
    self._forward = self._jitted.lower(self._state, self._mano, crops).compile()

  def __call__(self, crops: jax.Array) -> dict[str, jax.Array]:
    return self._forward(self._state, self._mano, crops)

  def predict(self, crops: np.ndarray) -> dict[str, np.ndarray]:
    """Single-process convenience: numpy crops -> numpy outputs."""
    out = self(parallel.global_batch(self.mesh, {"crops": crops})["crops"])
    return {k: np.asarray(v) for k, v in out.items()}
