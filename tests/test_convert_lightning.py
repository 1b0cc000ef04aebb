"""DeltaDorsal Lightning .ckpt -> dd_jax: a checkpoint saved by torch in the test converts and
reproduces the PyTorch network (transformers' DINOv3ViTModel + the original's heads)."""

import functools
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dd_jax import default_config
from dd_jax.convert import lightning
from dd_jax.models import deltadorsal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, DEPTH, HEADS, FFN, CHANGE, HIDDEN = 32, 2, 2, 64, 16, 24
IMAGE = (32, 48)  # a 2 x 3 patch grid


# ------------------------------------------------------------------ what a .ckpt also pickles

class HParams:
  """Stands for the hyper-parameter objects Lightning pickles (a class only this module has)."""

  def __init__(self, marker):
    self.lr = 1e-3
    self.optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    self.payload = Exploit(marker)


class Exploit:
  """Unpickling this runs a shell command, unless the reader refuses to execute globals."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ PyTorch network (original keys)

class Change(nn.Module):

  def __init__(self, dim, out, use_delta, use_orig):
    super().__init__()
    self.use_delta, self.use_orig = use_delta, use_orig and use_delta
    c = dim + (1 if use_delta else 0) + (2 * dim if self.use_orig else 0)
    self.conv = nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.GELU(),
                              nn.Conv2d(out, out, 3, padding=1), nn.GELU())

  def forward(self, ft, f0):
    x = [ft]
    if self.use_delta:
      x = [ft - f0, F.cosine_similarity(ft, f0, dim=1, eps=1e-6).unsqueeze(1)]
      x += [ft, f0] if self.use_orig else []
    return self.conv(torch.cat(x, 1))


class PoseHead(nn.Module):

  def __init__(self, z, hidden, use_prior, use_film, gated):
    super().__init__()
    self.use_prior, self.use_film, self.gated = use_prior, use_film and use_prior, gated
    if use_film:  # the original builds it whenever use_film is set
      self.film = nn.Sequential(nn.Linear(45, 2 * z))
    self.neck = nn.Sequential(nn.Conv2d(z, z, 3, padding=1), nn.GELU())
    self.mlp = nn.Sequential(nn.Linear(z + (45 if use_prior else 0), hidden), nn.GELU(),
                             nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, 90 if gated else 45))

  def forward(self, x, prior):
    b, c = x.shape[:2]
    if self.use_film:
      gb = self.film(prior)
      x = gb[:, :c].view(b, c, 1, 1) * x + gb[:, c:].view(b, c, 1, 1)
    g = self.neck(x).mean(dim=(2, 3))
    out = self.mlp(torch.cat([g, prior], 1) if self.use_prior else g)
    theta = torch.sigmoid(out[:, 45:]) * out[:, :45] if self.gated else out
    return prior + theta if self.use_prior else theta


class ForceHead(nn.Module):

  def __init__(self, z, hidden, n_classes, out_dim):
    super().__init__()
    self.shape = (out_dim, n_classes)
    self.neck = nn.Sequential(nn.Conv2d(z, z, 3, padding=1), nn.GELU())
    self.trunk = nn.Sequential(nn.Linear(z, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                               nn.GELU())
    self.head = nn.Linear(hidden, n_classes * out_dim)

  def forward(self, x):
    return self.head(self.trunk(self.neck(x).mean(dim=(2, 3)))).view(x.shape[0], *self.shape)


def make_backbone():
  torch.manual_seed(0)
  config = DINOv3ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                           intermediate_size=FFN, num_register_tokens=4, hidden_act="gelu",
                           attn_implementation="eager")
  model = DINOv3ViTModel(config).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("lambda1"):
        p.uniform_(0.2, 1.0)
      elif "norm" in key and key.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim >= 2 and "token" not in key:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.3 * torch.randn_like(p))
  # Released files hold bf16-rounded periods; make the torch model use exactly those.
  hd = DIM // HEADS
  periods = (100.0 ** (4 * torch.arange(hd // 4, dtype=torch.float64) / hd)).to(torch.bfloat16)
  model.rope_embeddings.inv_freq.copy_(1.0 / periods.float())
  return model, periods


def meta_keys(model, periods):
  """The HF model's weights under Meta's key names (SPEC §6), as DeltaDorsal's backbone has them."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {"cls_token": sd["embeddings.cls_token"],
         "storage_tokens": sd["embeddings.register_tokens"],
         "mask_token": torch.randn(1, DIM), "rope_embed.periods": periods,
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
         "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
  for i in range(DEPTH):
    h, b = f"model.layer.{i}.", f"blocks.{i}."
    for n in ("norm1", "norm2"):
      out[b + n + ".weight"], out[b + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
    out[b + "attn.qkv.weight"] = torch.cat([sd[h + f"attention.{x}_proj.weight"] for x in "qkv"])
    out[b + "attn.qkv.bias"] = torch.cat([sd[h + "attention.q_proj.bias"], torch.randn(DIM),
                                          sd[h + "attention.v_proj.bias"]])  # k part masked
    out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(DIM), torch.zeros(DIM), torch.ones(DIM)])
    out[b + "attn.proj.weight"] = sd[h + "attention.o_proj.weight"]
    out[b + "attn.proj.bias"] = sd[h + "attention.o_proj.bias"]
    out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
    out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    for meta, hf in (("fc1", "up_proj"), ("fc2", "down_proj")):
      out[b + f"mlp.{meta}.weight"] = sd[h + f"mlp.{hf}.weight"]
      out[b + f"mlp.{meta}.bias"] = sd[h + f"mlp.{hf}.bias"]
  return out


