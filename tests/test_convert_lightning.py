"""DeltaDorsal Lightning .ckpt -> dd_jax, on checkpoints a real `lightning.Trainer` writes: the
original's module names (tests/original_modules.py), fitted one step and saved by the Trainer;
the converted network reproduces the PyTorch one (transformers' DINOv3ViTModel + the heads)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dd_jax import default_config, losses
from dd_jax.convert import lightning
from dd_jax.models import deltadorsal
from dd_jax.synthetic import hand as synthetic

import original_modules as om

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = ("hyper_parameters", "optimizer_states", "lr_schedulers", "loops", "callbacks")


class Exploit:
  """Unpickling this runs a shell command, unless the reader refuses to execute globals."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))

  def __deepcopy__(self, memo):  # Lightning deep-copies its hyper-parameters; pickling is the trap
    return self


@pytest.fixture(scope="module")
def mano_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("mano")
  synthetic.write_synthetic_mano(folder / "MANO_RIGHT.pkl", layout="cleaned")
  return folder


def tiny_config(task, **head):
  c = (default_config.pose_config if task == "pose" else default_config.force_config)("demo")
  c.model.backbone.custom.update(dict(dim=om.DIM, depth=om.DEPTH, num_heads=om.HEADS, ffn="mlp",
                                      ffn_hidden=om.FFN, qkv_bias=True))
  c.model.change.out_dim = om.CHANGE
  c.model.head.hidden = om.HIDDEN
  c.model.head.update(head)
  if task == "force":
    c.loss.class_counts = (30714, 1860, 1860, 1860, 1860, 1860, 1860)  # the original's
  return c


def build_and_load(config, folder):
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(5))
  lightning.apply_deltadorsal_checkpoint(model, folder)
  return model


def nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


# ------------------------------------------------------------------ backbone alone

