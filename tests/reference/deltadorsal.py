"""The DeltaDorsal pose network in PyTorch, built as the original builds it (SPEC.md §2).

transformers' DINOv3ViTModel backbone + change encoder + residual pose head, smplx MANO and the
original's losses, AdamW with clipping, and the torchvision-style input transforms written with
torch ops (torchvision cannot be installed beside this torch). The benchmark times it against
dd_jax; `jax_params` copies its weights into a dd_jax PoseNet so the two can be checked equal.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# OpenPose slots of smplx MANO's 16 joints and of the 5 tip vertices (SPEC.md §3).
JOINT_SOURCE = [0, 13, 14, 15, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9]
JOINT_SLOTS = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]
TIP_SLOTS = [4, 8, 12, 16, 20]
DELTADORSAL_TIP_IDS = [743, 333, 443, 554, 671]


# ------------------------------------------------------------------ backbone


def hf_config(config, *, attn_implementation: str = "sdpa", rope_rescale: float | None = None):
  """A dd_jax DinoV3Config -> transformers DINOv3ViTConfig of the same network.

  rope_rescale: transformers' pos_embed_rescale, the train-mode RoPE coordinate rescale (Meta's
  rescale_coords; 2 in the released models); None: off, so train and eval compute the same.
  """
  from transformers import DINOv3ViTConfig  # pylint: disable=import-outside-toplevel
  ffn = (dict(use_gated_mlp=False, hidden_act="gelu") if config.ffn == "mlp"
         else dict(use_gated_mlp=True, hidden_act="silu"))
  return DINOv3ViTConfig(
      hidden_size=config.dim, num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads, intermediate_size=config.ffn_hidden,
      patch_size=config.patch_size, num_register_tokens=config.num_storage_tokens,
      layer_norm_eps=config.ln_eps, rope_theta=config.rope_base, query_bias=config.qkv_bias,
      value_bias=config.qkv_bias, pos_embed_rescale=rope_rescale,
      attn_implementation=attn_implementation, **ffn)


@contextlib.contextmanager
def forced_rope_draws(factors):
  """transformers' train-mode RoPE draws (`torch.empty(1).uniform_(-ln r, ln r).exp()` in
  augment_patches_center_coordinates) return `factors` in turn instead of random ones."""
  logs = [float(np.log(f)) for f in np.asarray(factors, np.float64).reshape(-1)]
  uniform = torch.Tensor.uniform_

  def forced(tensor, low=0.0, high=1.0, **kwargs):
    del kwargs
    value = logs.pop(0)
    assert low <= value <= high, (value, low, high)
    return tensor.fill_(value)

  torch.Tensor.uniform_ = forced
  try:
    yield
  finally:
    torch.Tensor.uniform_ = uniform
  assert not logs, f"{len(logs)} forced RoPE factors were not drawn"


def per_block_rope_forward(model, images: torch.Tensor, streams: int = 1) -> torch.Tensor:
  """DINOv3ViTModel's last_hidden_state with the RoPE tables drawn anew for every block, as
  Meta's get_intermediate_layers does (transformers draws once per forward): in train mode each
  block rescales its coordinates by its own factor. The batch holds `streams` equal parts (the
  original's separate forwards, e.g. [images; bases]), each with its own draw, stream order."""
  hidden = model.embeddings(images)
  rows = images.shape[0] // streams
  for layer in model.model.layer:
    tables = [model.rope_embeddings(images) for _ in range(streams)]
    cos, sin = (torch.stack([t[k] for t in tables]).repeat_interleave(rows, 0)[:, None]
                for k in (0, 1))  # (B, 1, patches, head_dim)
    hidden = layer(hidden, position_embeddings=(cos, sin))
  return model.norm(hidden)


class Backbone(nn.Module):
  """DINOv3ViTModel -> final-normed patch features (B, D, H/16, W/16), prefix tokens dropped.
  In train mode with a rope_rescale, the RoPE factors are drawn per block (Meta's behaviour)."""

  def __init__(self, config, *, attn_implementation: str = "sdpa",
               rope_rescale: float | None = None):
    super().__init__()
    from transformers import DINOv3ViTModel  # pylint: disable=import-outside-toplevel
    self.model = DINOv3ViTModel(hf_config(config, attn_implementation=attn_implementation,
                                          rope_rescale=rope_rescale))
    self.num_prefix = 1 + config.num_storage_tokens
    self.patch_size = config.patch_size

  def forward(self, images: torch.Tensor, streams: int = 1) -> torch.Tensor:
    b, _, height, width = images.shape
    if self.training and self.model.config.pos_embed_rescale:
      tokens = per_block_rope_forward(self.model, images, streams)
    else:
      tokens = self.model(pixel_values=images).last_hidden_state
    tokens = tokens[:, self.num_prefix:]
    h, w = height // self.patch_size, width // self.patch_size
    return tokens.transpose(1, 2).reshape(b, -1, h, w)


# ------------------------------------------------------------------ heads (SPEC.md §2.2-2.4)


class ChangeEncoder(nn.Module):

  def __init__(self, in_dim: int, out_dim: int, use_delta: bool = True, use_orig_feat: bool = True):
    super().__init__()
    self.use_delta, self.use_orig = use_delta, use_orig_feat and use_delta
    c = in_dim + (1 if use_delta else 0) + (2 * in_dim if self.use_orig else 0)
    self.conv = nn.Sequential(nn.Conv2d(c, out_dim, 3, padding=1), nn.GELU(),
                              nn.Conv2d(out_dim, out_dim, 3, padding=1), nn.GELU())

  def forward(self, ft: torch.Tensor, f0: torch.Tensor | None) -> torch.Tensor:
    if self.use_delta:
      x = [ft - f0, F.cosine_similarity(ft, f0, dim=1, eps=1e-6).unsqueeze(1)]
      x += [ft, f0] if self.use_orig else []
    else:
      x = [ft]
    return self.conv(torch.cat(x, 1))


def pool(x: torch.Tensor, kind: str, conv: nn.Module) -> torch.Tensor:
  if kind == "avg":
    return x.mean(dim=(2, 3))
  w = torch.softmax(torch.tanh(conv(x)).flatten(1), -1).view(x.shape[0], 1, *x.shape[2:])
  return (x * w).sum(dim=(2, 3))


class PoseHead(nn.Module):
  """Residual pose head; the attention-pool conv is a learned layer (the original's defect fixed)."""

  def __init__(self, z: int = 256, out: int = 45, hidden: int = 512, use_prior: bool = False,
               use_film: bool = False, gated: bool = False, pool_kind: str = "avg"):
    super().__init__()
    self.use_prior, self.use_film, self.gated, self.pool, self.out = (
        use_prior, use_film and use_prior, gated, pool_kind, out)
    if self.use_film:
      self.film = nn.Sequential(nn.Linear(45, 2 * z))
    self.neck = nn.Sequential(nn.Conv2d(z, z, 3, padding=1), nn.GELU())
    self.attn = nn.Conv2d(z, 1, 1)
    self.mlp = nn.Sequential(nn.Linear(z + (45 if use_prior else 0), hidden), nn.GELU(),
                             nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, out * 2 if gated else out))
    with torch.no_grad():  # zero last layer; gate bias -2 with prior, +2 without
      self.mlp[4].weight.zero_()
      self.mlp[4].bias.zero_()
      if gated:
        self.mlp[4].bias[out:] = -2.0 if use_prior else 2.0

  def forward(self, x, prior=None):
    b, c = x.shape[:2]
    if self.use_film:
      gb = self.film(prior)
      x = gb[:, :c].view(b, c, 1, 1) * x + gb[:, c:].view(b, c, 1, 1)
    g = pool(self.neck(x), self.pool, self.attn)
    if self.use_prior:
      g = torch.cat([g, prior], 1)
    o = self.mlp(g)
    if self.gated:
      d, gate = o[:, :self.out], torch.sigmoid(o[:, self.out:])
      theta = gate * d
    else:
      d, gate, theta = o, torch.ones_like(o), o
    return (prior + theta if self.use_prior else theta), d, gate


