"""Tiny end-to-end settings shared by the trainer, evaluation and multi-process tests."""

import os

from dd_jax import default_config
from dd_jax.data import synthetic

# 3 participants x 2 trials x 4 frames: train = participant 1 (8 frames), val = 2, test = 3.
DATASET = dict(participants=3, trials=2, frames=4, image_size=256, seed=0)


def dataset(root: str) -> str:
  path = os.path.join(str(root), "egodorsal_tiny")
  synthetic.ensure_synthetic_dataset(path, **DATASET)
  return path


def config(task: str, data_dir: str, **overrides):
  """A seconds-long run: ViT with 2 blocks of width 32 at 32x32 pixels."""
  c = default_config.pose_config("demo") if task == "pose" else default_config.force_config("demo")
  c.data.data_dir = data_dir
  c.data.synthetic.enabled = False
  c.data.out_img_size = 32
  c.data.batch_size = 4
  c.data.eval_batch_size = 8
  c.model.backbone.custom.update(dict(dim=32, depth=2, num_heads=2, ffn_hidden=64))
  c.model.backbone.n_unfrozen_blocks = 1
  c.model.change.out_dim = 16
  c.model.head.hidden = 32
  c.max_epochs = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.num_val_pictures = 1
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c

