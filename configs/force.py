r"""DeltaDorsal force model: frozen ViT-L/16 backbone, 7 press classes, 30 epochs.

  python -m dd_jax.train --config configs/force.py --workdir runs/force \
      --config.data.data_dir=/data/egodorsal --config.model.backbone.weights=/ckpt/vitl16

`configs/force.py:demo` trains on the synthetic set on CPU in minutes and should beat the
majority-class weighted F1.
"""

from dd_jax.default_config import force_config


def get_config(arg=None):
  return force_config(arg)