class ForceHead(nn.Module):

  def __init__(self, z: int = 256, out_dim: int = 1, n_classes: int = 7, hidden: int = 512,
               pool_kind: str = "avg"):
    super().__init__()
    self.pool, self.out_dim, self.k = pool_kind, out_dim, n_classes
    self.neck = nn.Sequential(nn.Conv2d(z, z, 3, padding=1), nn.GELU())
    self.attn = nn.Conv2d(z, 1, 1)
    self.trunk = nn.Sequential(nn.Linear(z, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                               nn.GELU())
    self.head = nn.Linear(hidden, n_classes * out_dim)

  def forward(self, x):
    g = pool(self.neck(x), self.pool, self.attn)
    return self.head(self.trunk(g)).view(x.shape[0], self.out_dim, self.k)


class PoseNet(nn.Module):
  """backbone + change encoder + residual head. `separate_backbone_calls` encodes the current
  and base image in two calls (as the original does) instead of one concatenated batch."""

  def __init__(self, backbone_config, *, change_dim: int = 256, use_orig_feat: bool = True,
               hidden: int = 512, use_prior: bool = False, attn_implementation: str = "sdpa",
               separate_backbone_calls: bool = False, rope_rescale: float | None = None):
    super().__init__()
    self.backbone = Backbone(backbone_config, attn_implementation=attn_implementation,
                             rope_rescale=rope_rescale)
    self.change = ChangeEncoder(backbone_config.dim, change_dim, True, use_orig_feat)
    self.head = PoseHead(change_dim, 45, hidden, use_prior=use_prior)
    self.separate = separate_backbone_calls

  def forward(self, img, base_img, prior=None):
    if self.separate:
      ft, f0 = self.backbone(img), self.backbone(base_img)
    else:
      ft, f0 = self.backbone(torch.cat([img, base_img]), streams=2).chunk(2)
    return self.head(self.change(ft, f0), prior)


def freeze(net: PoseNet, n_unfrozen_blocks: int) -> list[nn.Parameter]:
  """The original's freezing: embeddings always, all blocks but the last N, the final norm when
  N = 0. Returns the trainable parameters (heads + unfrozen part)."""
  model = net.backbone.model
  depth = len(model.model.layer)
  for p in model.parameters():
    p.requires_grad_(False)
  for block in list(model.model.layer)[depth - n_unfrozen_blocks:] if n_unfrozen_blocks else []:
    for p in block.parameters():
      p.requires_grad_(True)
  if n_unfrozen_blocks:
    for p in model.norm.parameters():
      p.requires_grad_(True)
  return [p for p in net.parameters() if p.requires_grad]


def make_optimizer(params, *, lr=1e-3, weight_decay=1e-2) -> torch.optim.Optimizer:
  # foreach=True is torch's default on CPU tensors too; explicit so the comparison is stable.
  return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=weight_decay, foreach=True)


