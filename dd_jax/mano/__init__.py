"""Pure-JAX MANO (`model`) and its chumpy-free file reader (`io`): `load_mano(path)` or
`load_mano_or_synthetic(path)` then `mano_forward(model, betas, hand_pose)`."""

from dd_jax.mano.io import load_mano, load_mano_or_synthetic
from dd_jax.mano.model import ManoModel, ManoOutput, mano_forward, mano_keypoints

__all__ = ["ManoModel", "ManoOutput", "load_mano", "load_mano_or_synthetic", "mano_forward",
           "mano_keypoints"]
