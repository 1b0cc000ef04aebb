"""HaMeR in PyTorch, written from geopavlakos/hamer's published code (docs/hamer.md): the
reference dd_jax's port, converter and preprocessing are tested and benchmarked against.

The modules carry HaMeR's attribute names, so `HAMER(...).state_dict()` has the released
checkpoint's keys (backbone.*, mano_head.*, discriminator.*, mano.* smplx buffers, initialized).
`HAMER.forward` is HaMeR's forward_step in eval mode; `vitdet_item` is ViTDetDataset.__getitem__
(the demo's preprocessing) with cv2 and scipy.ndimage.gaussian_filter (what skimage's gaussian
calls); `cam_crop_to_full` is the demo's full-image camera. torch, smplx and scipy only.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ ViTPose backbone (vit.py)


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):

  def __init__(self, dim, num_heads, qkv_bias=True):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio=4):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, dim, patch=16, ratio=1):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch // ratio,
                          padding=4 + 2 * (ratio // 2 - 1))

  def forward(self, x):
    x = self.proj(x)
    return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class ViT(nn.Module):

  def __init__(self, dim=1280, depth=32, num_heads=16, mlp_ratio=4, img_size=(256, 192)):
    super().__init__()
    self.patch_embed = PatchEmbed(dim)
    num_patches = (img_size[0] // 16) * (img_size[1] // 16)
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.last_norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):
    b = x.shape[0]
    x, (hp, wp) = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
    for block in self.blocks:
      x = block(x)
    x = self.last_norm(x)
    return x.permute(0, 2, 1).reshape(b, -1, hp, wp)


# ------------------------------------------------------------------ MANO head (pose_transformer.py)


class PreNorm(nn.Module):

  def __init__(self, dim, fn):
    super().__init__()
    self.norm, self.fn = nn.LayerNorm(dim), fn

  def forward(self, x, **kwargs):
    return self.fn(self.norm(x), **kwargs)


def _split_heads(t, heads):
  b, n, hd = t.shape
  return t.reshape(b, n, heads, hd // heads).transpose(1, 2)


def _merge_heads(t):
  b, h, n, d = t.shape
  return t.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):

  def __init__(self, dim, heads, dim_head):
    super().__init__()
    inner = heads * dim_head
    self.heads, self.scale = heads, dim_head ** -0.5
    self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

  def forward(self, x):
    q, k, v = (_split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
    attn = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
    return self.to_out(_merge_heads(torch.matmul(attn, v)))


class CrossAttention(nn.Module):

  def __init__(self, dim, context_dim, heads, dim_head):
    super().__init__()
    inner = heads * dim_head
    self.heads, self.scale = heads, dim_head ** -0.5
    self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
    self.to_q = nn.Linear(dim, inner, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

  def forward(self, x, context=None):
    k, v = self.to_kv(context).chunk(2, dim=-1)
    q, k, v = (_split_heads(t, self.heads) for t in (self.to_q(x), k, v))
    attn = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
    return self.to_out(_merge_heads(torch.matmul(attn, v)))


class FeedForward(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0),
                             nn.Linear(hidden, dim), nn.Dropout(0.0))

  def forward(self, x):
    return self.net(x)


class TransformerCrossAttn(nn.Module):

  def __init__(self, dim, depth, heads, dim_head, mlp_dim, context_dim):
    super().__init__()
    self.layers = nn.ModuleList([nn.ModuleList([
        PreNorm(dim, SelfAttention(dim, heads, dim_head)),
        PreNorm(dim, CrossAttention(dim, context_dim, heads, dim_head)),
        PreNorm(dim, FeedForward(dim, mlp_dim))]) for _ in range(depth)])

  def forward(self, x, context):
    for self_attn, cross_attn, ff in self.layers:
      x = self_attn(x) + x
      x = cross_attn(x, context=context) + x
      x = ff(x) + x
    return x


class TransformerDecoder(nn.Module):

  def __init__(self, dim, depth, heads, dim_head, mlp_dim, context_dim, num_tokens=1,
               token_dim=1):
    super().__init__()
    self.to_token_embedding = nn.Linear(token_dim, dim)
    self.pos_embedding = nn.Parameter(torch.randn(1, num_tokens, dim))
    self.transformer = TransformerCrossAttn(dim, depth, heads, dim_head, mlp_dim, context_dim)

  def forward(self, inp, context):
    x = self.to_token_embedding(inp)
    x = x + self.pos_embedding[:, :x.shape[1]]
    return self.transformer(x, context)


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
  """hamer/utils/geometry.py: (B, 6) -> (B, 3, 3), columns b1, b2, b3."""
  x = x.reshape(-1, 2, 3).permute(0, 2, 1).contiguous()
  a1, a2 = x[:, :, 0], x[:, :, 1]
  b1 = F.normalize(a1)
  b2 = F.normalize(a2 - torch.einsum("bi,bi->b", b1, a2).unsqueeze(-1) * b1)
  b3 = torch.cross(b1, b2, dim=-1)
  return torch.stack((b1, b2, b3), dim=-1)


class MANOTransformerDecoderHead(nn.Module):

  def __init__(self, mean_params, *, dim=1024, depth=6, heads=8, dim_head=64, mlp_dim=1024,
               context_dim=1280, num_hand_joints=15):
    super().__init__()
    npose = 6 * (num_hand_joints + 1)
    self.num_hand_joints = num_hand_joints
    self.transformer = TransformerDecoder(dim, depth, heads, dim_head, mlp_dim, context_dim)
    self.decpose, self.decshape, self.deccam = (nn.Linear(dim, npose), nn.Linear(dim, 10),
                                                nn.Linear(dim, 3))
    for name, key in (("init_hand_pose", "pose"), ("init_betas", "shape"), ("init_cam", "cam")):
      self.register_buffer(name, torch.from_numpy(np.asarray(mean_params[key], np.float32))[None])

  def forward(self, x):
    b = x.shape[0]
    x = x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
    token = torch.zeros(b, 1, 1)
    token_out = self.transformer(token, context=x)[:, 0]
    pose = self.decpose(token_out) + self.init_hand_pose
    betas = self.decshape(token_out) + self.init_betas
    cam = self.deccam(token_out) + self.init_cam
    rot = rot6d_to_rotmat(pose).view(b, self.num_hand_joints + 1, 3, 3)
    return {"global_orient": rot[:, [0]], "hand_pose": rot[:, 1:], "betas": betas}, cam


class Discriminator(nn.Module):
  """HaMeR's adversarial pose/shape discriminator: only its keys matter here (training-only)."""

  def __init__(self, num_joints=15):
    super().__init__()
    self.D_conv1, self.D_conv2 = nn.Conv2d(9, 32, 1), nn.Conv2d(32, 32, 1)
    self.pose_out = nn.ModuleList([nn.Linear(32, 1) for _ in range(num_joints)])
    self.betas_fc1, self.betas_fc2, self.betas_out = (nn.Linear(10, 10), nn.Linear(10, 5),
                                                      nn.Linear(5, 1))
    self.D_alljoints_fc1 = nn.Linear(32 * num_joints, 1024)
    self.D_alljoints_fc2 = nn.Linear(1024, 1024)
    self.D_alljoints_out = nn.Linear(1024, 1)