class PoseRunner:
  """The pose network, smplx MANO, AdamW and a train step over numpy NHWC batches (the dict
  layout of dd_jax's batches); what the benchmark times and its memory child runs."""

  def __init__(self, backbone_config, n_unfrozen: int, mano_dir: str, *, seed: int = 0,
               rope_rescale: float | None = 2.0):
    torch.manual_seed(seed)
    self.net = PoseNet(backbone_config, rope_rescale=rope_rescale)  # dd_jax's default: 2
    randomise_last_layer(self.net)  # theta then depends on the whole network (parity checks)
    self.trainable = freeze(self.net, n_unfrozen)
    self.optimizer = make_optimizer(self.trainable)
    self.mano = make_mano(mano_dir)
    self.step_fn = make_train_step(self.net, self.mano, self.optimizer)

  @staticmethod
  def tensors(batch: dict[str, np.ndarray]):
    t = torch.from_numpy
    return (t(batch["img"]).permute(0, 3, 1, 2), t(batch["base_img"]).permute(0, 3, 1, 2),
            t(batch["hamer_pose"]), t(batch["gt_pose"]), t(batch["hamer_shape"]))

  def train_step(self, batch: dict[str, np.ndarray], rope_scale=None) -> dict[str, float]:
    """rope_scale: (depth, 2) RoPE factors [image, base] per block to use instead of random
    draws (dd_jax's `draw_rope_scale` layout), to compare a step with dd_jax's."""
    self.net.train()
    with (forced_rope_draws(rope_scale) if rope_scale is not None else contextlib.nullcontext()):
      loss, grad_norm = self.step_fn(*self.tensors(batch))
    return {"loss": float(loss), "grad_norm": float(grad_norm)}

  def infer(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
    self.net.eval()
    with torch.inference_mode():
      img, base, prior, _, _ = self.tensors(batch)
      return self.net(img, base, prior)[0]


# ------------------------------------------------------------------ MANO and losses (§2.5)


def make_mano(folder: str):
  """smplx MANO (right, no PCA, flat hand mean) from `folder`/MANO_RIGHT.pkl; the synthetic hand
  is written there first when the file is missing."""
  import smplx  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, "MANO_RIGHT.pkl")
  if not os.path.exists(path):
    from dd_jax.synthetic import hand as synthetic  # pylint: disable=import-outside-toplevel
    os.makedirs(folder, exist_ok=True)
    synthetic.write_synthetic_mano(path, layout="cleaned")
  return smplx.MANO(model_path=folder, is_rhand=True, use_pca=False, flat_hand_mean=True)