def torch_features(backbone, change, img, base):
  b = img.shape[0]
  tokens = backbone(pixel_values=torch.cat([img, base])).last_hidden_state[:, 5:]
  h, w = IMAGE[0] // 16, IMAGE[1] // 16
  feats = tokens.reshape(2 * b, h, w, DIM).permute(0, 3, 1, 2)
  return change(feats[:b], feats[b:])


def save_ckpt(path, backbone, periods, change, head, marker):
  with torch.no_grad():
    for p in list(change.parameters()) + list(head.parameters()):
      p.uniform_(-0.3, 0.3)  # non-zero last layer, every path exercised
  sd = {"backbone.backbone.model." + k: v for k, v in meta_keys(backbone, periods).items()}
  sd.update({"backbone.change." + k: v for k, v in change.state_dict().items()})
  sd.update({"head." + k: v for k, v in head.state_dict().items()})
  sd["mano_fit.shapedirs"] = torch.randn(778, 3, 10)
  sd["mano_fit.faces_tensor"] = torch.zeros(1538, 3, dtype=torch.long)
  torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
              "state_dict": sd, "hyper_parameters": HParams(marker), "hparams_name": "kwargs",
              "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0),
                                                  "exp_avg": torch.randn(4)}},
                                    "param_groups": [{"lr": 1e-3, "params": [0]}]}],
              "lr_schedulers": [{"best": 0.5, "num_bad_epochs": 1}]}, path)


def tiny_config(task, **head):
  c = (default_config.pose_config if task == "pose" else default_config.force_config)("demo")
  c.model.backbone.custom.update(dict(dim=DIM, depth=DEPTH, num_heads=HEADS, ffn="mlp",
                                      ffn_hidden=FFN, qkv_bias=True))
  c.model.change.out_dim = CHANGE
  c.model.head.hidden = HIDDEN
  c.model.head.update(head)
  return c


def build_and_load(config, folder):
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(5))
  lightning.apply_deltadorsal_checkpoint(model, folder)
  return model


def nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def backbone():
  return make_backbone()


