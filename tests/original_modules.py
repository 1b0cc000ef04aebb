"""The original DeltaDorsal's PyTorch modules, rebuilt for tests with its module and attribute
names, so a real `lightning.Trainer` writes checkpoints shaped like the authors' (SPEC.md §6).

What the original's `state_dict()` holds and where it comes from:
  backbone.backbone.model.<Meta keys>  DeltaDorsalNet.backbone (DINOFeaturizer).model: Meta's
                                       DinoVisionTransformer from torch.hub. Here `MetaViT`
                                       registers the same names and shapes and runs transformers'
                                       DINOv3ViTModel on them (the independent reference).
  backbone.change.conv.{0,2}.*         ChangeEncoder.conv
  head.{film.0,neck.0,mlp.0,2,4}.*     ResidualPoseHead; head.{neck.0,trunk.0,2,head}.* ForceHead
  mano_fit.*                           the pose module's smplx MANO layer (buffers and params)
  force_loss.weight                    the force module's CrossEntropyLoss(weight=class weights)
and its `save_hyperparameters(logger=False)` pickles every __init__ argument: the backbone and head
modules, `functools.partial` optimizer / scheduler factories (hydra `_partial_`) and omegaconf
containers.
"""

from __future__ import annotations

import functools

import lightning
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

DIM, DEPTH, HEADS, FFN, CHANGE, HIDDEN = 32, 2, 2, 64, 16, 24
IMAGE = (32, 48)  # a 2 x 3 patch grid
NUM_STORAGE = 4


# ------------------------------------------------------------------ backbone with Meta's names

class _Scale(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.empty(dim))


class _Attention(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.qkv = nn.Linear(dim, 3 * dim)
    self.qkv.register_buffer("bias_mask", torch.cat([torch.ones(dim), torch.zeros(dim),
                                                     torch.ones(dim)]))
    self.proj = nn.Linear(dim, dim)


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)


class _Block(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-5), _Attention(dim), _Scale(dim)
    self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-5), _Mlp(dim, hidden), _Scale(dim)


class _Holder(nn.Module):
  pass


