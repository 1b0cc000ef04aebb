"""The documented Python API runs as written: docs/model.md's snippet, with a converted tiny
backbone in place of /ckpt/vitl16 and the synthetic hand in place of MANO_RIGHT.pkl."""

import os
import re

import numpy as np
from flax import nnx

from dd_jax import params as params_lib
from dd_jax.models import dinov3, dinov3_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(doc: str) -> list[str]:
  with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_model_api_snippet_runs(tmp_path):
  (snippet,) = [b for b in python_blocks("model.md") if "load_weights" in b]
  config = dinov3.get_config("custom", dim=32, depth=2, num_heads=2, ffn="mlp", ffn_hidden=64,
                             qkv_bias=True)
  backbone = dinov3.DinoV3(config, rngs=nnx.Rngs(1))
  weights = str(tmp_path / "vit")
  dinov3_weights.save_converted(weights, config, nnx.to_pure_dict(nnx.state(backbone, nnx.Param)))
  assert '"/ckpt/vitl16"' in snippet and '"MANO_RIGHT.pkl"' in snippet
  namespace = {}
  exec(snippet.replace('"/ckpt/vitl16"', repr(weights)).replace('"MANO_RIGHT.pkl"', '""'),
       namespace)
  assert namespace["theta"].shape == (1, 45) and np.all(np.isfinite(namespace["theta"]))
  assert namespace["logits"].shape == (1, 1, 7)
  assert namespace["hand"].vertices.shape == (1, 778, 3)
  assert namespace["hand"].keypoints.shape == (1, 21, 3)
  # The backbone holds the converted weights.
  loaded = nnx.to_pure_dict(nnx.state(namespace["net"].backbone, nnx.Param))
  saved = dict(params_lib.flatten_params(nnx.to_pure_dict(nnx.state(backbone, nnx.Param))))
  for path, value in params_lib.flatten_params(loaded):
    np.testing.assert_array_equal(value, saved[path], err_msg=str(path))