# ------------------------------------------------------------------ MANO (mano_wrapper.py)

MANO_TO_OPENPOSE = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]


def make_mano(folder: str):
  """HaMeR's MANO: smplx.MANOLayer (right hand, PCA buffers unused) + smplx's tip vertices and
  the OpenPose joint map as buffers. `folder`/MANO_RIGHT.pkl: the synthetic hand when missing."""
  import smplx  # pylint: disable=import-outside-toplevel
  from smplx.vertex_ids import vertex_ids  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, "MANO_RIGHT.pkl")
  if not os.path.exists(path):
    from dd_jax.synthetic import hand as synthetic  # pylint: disable=import-outside-toplevel
    os.makedirs(folder, exist_ok=True)
    synthetic.write_synthetic_mano(path, layout="cleaned")

  class MANO(smplx.MANOLayer):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.register_buffer("extra_joints_idxs",
                           torch.tensor(list(vertex_ids["mano"].values()), dtype=torch.long))
      self.register_buffer("joint_map", torch.tensor(MANO_TO_OPENPOSE, dtype=torch.long))

    def forward(self, **kwargs):
      out = super().forward(**kwargs)
      extra = torch.index_select(out.vertices, 1, self.extra_joints_idxs)
      out.joints = torch.cat([out.joints, extra], dim=1)[:, self.joint_map]
      return out

  return MANO(model_path=folder, gender="neutral", num_hand_joints=15, create_body_pose=False)


# ------------------------------------------------------------------ the Lightning module


