r"""DeltaDorsal pose model: the paper's settings (ViT-L/16, 384x384, 3 unfrozen blocks, batch 96).

  python -m dd_jax.train --config configs/pose.py --workdir runs/pose \
      --config.data.data_dir=/data/egodorsal --config.model.backbone.weights=/ckpt/vitl16

Presets pick a backbone or the CPU demo: `configs/pose.py:demo`, `configs/pose.py:vits16`, ...
(any variant name of dd_jax.models.dinov3.VARIANTS). The demo generates a synthetic hand and a
synthetic EgoDorsal set on first use and should end with val/test MPJPE at least 15% below the
synthetic prior's.
"""

from dd_jax.default_config import pose_config


def get_config(arg=None):
  return pose_config(arg)