def make_hf_model(seed=0) -> DINOv3ViTModel:
  torch.manual_seed(seed)
  config = DINOv3ViTConfig(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                           intermediate_size=FFN, num_register_tokens=NUM_STORAGE,
                           hidden_act="gelu", pos_embed_rescale=None,
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
  return model


class MetaViT(nn.Module):
  """Meta's DINOv3 parameter names (cls_token, storage_tokens, blocks.i.attn.qkv, ...) computed by
  transformers' DINOv3ViTModel through torch.func.functional_call (q/k/v split from the fused
  qkv, k bias masked as Meta's bias_mask does, inv_freq = 1 / rope_embed.periods)."""

  def __init__(self, hf: DINOv3ViTModel):
    super().__init__()
    self.hf = [hf]  # a list: the HF model computes, its parameters are not this module's
    self.cls_token = nn.Parameter(torch.empty(1, 1, DIM))
    self.storage_tokens = nn.Parameter(torch.empty(1, NUM_STORAGE, DIM))
    self.mask_token = nn.Parameter(torch.empty(1, DIM))
    self.patch_embed = _Holder()
    self.patch_embed.proj = nn.Conv2d(3, DIM, 16, 16)
    self.rope_embed = _Holder()
    hd = DIM // HEADS  # released files hold bf16-rounded periods
    periods = (100.0 ** (4 * torch.arange(hd // 4, dtype=torch.float64) / hd)).to(torch.bfloat16)
    self.rope_embed.register_buffer("periods", periods)
    self.blocks = nn.ModuleList(_Block(DIM, FFN) for _ in range(DEPTH))
    self.norm = nn.LayerNorm(DIM, eps=1e-5)
    sd = hf.state_dict()
    with torch.no_grad():
      self.cls_token.copy_(sd["embeddings.cls_token"])
      self.storage_tokens.copy_(sd["embeddings.register_tokens"])
      self.mask_token.normal_()
      self.patch_embed.proj.weight.copy_(sd["embeddings.patch_embeddings.weight"])
      self.patch_embed.proj.bias.copy_(sd["embeddings.patch_embeddings.bias"])
      self.norm.weight.copy_(sd["norm.weight"])
      self.norm.bias.copy_(sd["norm.bias"])
      for i, block in enumerate(self.blocks):
        h = f"model.layer.{i}."
        for n in ("norm1", "norm2"):
          getattr(block, n).weight.copy_(sd[h + n + ".weight"])
          getattr(block, n).bias.copy_(sd[h + n + ".bias"])
        block.attn.qkv.weight.copy_(torch.cat([sd[h + f"attention.{x}_proj.weight"]
                                               for x in "qkv"]))
        block.attn.qkv.bias.copy_(torch.cat([sd[h + "attention.q_proj.bias"], torch.randn(DIM),
                                             sd[h + "attention.v_proj.bias"]]))
        block.attn.proj.weight.copy_(sd[h + "attention.o_proj.weight"])
        block.attn.proj.bias.copy_(sd[h + "attention.o_proj.bias"])
        block.ls1.gamma.copy_(sd[h + "layer_scale1.lambda1"])
        block.ls2.gamma.copy_(sd[h + "layer_scale2.lambda1"])
        for meta, hf_name in (("fc1", "up_proj"), ("fc2", "down_proj")):
          getattr(block.mlp, meta).weight.copy_(sd[h + f"mlp.{hf_name}.weight"])
          getattr(block.mlp, meta).bias.copy_(sd[h + f"mlp.{hf_name}.bias"])

  def hf_tensors(self) -> dict[str, torch.Tensor]:
    """This module's tensors under DINOv3ViTModel's names."""
    t = {"embeddings.cls_token": self.cls_token,
         "embeddings.register_tokens": self.storage_tokens,
         "embeddings.mask_token": self.mask_token.view(1, 1, DIM),
         "embeddings.patch_embeddings.weight": self.patch_embed.proj.weight,
         "embeddings.patch_embeddings.bias": self.patch_embed.proj.bias,
         "norm.weight": self.norm.weight, "norm.bias": self.norm.bias,
         "rope_embeddings.inv_freq": 1.0 / self.rope_embed.periods.float()}
    for i, block in enumerate(self.blocks):
      h = f"model.layer.{i}."
      for n in ("norm1", "norm2"):
        t[h + n + ".weight"], t[h + n + ".bias"] = getattr(block, n).weight, getattr(block, n).bias
      w = block.attn.qkv.weight
      b = block.attn.qkv.bias * block.attn.qkv.bias_mask
      for j, x in enumerate("qkv"):
        t[h + f"attention.{x}_proj.weight"] = w[j * DIM:(j + 1) * DIM]
      t[h + "attention.q_proj.bias"], t[h + "attention.v_proj.bias"] = b[:DIM], b[2 * DIM:]
      t[h + "attention.o_proj.weight"] = block.attn.proj.weight
      t[h + "attention.o_proj.bias"] = block.attn.proj.bias
      t[h + "layer_scale1.lambda1"], t[h + "layer_scale2.lambda1"] = block.ls1.gamma, block.ls2.gamma
      for meta, hf_name in (("fc1", "up_proj"), ("fc2", "down_proj")):
        t[h + f"mlp.{hf_name}.weight"] = getattr(block.mlp, meta).weight
        t[h + f"mlp.{hf_name}.bias"] = getattr(block.mlp, meta).bias
    return t

  def forward(self, images):
    return torch.func.functional_call(self.hf[0], self.hf_tensors(), (),
                                      {"pixel_values": images}).last_hidden_state


class DINOFeaturizer(nn.Module):
  """The original's featurizer: final-normed patch tokens as (B, D, h, w); the last
  `n_unfrozen_blocks` blocks and the final norm train."""

  def __init__(self, hf, n_unfrozen_blocks=1):
    super().__init__()
    self.model = MetaViT(hf)
    for p in self.model.parameters():
      p.requires_grad = False
    for block in self.model.blocks[-n_unfrozen_blocks:]:
      for p in block.parameters():
        p.requires_grad = True
    for p in self.model.norm.parameters():
      p.requires_grad = True

  def forward(self, img):
    tokens = self.model(img)[:, 1 + NUM_STORAGE:]
    h, w = img.shape[2] // 16, img.shape[3] // 16
    return tokens.reshape(img.shape[0], h, w, DIM).permute(0, 3, 1, 2)


class ChangeEncoder(nn.Module):

  def __init__(self, dim, out, use_delta=True, use_ft_f0=False):
    super().__init__()
    self.use_delta, self.use_ft_f0 = use_delta, use_ft_f0 and use_delta
    c = dim + (1 if use_delta else 0) + (2 * dim if self.use_ft_f0 else 0)
    self.conv = nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.GELU(),
                              nn.Conv2d(out, out, 3, padding=1), nn.GELU())

  def forward(self, ft, f0):
    x = [ft]
    if self.use_delta:
      x = [ft - f0, F.cosine_similarity(ft, f0, dim=1, eps=1e-6).unsqueeze(1)]
      x += [ft, f0] if self.use_ft_f0 else []
    return self.conv(torch.cat(x, 1))


class DeltaDorsalNet(nn.Module):

  def __init__(self, hf, use_delta=True, use_orig_feat=False):
    super().__init__()
    self.backbone = DINOFeaturizer(hf)
    self.change = ChangeEncoder(DIM, CHANGE, use_delta, use_orig_feat)

  def forward(self, img, base):
    return self.change(self.backbone(img), self.backbone(base))


class ResidualPoseHead(nn.Module):

  def __init__(self, z=CHANGE, hidden=HIDDEN, use_prior=False, use_film=False, gated=False):
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

  def __init__(self, z=CHANGE, out_dim=1, n_classes=7, hidden=HIDDEN):
    super().__init__()
    self.out_dim, self.n_classes = out_dim, n_classes
    self.neck = nn.Sequential(nn.Conv2d(z, z, 3, padding=1), nn.GELU())
    self.trunk = nn.Sequential(nn.Linear(z, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                               nn.GELU())
    self.head = nn.Linear(hidden, n_classes * out_dim)

  def forward(self, x):
    return self.head(self.trunk(self.neck(x).mean(dim=(2, 3)))).view(
        x.shape[0], self.out_dim, self.n_classes)


# ------------------------------------------------------------------ the Lightning modules

class _Module(lightning.LightningModule):

  def configure_optimizers(self):
    optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
    scheduler = self.hparams.scheduler(optimizer=optimizer)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "train/loss", "interval": "epoch"}}

  def training_step(self, batch, batch_idx):
    loss = self.loss(batch)
    self.log("train/loss", loss, on_step=False, on_epoch=True)
    return loss


class DeltaDorsalPoseModule(_Module):

  def __init__(self, backbone, head, mano_path, loss_weights, optimizer, scheduler, compile,
               unfreeze=(), lambda_p=0.0, note=None):
    super().__init__()
    self.save_hyperparameters(logger=False)
    self.backbone, self.head = backbone, head
    import smplx  # pylint: disable=import-outside-toplevel
    self.mano_fit = smplx.MANO(model_path=mano_path, is_rhand=True, use_pca=False,
                               flat_hand_mean=True)
    self.keypoint_3d_loss = nn.L1Loss()

  def forward(self, img, base, prior):
    return self.head(self.backbone(img, base), prior)

  def loss(self, batch):
    img, base, prior, gt = batch
    return self.keypoint_3d_loss(self(img, base, prior), gt)


class DeltaDorsalForceModule(_Module):

  def __init__(self, class_counts, backbone, head, optimizer, scheduler, compile, unfreeze=(),
               lambda_p=0.0):
    super().__init__()
    self.save_hyperparameters(logger=False)
    self.backbone, self.head = backbone, head
    counts = np.array(class_counts, dtype=float)
    weights = torch.tensor(1.0 / (counts / counts.sum() + 1e-12), dtype=torch.float)
    self.force_loss = nn.CrossEntropyLoss(weight=weights)

  def forward(self, img, base):
    return self.head(self.backbone(img, base))

  def loss(self, batch):
    img, base, labels = batch
    logits = self(img, base)
    return self.force_loss(logits.reshape(-1, self.head.n_classes), labels.reshape(-1))


# ------------------------------------------------------------------ writing a checkpoint

def _hydra_like_config(**values):
  """What hydra passes the module: omegaconf containers (DictConfig / ListConfig)."""
  return OmegaConf.create(values)


def factories():
  optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2)
  scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min",
                                factor=0.1, patience=10)
  return optimizer, scheduler