class HAMER(nn.Module):
  """HaMeR's LightningModule's modules and forward_step (eval), without Lightning."""

  def __init__(self, mano_folder: str, mean_params: dict, *, backbone=None, head=None,
               focal_length=5000.0, image_size=256):
    super().__init__()
    backbone, head = dict(backbone or {}), dict(head or {})
    self.backbone = ViT(**backbone)
    head.setdefault("context_dim", backbone.get("dim", 1280))
    self.mano_head = MANOTransformerDecoderHead(mean_params, **head)
    self.discriminator = Discriminator()
    self.mano = make_mano(mano_folder)
    self.register_buffer("initialized", torch.tensor(False))
    self.focal_length, self.image_size = focal_length, image_size

  @torch.no_grad()
  def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
    """img (B, 3, 256, 256) normalised -> HaMeR's output dict."""
    b = img.shape[0]
    params, cam = self.mano_head(self.backbone(img[:, :, :, 32:-32]))
    f = self.focal_length
    cam_t = torch.stack([cam[:, 1], cam[:, 2], 2 * f / (self.image_size * cam[:, 0] + 1e-9)], -1)
    out = self.mano(global_orient=params["global_orient"].float(),
                    hand_pose=params["hand_pose"].float(), betas=params["betas"].float(),
                    pose2rot=False)
    kp3d = out.joints.reshape(b, -1, 3)
    p = kp3d + cam_t[:, None]
    kp2d = (f / self.image_size) * p[..., :2] / p[..., 2:]
    return {"pred_cam": cam, "pred_mano_params": params, "pred_cam_t": cam_t,
            "pred_keypoints_3d": kp3d, "pred_vertices": out.vertices, "pred_keypoints_2d": kp2d}


def randomise(model: nn.Module, seed: int = 0) -> None:
  """Random weights with every path exercised: LayerNorm scales near 1, non-zero biases,
  weights scaled by fan-in so activations stay O(1) through the depth."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2 and "embed" not in name:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))


def mean_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Stand-ins for mano_mean_params.npz: the identity rotation's 6D plus noise, shape, cam."""
  rng = np.random.default_rng(seed)
  pose = np.tile(np.array([1.0, 0, 0, 0, 1.0, 0]), 16) + 0.1 * rng.standard_normal(96)
  return {"pose": pose, "shape": 0.5 * rng.standard_normal(10),
          "cam": np.array([0.9, 0.02, -0.03])}


def save_checkpoint(path: str, model: HAMER, hyper_parameters=None, **extra) -> None:
  """torch.save of what Lightning's save_checkpoint writes: the module's real state_dict()
  (an OrderedDict with _metadata) inside the usual dict."""
  ckpt = {"epoch": 7, "global_step": 1000, "pytorch-lightning_version": "2.5.0",
          "state_dict": model.state_dict(), "loops": {}, "callbacks": {},
          "optimizer_states": [], "lr_schedulers": []}
  if hyper_parameters is not None:
    ckpt["hyper_parameters"] = hyper_parameters
  ckpt.update(extra)
  torch.save(ckpt, path)


# ------------------------------------------------------------------ the demo's preprocessing


def expand_to_aspect_ratio(input_shape, target_aspect_ratio):
  w, h = input_shape
  w_t, h_t = target_aspect_ratio
  if h / w < h_t / w_t:
    h_new, w_new = max(w * h_t / w_t, h), w
  else:
    h_new, w_new = h, max(h * w_t / h_t, w)
  return np.array([w_new, h_new])