def mano_keypoints(mano, pose: torch.Tensor, betas: torch.Tensor,
                   tip_ids=DELTADORSAL_TIP_IDS) -> torch.Tensor:
  """(B, 45) axis-angle, (B, 10) betas -> (B, 21, 3) OpenPose keypoints (zero orient/transl)."""
  b = pose.shape[0]
  zeros = pose.new_zeros(b, 3)
  out = mano(betas=betas, hand_pose=pose, global_orient=zeros, transl=zeros)
  kp = pose.new_zeros(b, 21, 3)
  kp[:, JOINT_SLOTS] = out.joints[:, JOINT_SOURCE]
  kp[:, TIP_SLOTS] = out.vertices[:, tip_ids]
  return kp


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
  """Rodrigues as the original's geom_utils (angle clamped at 1e-9)."""
  theta = aa.norm(dim=-1, keepdim=True).clamp(min=1e-9)
  kx, ky, kz = (aa / theta).unbind(-1)
  zero = torch.zeros_like(kx)
  k = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(*aa.shape[:-1], 3, 3)
  eye = torch.eye(3, dtype=aa.dtype).expand(*aa.shape[:-1], 3, 3)
  return eye + torch.sin(theta)[..., None] * k + (1 - torch.cos(theta))[..., None] * (k @ k)


def pose_losses(mano, pred: torch.Tensor, gt: torch.Tensor, betas: torch.Tensor):
  """Per-sample (keypoint (B,), pose (B,)): summed root-relative L1, summed rotation SE."""
  pk, gk = mano_keypoints(mano, pred, betas), mano_keypoints(mano, gt, betas)
  pk, gk = pk - pk[:, :1], gk - gk[:, :1]
  keypoint = (pk - gk).abs().sum(dim=(1, 2))
  b = pred.shape[0]
  rp, rg = axis_angle_to_matrix(pred.reshape(b, 15, 3)), axis_angle_to_matrix(gt.reshape(b, 15, 3))
  return keypoint, ((rp - rg) ** 2).sum(dim=(1, 2, 3))


def pose_loss(mano, pred, gt, betas, keypoint_weight=0.05, pose_weight=0.001) -> torch.Tensor:
  keypoint, pose = pose_losses(mano, pred, gt, betas)
  return keypoint_weight * keypoint.sum() + pose_weight * pose.sum()


def make_train_step(net: PoseNet, mano, optimizer, *, clip_norm: float = 1.0):
  """One training step as Lightning runs it: forward, loss, backward, clip, AdamW. Returns a
  function (img, base_img, prior, gt_pose, betas) -> (loss, gradient norm before clipping)."""
  trainable = [p for group in optimizer.param_groups for p in group["params"]]

  def step(img, base_img, prior, gt_pose, betas):
    optimizer.zero_grad(set_to_none=True)
    theta, _, _ = net(img, base_img, prior)
    loss = pose_loss(mano, theta, gt_pose, betas)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
    optimizer.step()
    return loss.detach(), grad_norm

  return step