def inputs(b=2, seed=0):
  g = torch.Generator().manual_seed(seed)
  return (torch.randn(b, 3, *IMAGE, generator=g), torch.randn(b, 3, *IMAGE, generator=g),
          0.5 * torch.randn(b, 45, generator=g))


def fit_one_step_and_save(module, batch, path):
  """One optimisation step by a real Trainer (CPU, no logger), then Trainer.save_checkpoint."""
  data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=2)
  trainer = lightning.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, num_sanity_val_steps=0)
  trainer.fit(module, data)
  trainer.save_checkpoint(path)
  module.eval()
  return module


def pose_checkpoint(path, mano_dir, *, seed=1, use_orig_feat=True, note=None, **head):
  torch.manual_seed(seed)
  net = DeltaDorsalNet(make_hf_model(), use_delta=True, use_orig_feat=use_orig_feat)
  torch_head = ResidualPoseHead(**head)
  with torch.no_grad():  # non-zero last layer (the original zero-inits it): every path exercised
    for p in list(net.change.parameters()) + list(torch_head.parameters()):
      p.uniform_(-0.3, 0.3)
  cfg = _hydra_like_config(loss_weights={"keypoints_3d": 0.05, "pose": 0.001}, unfreeze=["norm"])
  optimizer, scheduler = factories()
  module = DeltaDorsalPoseModule(net, torch_head, str(mano_dir), cfg.loss_weights, optimizer,
                                 scheduler, False, unfreeze=cfg.unfreeze, note=note)
  img, base, prior = inputs(2, seed)
  return fit_one_step_and_save(module, (img, base, prior, prior + 0.1), path)


def force_checkpoint(path, *, seed=2, class_counts=(30714, 1860, 1860, 1860, 1860, 1860, 1860)):
  torch.manual_seed(seed)
  net = DeltaDorsalNet(make_hf_model(), use_delta=True, use_orig_feat=False)
  head = ForceHead()
  with torch.no_grad():
    for p in list(net.change.parameters()) + list(head.parameters()):
      p.uniform_(-0.3, 0.3)
  cfg = _hydra_like_config(class_counts=list(class_counts))
  optimizer, scheduler = factories()
  module = DeltaDorsalForceModule(cfg.class_counts, net, head, optimizer, scheduler, False)
  img, base, _ = inputs(2, seed)
  return fit_one_step_and_save(module, (img, base, torch.tensor([[0], [3]])), path)