def vitdet_item(img_bgr: np.ndarray, box, right, rescale_factor: float = 2.0,
                image_size: int = 256) -> dict[str, np.ndarray]:
  """ViTDetDataset(cfg, img, boxes, right, rescale_factor)[i] for one box: the normalised crop
  (3, S, S) float32 and box_center, box_size, img_size, right."""
  boxes = np.asarray(box, np.float32)[None]
  center = ((boxes[:, 2:4] + boxes[:, 0:2]) / 2.0)[0]
  scale = (rescale_factor * (boxes[:, 2:4] - boxes[:, 0:2]) / 200.0)[0]
  bbox_size = expand_to_aspect_ratio(scale * 200, target_aspect_ratio=[192, 256]).max()
  right = np.float32(right)
  cvimg = img_bgr.copy()
  downsampling_factor = (bbox_size * 1.0) / image_size / 2.0
  if downsampling_factor > 1.1:
    # skimage.filters.gaussian(cvimg, sigma=(d-1)/2, channel_axis=2, preserve_range=True)
    sigma = (downsampling_factor - 1) / 2
    cvimg = scipy.ndimage.gaussian_filter(cvimg.astype(np.float64), (sigma, sigma, 0),
                                          mode="nearest", truncate=4.0)
  c_x, c_y = center[0], center[1]
  if right == 0:  # generate_image_patch_cv2 with do_flip
    cvimg = cvimg[:, ::-1, :]
    c_x = img_bgr.shape[1] - c_x - 1
  src = np.zeros((3, 2), np.float32)
  src[0] = (c_x, c_y)
  src[1] = src[0] + np.array([0, bbox_size * 0.5], np.float32)
  src[2] = src[0] + np.array([bbox_size * 0.5, 0], np.float32)
  half = image_size * 0.5
  dst = np.array([[half, half], [half, image_size], [image_size, half]], np.float32)
  trans = cv2.getAffineTransform(np.float32(src), np.float32(dst))
  patch = cv2.warpAffine(cvimg, trans, (image_size, image_size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  patch = np.transpose(patch[:, :, ::-1], (2, 0, 1)).astype(np.float32)
  mean = 255.0 * np.array([0.485, 0.456, 0.406])
  std = 255.0 * np.array([0.229, 0.224, 0.225])
  for c in range(3):
    patch[c] = (patch[c] - mean[c]) / std[c]
  return {"img": patch, "box_center": center.copy(), "box_size": bbox_size,
          "img_size": 1.0 * np.array([img_bgr.shape[1], img_bgr.shape[0]]), "right": right}


def cam_crop_to_full(cam_bbox, box_center, box_size, img_size, focal_length=5000.0):
  """hamer/utils/renderer.py (torch tensors, float32 as the demo has them)."""
  img_w, img_h = img_size[:, 0], img_size[:, 1]
  cx, cy, b = box_center[:, 0], box_center[:, 1], box_size
  bs = b * cam_bbox[:, 0] + 1e-9
  tz = 2 * focal_length / bs
  tx = (2 * (cx - img_w / 2.0) / bs) + cam_bbox[:, 1]
  ty = (2 * (cy - img_h / 2.0) / bs) + cam_bbox[:, 2]
  return torch.stack([tx, ty, tz], dim=-1)


def demo_outputs(model: HAMER, img_bgr: np.ndarray, boxes, rights, rescale_factor=2.0):
  """What demo.py computes per hand: the batch items, the model output, pred_cam with tx
  mirrored for left hands and cam_crop_to_full with scaled focal 5000/256*max(W, H)."""
  items = [vitdet_item(img_bgr, box, right, rescale_factor) for box, right in zip(boxes, rights)]
  batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}
  out = model(batch["img"])
  multiplier = 2 * batch["right"] - 1
  pred_cam = out["pred_cam"].clone()
  pred_cam[:, 1] = multiplier * pred_cam[:, 1]
  img_size = batch["img_size"].float()
  focal = model.focal_length / model.image_size * img_size.max()
  full = cam_crop_to_full(pred_cam, batch["box_center"].float(), batch["box_size"].float(),
                          img_size, focal)
  return batch, out, full, focal


# ------------------------------------------------------------------ tiny sizes for tests

TINY_BACKBONE = dict(dim=64, depth=2, num_heads=2)  # ViT(...) arguments; MLP ratio 4
TINY_HEAD = dict(dim=64, depth=2, heads=2, dim_head=16, mlp_dim=64)
# The same network as dd_jax's `get_config("custom", **TINY_CUSTOM)`.
TINY_CUSTOM = {"backbone": dict(TINY_BACKBONE, ffn_hidden=4 * TINY_BACKBONE["dim"]),
               "head": dict(TINY_HEAD)}


def tiny_model(mano_folder: str, seed: int = 0) -> HAMER:
  """A tiny HaMeR (2 ViT blocks and 2 decoder layers of width 64) with random weights."""
  torch.manual_seed(seed)
  model = HAMER(mano_folder, mean_params(seed), backbone=TINY_BACKBONE, head=TINY_HEAD).eval()
  randomise(model, seed + 1)
  return model


def omegaconf_hyper_parameters():
  """What HaMeR's save_hyperparameters pickles: {'cfg': an omegaconf DictConfig}."""
  import omegaconf  # pylint: disable=import-outside-toplevel
  return {"cfg": omegaconf.OmegaConf.create({
      "MODEL": {"IMAGE_SIZE": 256, "IMAGE_MEAN": [0.485, 0.456, 0.406],
                "IMAGE_STD": [0.229, 0.224, 0.225], "BBOX_SHAPE": None},
      "EXTRA": {"FOCAL_LENGTH": 5000}, "MANO": {"NUM_HAND_JOINTS": 15}})}