def inputs(b=2, seed=0):
  g = torch.Generator().manual_seed(seed)
  return (torch.randn(b, 3, *IMAGE, generator=g), torch.randn(b, 3, *IMAGE, generator=g),
          0.5 * torch.randn(b, 45, generator=g))


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("head", [
    dict(use_prior=True, use_film=True, gated=True),
    dict(use_prior=False, use_film=False, gated=False),  # the paper's setting
    dict(use_prior=False, use_film=True, gated=True),  # FiLM saved but inactive (no prior)
])
def test_pose_checkpoint_reproduces_torch(tmp_path, backbone, head):
  hf, periods = backbone
  torch.manual_seed(1)
  change = Change(DIM, CHANGE, True, True)
  torch_head = PoseHead(CHANGE, HIDDEN, head["use_prior"], head["use_film"], head["gated"])
  marker = tmp_path / "executed"
  ckpt = tmp_path / "pose.ckpt"
  save_ckpt(ckpt, hf, periods, change, torch_head, marker)

  config = tiny_config("pose", **head)
  params, notes = lightning.convert_lightning(ckpt, config)
  assert not marker.exists(), "unpickling ran code from the checkpoint"
  text = "\n".join(notes)
  assert "hyper_parameters" in text and "optimizer_states" in text and "HParams" in text
  assert "posix.system" in text or "os.system" in text
  assert "mano_fit" in text
  lightning.save_deltadorsal_checkpoint(tmp_path / "out", params, config, source=str(ckpt),
                                        notes=notes)
  model = build_and_load(config, tmp_path / "out")

  img, base, prior = inputs()
  with torch.no_grad():
    want = torch_head(torch_features(hf, change, img, base), prior).numpy()
  got = np.asarray(model(nhwc(img), nhwc(base), jnp.asarray(prior.numpy()))["theta"])
  err = np.max(np.abs(got - want))
  print(f"pose theta max abs err {err:.2e} ({head})")
  assert err < 1e-4 and np.abs(want).max() > 0.1


def test_force_checkpoint_reproduces_torch(tmp_path, backbone):
  hf, periods = backbone
  torch.manual_seed(2)
  change = Change(DIM, CHANGE, True, False)  # the force setting: no original features
  head = ForceHead(CHANGE, HIDDEN, 7, 1)
  save_ckpt(tmp_path / "force.ckpt", hf, periods, change, head, tmp_path / "executed")
  config = tiny_config("force")
  params, notes = lightning.convert_lightning(tmp_path / "force.ckpt", config)
  lightning.save_deltadorsal_checkpoint(tmp_path / "out", params, config, notes=notes)
  model = build_and_load(config, tmp_path / "out")
  img, base, _ = inputs(3, seed=1)
  with torch.no_grad():
    want = head(torch_features(hf, change, img, base)).numpy()
  got = np.asarray(model(nhwc(img), nhwc(base)))
  err = np.max(np.abs(got - want))
  print(f"force logits max abs err {err:.2e}")
  assert got.shape == (3, 1, 7) and err < 1e-4


@pytest.fixture(scope="module")
def prior_film_gated_ckpt(tmp_path_factory, backbone):
  hf, periods = backbone
  folder = tmp_path_factory.mktemp("ckpt")
  torch.manual_seed(3)
  save_ckpt(folder / "pose.ckpt", hf, periods, Change(DIM, CHANGE, True, True),
            PoseHead(CHANGE, HIDDEN, True, True, True), folder / "executed")
  return folder / "pose.ckpt"


@pytest.mark.parametrize("overrides,message", [
    (dict(use_prior=False, use_film=False), "use_prior=False but the file was trained with True"),
    (dict(gated=False), "gated=False but the file was trained with True"),
    (dict(use_film=False), "FiLM weights"),
    (dict(hidden=HIDDEN + 8), "head.hidden"),
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
          "--config.model.head.gated=True", f"--config.model.head.hidden={HIDDEN}",
          f"--config.model.change.out_dim={CHANGE}", f"--config.model.backbone.custom.dim={DIM}",
          f"--config.model.backbone.custom.depth={DEPTH}",
          f"--config.model.backbone.custom.num_heads={HEADS}",
          f"--config.model.backbone.custom.ffn_hidden={FFN}"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "skipped (not executed)" in result.stdout
  meta = lightning.read_checkpoint_meta(out)
  assert meta["task"] == "pose" and meta["model"]["head"]["gated"] is True
  params = lightning.load_deltadorsal_checkpoint(out)
  assert params["head"]["mlp3"]["kernel"].shape == (HIDDEN, 90)
  assert 0 in params["backbone"]["blocks"]
  # A wrong setting fails with the reason and exit status 1.
  args = [a.replace("gated=True", "gated=False") for a in args]
  result = subprocess.run(args,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert result.returncode == 1 and "gated=False" in result.stderr