# ------------------------------------------------------------------ input transforms (§4)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
  """torchvision.transforms.functional._get_gaussian_kernel1d."""
  half = (kernel_size - 1) * 0.5
  x = torch.linspace(-half, half, steps=kernel_size)
  pdf = torch.exp(-0.5 * (x / sigma).pow(2))
  return pdf / pdf.sum()


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
  """torchvision's tensor gaussian_blur: 2-D kernel as an outer product, reflect padding, one
  depthwise conv2d over (C, H, W)."""
  k1 = _gaussian_kernel1d(kernel_size, sigma)
  k2 = torch.mm(k1[:, None], k1[None, :])
  c = img.shape[-3]
  kernel = k2.expand(c, 1, kernel_size, kernel_size)
  pad = kernel_size // 2
  x = F.pad(img[None], [pad, pad, pad, pad], mode="reflect")
  return F.conv2d(x, kernel, groups=c)[0]


def _grayscale(img: torch.Tensor) -> torch.Tensor:
  r, g, b = img.unbind(-3)
  return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


class TorchvisionStyleTransform:
  """The original's train transforms with torchvision's tensor semantics, in torch ops:
  ColorJitter(brightness=0.1, contrast=0.1) (random order), gamma 1 +- 0.1, Gaussian noise
  std 0.007 + clamp, GaussianBlur(5, sigma U(0.1, 1)), Resize(size, antialias=True), Normalize.
  `augment=False` keeps resize + normalise only."""

  def __init__(self, size: int, augment: bool = True, generator: torch.Generator | None = None):
    self.size, self.augment = size, augment
    self.g = generator or torch.Generator().manual_seed(0)

  def _uniform(self, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=self.g))

  def __call__(self, rgb_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 normalised (ToTensor first, as T.ToTensor)."""
    x = torch.from_numpy(rgb_uint8).permute(2, 0, 1).float().div(255.0)
    if self.augment:
      b, c = self._uniform(0.9, 1.1), self._uniform(0.9, 1.1)
      ops = [lambda t: (b * t).clamp(0, 1),
             lambda t: (c * t + (1 - c) * _grayscale(t).mean()).clamp(0, 1)]
      for i in torch.randperm(2, generator=self.g).tolist():
        x = ops[i](x)
      gamma = 1.0 + self._uniform(-0.1, 0.1)
      x = x.pow(gamma).clamp(0, 1)  # adjust_gamma(gain=1)
      x = (x + torch.randn(x.shape, generator=self.g) * 0.007).clamp(0, 1)
      x = gaussian_blur(x, 5, self._uniform(0.1, 1.0))
    x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                      align_corners=False, antialias=True)[0]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def original_sample(img_jpeg: bytes, base_jpeg: bytes, transform: TorchvisionStyleTransform):
  """The original's per-sample image work: OpenCV decode (BGR -> RGB), transform both."""
  out = []
  for data in (img_jpeg, base_jpeg):
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    out.append(transform(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
  return out


def original_online_sample(img_jpeg: bytes, base_jpeg: bytes, K: np.ndarray, d: np.ndarray,
                           frame_kp: np.ndarray, base_kp: np.ndarray,
                           transform: TorchvisionStyleTransform):
  """The original's online-mode image work as its code lays it out (SPEC.md §4; its own online
  mode never runs, see there): decode both, cv2.undistort both full images, homography from the
  projected keypoints (given here in pixels), warp the whole base to the frame's size (cubic),
  crop both around the frame keypoints, transform both."""
  images = []
  for data in (img_jpeg, base_jpeg):
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    images.append(cv2.undistort(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), K, d))
  img, base = images
  align, crop = [0, 1, 5, 17], [0, 1, 2, 5, 9, 13, 17]
  H, _ = cv2.findHomography(base_kp[align], frame_kp[align], cv2.RANSAC, 3.0)
  h, w = img.shape[:2]
  warped = cv2.warpPerspective(base, H, (w, h), flags=cv2.INTER_CUBIC)
  pts = frame_kp[crop]
  x0, x1 = max(int(pts[:, 0].min()) - 50, 0), min(int(pts[:, 0].max()) + 101, w)
  y0, y1 = max(int(pts[:, 1].min()) - 50, 0), min(int(pts[:, 1].max()) + 51, h)
  return [transform(np.ascontiguousarray(x[y0:y1, x0:x1])) for x in (img, warped)]


# ------------------------------------------------------------------ weights -> dd_jax


def _lin(m: nn.Linear) -> dict[str, np.ndarray]:
  return {"kernel": m.weight.detach().numpy().T.copy(), "bias": m.bias.detach().numpy().copy()}


def _conv(m: nn.Conv2d) -> dict[str, np.ndarray]:
  return {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0).copy(),
          "bias": m.bias.detach().numpy().copy()}


def jax_params(net: PoseNet, config) -> dict[str, Any]:
  """Nested params of dd_jax's PoseNet (deltadorsal.assign_params layout) equal to `net`'s."""
  from dd_jax.convert import dinov3 as convert_dinov3  # pylint: disable=import-outside-toplevel
  sd = {k: v.detach().numpy() for k, v in net.backbone.model.state_dict().items()}
  _, backbone = convert_dinov3.hf_state_dict_to_params(sd, config)
  head = {"neck": _conv(net.head.neck[0]), "mlp1": _lin(net.head.mlp[0]),
          "mlp2": _lin(net.head.mlp[2]), "mlp3": _lin(net.head.mlp[4])}
  if net.head.use_film:
    head["film"] = _lin(net.head.film[0])
  return {"backbone": backbone,
          "change": {"conv1": _conv(net.change.conv[0]), "conv2": _conv(net.change.conv[2])},
          "head": head}


def randomise_last_layer(net: PoseNet, scale: float = 1e-3, seed: int = 0) -> None:
  """Small random last-layer weights, so theta (and the loss) depends on the whole network."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    last = net.head.mlp[4]
    last.weight.copy_(torch.randn(last.weight.shape, generator=g) * scale)


def matmul_flops_per_image(config, height: int, width: int) -> dict[str, float]:
  """Analytic forward FLOPs (2 per multiply-add) of one image through the backbone, by part."""
  p = config.patch_size
  n = (height // p) * (width // p)
  t = n + config.num_prefix_tokens
  d, f = config.dim, config.ffn_hidden
  ffn_mats = 2 if config.ffn == "mlp" else 3
  block = 2 * t * d * 3 * d + 2 * t * d * d + ffn_mats * 2 * t * d * f + 2 * 2 * t * t * d
  return {"patch_embed": 2 * n * p * p * 3 * d, "block": block,
          "total": 2 * n * p * p * 3 * d + config.depth * block}


def head_flops_per_sample(dim: int, h: int, w: int, change_dim: int = 256,
                          use_orig_feat: bool = True, hidden: int = 512) -> float:
  """Analytic forward FLOPs of change encoder + pose head for one sample (h x w feature map)."""
  cin = dim + 1 + (2 * dim if use_orig_feat else 0)
  convs = 2 * h * w * 9 * (cin * change_dim + change_dim * change_dim + change_dim * change_dim)
  mlp = 2 * (change_dim * hidden + hidden * hidden + hidden * 45)
  return float(convs + mlp)


def pose_step_flops(config, size: int, n_unfrozen: int, *, use_orig_feat: bool = True,
                    train: bool = True) -> float:
  """Analytic FLOPs per SAMPLE (two images) of a train step (forward + backward through the
  heads and the last n_unfrozen blocks: backward = 2x forward) or of inference."""
  per_image = matmul_flops_per_image(config, size, size)
  h = size // config.patch_size
  head = head_flops_per_sample(config.dim, h, h, use_orig_feat=use_orig_feat)
  forward = 2 * per_image["total"] + head
  if not train:
    return forward
  # Conv1's input gradient is needed only when backbone blocks train; count it with the head.
  return forward + 2 * head + 2 * (2 * n_unfrozen * per_image["block"])


def num_threads() -> int:
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)