def test_meta_state_dict_pth_converts_with_the_tool(tmp_path):
  """torch.save(<Meta-named DINOv3>.state_dict()) -> tools/convert_dinov3.py -> parity."""
  from dd_jax.models import dinov3, dinov3_weights  # pylint: disable=import-outside-toplevel
  vit = om.MetaViT(om.make_hf_model(seed=4))
  torch.save(vit.state_dict(), tmp_path / "meta.pth")
  tool = [sys.executable, os.path.join(ROOT, "tools", "convert_dinov3.py"),
          str(tmp_path / "meta.pth"), str(tmp_path / "out"), "--num-heads", str(om.HEADS)]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(tool, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 0 and "meta layout" in result.stdout, result.stderr[-2000:]
  config, _ = dinov3_weights.load_converted(tmp_path / "out")
  model = dinov3.DinoV3(config, rngs=nnx.Rngs(0))
  dinov3_weights.load_weights(model, str(tmp_path / "out"))
  img = om.inputs(2, seed=5)[0]
  with torch.no_grad():
    want = vit(img).numpy()
  out = model(nhwc(img), return_extras=True)
  got = np.concatenate([np.asarray(out["cls"])[:, None],
                        np.asarray(out["patch"]).reshape(2, -1, om.DIM)], 1)
  err = np.abs(got - want[:, [0] + list(range(1 + om.NUM_STORAGE, want.shape[1]))]).max()
  print(f"Meta state_dict .pth via the tool: max abs {err:.1e}")
  assert err <= 5e-5


# ------------------------------------------------------------------ pose

@pytest.mark.parametrize("head", [
    dict(use_prior=True, use_film=True, gated=True),
    dict(use_prior=False, use_film=False, gated=False),  # the paper's setting
    dict(use_prior=False, use_film=True, gated=True),  # FiLM saved but inactive (no prior)
])
def test_pose_checkpoint_reproduces_torch(tmp_path, mano_dir, head):
  marker = tmp_path / "executed"
  ckpt = tmp_path / "pose.ckpt"
  module = om.pose_checkpoint(ckpt, mano_dir, note=Exploit(marker), **head)
  assert not marker.exists()

  config = tiny_config("pose", **head)
  params, notes = lightning.convert_lightning(ckpt, config)
  assert not marker.exists(), "unpickling ran code from the checkpoint"
  text = "\n".join(notes)
  for key in SKIPPED:
    assert key in text, (key, text)
  for stub in ("functools.partial", "omegaconf.dictconfig.DictConfig",
               "omegaconf.listconfig.ListConfig", "DeltaDorsalNet", "torch.optim.adamw.AdamW",
               "posix.system"):
    assert stub in text, (stub, text)
  assert "mano_fit" in text
  lightning.save_deltadorsal_checkpoint(tmp_path / "out", params, config, source=str(ckpt),
                                        notes=notes)
  model = build_and_load(config, tmp_path / "out")

  img, base, prior = om.inputs(2, seed=7)
  with torch.no_grad():
    want = module(img, base, prior).numpy()
  got = np.asarray(model(nhwc(img), nhwc(base), jnp.asarray(prior.numpy()))["theta"])
  err = np.max(np.abs(got - want))
  print(f"pose theta max abs err {err:.2e} ({head})")
  assert err <= 1e-4 and np.abs(want).max() > 0.1


# ------------------------------------------------------------------ force

@pytest.fixture(scope="module")
def force_ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("force") / "force.ckpt"
  return path, om.force_checkpoint(path)


def test_force_checkpoint_reproduces_torch(tmp_path, force_ckpt):
  ckpt, module = force_ckpt
  config = tiny_config("force")
  params, notes = lightning.convert_lightning(ckpt, config)
  assert any("force_loss.weight" in n and "matches" in n for n in notes), notes
  lightning.save_deltadorsal_checkpoint(tmp_path / "out", params, config, notes=notes)
  model = build_and_load(config, tmp_path / "out")
  img, base, _ = om.inputs(3, seed=1)
  with torch.no_grad():
    want = module(img, base).numpy()
  got = np.asarray(model(nhwc(img), nhwc(base)))
  err = np.max(np.abs(got - want))
  print(f"force logits max abs err {err:.2e}")
  assert got.shape == (3, 1, 7) and err <= 1e-4


def test_force_class_weights_are_checked_against_the_config(force_ckpt):
  ckpt, module = force_ckpt
  config = tiny_config("force")
  config.loss.class_counts = (1,) * 7
  with pytest.raises(lightning.LightningConversionError,
                     match=r"force_loss\.weight .* config\.loss\.class_counts") as error:
    lightning.convert_lightning(ckpt, config)
  # The message suggests counts that reproduce the file's weights.
  suggested = str(error.value).split("--config.loss.class_counts=")[1].split()[0]
  weights = losses.class_weights([float(x) for x in suggested.strip("'\"()").split(",") if x])
  np.testing.assert_allclose(weights, module.force_loss.weight.numpy(), rtol=1e-5)
  config.loss.class_counts = ()  # counted from the train split: nothing to check against
  _, notes = lightning.convert_lightning(ckpt, config)
  assert any("force_loss.weight" in n and "not checked" in n for n in notes), notes


# ------------------------------------------------------------------ mismatches and the tool

@pytest.fixture(scope="module")
def prior_film_gated_ckpt(tmp_path_factory, mano_dir):
  path = tmp_path_factory.mktemp("ckpt") / "pose.ckpt"
  om.pose_checkpoint(path, mano_dir, seed=3, use_prior=True, use_film=True, gated=True)
  return path


@pytest.mark.parametrize("overrides,message", [
    (dict(use_prior=False, use_film=False), "use_prior=False but the file was trained with True"),
    (dict(gated=False), "gated=False but the file was trained with True"),
    (dict(use_film=False), "FiLM weights"),
    (dict(hidden=om.HIDDEN + 8), "head.hidden"),
])
def test_head_setting_mismatch_is_a_clear_error(prior_film_gated_ckpt, overrides, message):
  head = dict(use_prior=True, use_film=True, gated=True)
  head.update(overrides)
  with pytest.raises(lightning.LightningConversionError, match=message):
    lightning.convert_lightning(prior_film_gated_ckpt, tiny_config("pose", **head))


def test_other_mismatches_are_clear_errors(prior_film_gated_ckpt):
  head = dict(use_prior=True, use_film=True, gated=True)
  config = tiny_config("pose", **head)
  config.model.change.use_orig_feat = False
  with pytest.raises(lightning.LightningConversionError, match="use_orig_feat=False"):
    lightning.convert_lightning(prior_film_gated_ckpt, config)
  config = tiny_config("pose", **head)
  config.model.backbone.custom.update(dict(depth=3))
  with pytest.raises(lightning.LightningConversionError, match="depth: file 2, config 3"):
    lightning.convert_lightning(prior_film_gated_ckpt, config)
  with pytest.raises(lightning.LightningConversionError, match="pose checkpoint"):
    lightning.convert_lightning(prior_film_gated_ckpt, tiny_config("force"))


def test_attention_pool_converts_with_a_note(prior_film_gated_ckpt, tmp_path):
  config = tiny_config("pose", use_prior=True, use_film=True, gated=True, pool="attn")
  params, notes = lightning.convert_lightning(prior_film_gated_ckpt, config)
  assert any("attn" in n for n in notes)
  lightning.save_deltadorsal_checkpoint(tmp_path / "out", params, config, notes=notes)
  model = build_and_load(config, tmp_path / "out")
  assert model.head.attn_pool is not None


def test_command_line_tool(prior_film_gated_ckpt, tmp_path):
  out = tmp_path / "converted"
  args = [sys.executable, os.path.join(ROOT, "tools", "convert_deltadorsal.py"),
          str(prior_film_gated_ckpt), str(out),
          "--config", os.path.join(ROOT, "configs", "pose.py:demo"),
          "--config.model.head.use_prior=True", "--config.model.head.use_film=True",
          "--config.model.head.gated=True", f"--config.model.head.hidden={om.HIDDEN}",
          f"--config.model.change.out_dim={om.CHANGE}",
          f"--config.model.backbone.custom.dim={om.DIM}",
          f"--config.model.backbone.custom.depth={om.DEPTH}",
          f"--config.model.backbone.custom.num_heads={om.HEADS}",
          f"--config.model.backbone.custom.ffn_hidden={om.FFN}"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "skipped (not executed)" in result.stdout
  meta = lightning.read_checkpoint_meta(out)
  assert meta["task"] == "pose" and meta["model"]["head"]["gated"] is True
  params = lightning.load_deltadorsal_checkpoint(out)
  assert params["head"]["mlp3"]["kernel"].shape == (om.HIDDEN, 90)
  assert 0 in params["backbone"]["blocks"]
  # A wrong setting fails with the reason and exit status 1.
  args = [a.replace("gated=True", "gated=False") for a in args]
  result = subprocess.run(args,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 1 and "gated=False" in result.stderr
