"""The synthetic hand's pose space and appearance: finger curls, dorsal skin, press cues.

`HandRig` derives anatomical axes from a MANO-format model (whatever its orientation) and maps a
few latent finger curls to the 45 MANO pose numbers. `shade_hand` textures a rasterised hand
with skin that moves with the surface (sampled in rest-pose coordinates), knuckle creases that
fade and blanch as a joint bends, extensor tendons that stand out as a finger extends, a press
that flushes the back of the pressing fingers and of the hand and whitens their nails, and
Lambert + specular lighting: the pose shows in shape, shading and texture, which is the signal
DeltaDorsal learns from. The press cue is far stronger than on real hands (whose dorsal changes
are subtle) so that a ViT trained from scratch at 96 px learns it within the force demo.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dd_jax.synthetic import render

# MANO joint ids per finger (chain order), OpenPose-style finger order thumb, index, middle, ring, pinky.
FINGER_JOINTS = ((13, 14, 15), (1, 2, 3), (4, 5, 6), (10, 11, 12), (7, 8, 9))
FINGER_NAMES = ("thumb", "index", "middle", "ring", "pinky")
# Joint angles (radians) at curl 1 for (MCP, PIP, DIP); the thumb's are (CMC, MCP, IP).
CURL_ANGLES = np.array([[0.35, 0.6, 0.9], [1.25, 1.55, 0.95], [1.3, 1.6, 1.0], [1.3, 1.6, 1.0],
                        [1.25, 1.5, 0.95]])
TEXTURE_RESOLUTION = 0.0004  # metres per texel of the dorsal skin texture
# Under a full press the back of the pressing finger and its metacarpal band move this far
# towards a flushed tone: broad enough to survive resizing to the demo's 96 pixels.
PRESS_FLUSH = 0.8
PRESS_TONE = np.array([0.9, 0.42, 0.36])


@dataclasses.dataclass(frozen=True)
class Appearance:
  """What differs between participants: skin, lighting, texture image and hand shape."""
  skin: np.ndarray  # (3,) albedo RGB in [0, 1]
  palm: np.ndarray  # (3,) palmar skin albedo
  light_dir: np.ndarray  # (3,) unit, camera frame, pointing from the light to the scene
  light_color: np.ndarray  # (3,)
  ambient: float
  texture: np.ndarray  # (Ht, Wt, 3) float32 multiplicative skin detail around 1
  betas: np.ndarray  # (10,)


class HandRig:
  """Anatomical frame, per-vertex texture coordinates and the curl -> pose map of a model."""

  def __init__(self, model):
    self.v_rest = np.asarray(model.v_template, np.float64)
    self.faces = np.asarray(model.faces, np.int64)
    self.joints = np.asarray(model.joint_template, np.float64)
    weights = np.asarray(model.weights, np.float64)
    j = self.joints
    self.forward = _unit(j[4] - j[0])  # wrist -> middle knuckle
    self.dorsal = _unit(np.cross(self.forward, j[1] - j[7]))  # right hand: f x (pinky -> index)
    self.lateral = np.cross(self.dorsal, self.forward)  # towards the index side
    basis = np.stack([self.forward, self.lateral, self.dorsal])  # rows: rest axes
    self.basis = basis
    local = (self.v_rest - j[0]) @ basis.T  # (V, 3) in (forward, lateral, dorsal)
    self.uv_min = local[:, :2].min(0) - 0.01
    size = np.ceil((local[:, :2].max(0) + 0.01 - self.uv_min) / TEXTURE_RESOLUTION).astype(int)
    self.texture_shape = (int(size[1]), int(size[0]))  # rows = lateral, cols = forward
    normals = render.vertex_normals(self.v_rest, self.faces)
    # Vertex attributes: rest position (3), dorsal-ness (1).
    self.attributes = np.concatenate([self.v_rest, np.clip(2.0 * normals @ self.dorsal, -1, 1)[:, None]], 1)
    # Finger of each vertex by skinning weight (0..4 thumb..pinky, 5 palm/wrist); per face majority.
    owner = np.argmax(weights, 1)
    label = np.full(len(owner), 5)
    for k, chain in enumerate(FINGER_JOINTS):
      label[np.isin(owner, chain)] = k
    self.face_label = np.array([np.bincount(label[f], minlength=6).argmax() for f in self.faces])
    tips = np.asarray(model.tip_ids)
    self.tips = self.v_rest[tips]  # (5, 3) thumb..pinky
    self.tip_ids = tips
    # Flexion axes: fingers bend about the lateral axis (towards the palm), the thumb about
    # dorsal x thumb-direction; abduction about the dorsal axis.
    thumb_dir = _unit(j[15] - j[13])
    self.flex_axes = [_unit(np.cross(self.dorsal, thumb_dir))] + [self.lateral] * 4
    self.finger_dirs = [thumb_dir] + [_unit(self.tips[k] - j[FINGER_JOINTS[k][0]])
                                      for k in range(1, 5)]
    self.finger_width = 0.009

  def pose(self, curls: np.ndarray, spread: np.ndarray | None = None) -> np.ndarray:
    """Finger curls (..., 5) thumb..pinky (0 straight, 1 fist) [+ spread (..., 4) rad] -> (..., 45)."""
    curls = np.asarray(curls, np.float64)
    out = np.zeros(curls.shape[:-1] + (15, 3))
    for k, chain in enumerate(FINGER_JOINTS):
      for level, joint in enumerate(chain):
        angle = curls[..., k:k + 1] * CURL_ANGLES[k, level]
        out[..., joint - 1, :] = angle * self.flex_axes[k]
    if spread is not None:
      for k in range(1, 5):
        out[..., FINGER_JOINTS[k][0] - 1, :] += np.asarray(spread)[..., k - 1:k] * self.dorsal
    return out.reshape(curls.shape[:-1] + (45,))

  def rest_orientation(self) -> np.ndarray:
    """(3, 3) rows forward, lateral, dorsal: rest-frame axes."""
    return self.basis


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
  field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
  return field / max(float(field.std()), 1e-6)


def make_appearance(rng: np.random.Generator, rig: HandRig, participant: int) -> Appearance:
  """A participant's skin tone, lighting, skin detail texture and hand shape."""
  # Light to dark skin; a low-discrepancy sequence over participants, so that a few training
  # participants already span the tones of the held-out ones.
  tone = float(np.clip((participant * 0.618034) % 1.0 + rng.normal(0, 0.05), 0, 1))
  light_skin, dark_skin = np.array([0.93, 0.76, 0.65]), np.array([0.42, 0.27, 0.18])
  skin = (1 - tone) * light_skin + tone * dark_skin + rng.normal(0, 0.02, 3)
  palm = np.clip(skin * np.array([1.08, 1.0, 0.98]) + 0.06, 0, 1)
  light_dir = _unit(np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.0), 1.0]))
  warm = rng.uniform(-0.08, 0.08)
  light_color = np.array([1.0 + warm, 1.0, 1.0 - warm]) * rng.uniform(0.85, 1.1)
  h, w = rig.texture_shape
  detail = (1.0 + 0.07 * _smooth_noise(rng, (h, w), 12.0) + 0.035 * _smooth_noise(rng, (h, w), 0.8))
  texture = np.repeat(detail[..., None], 3, axis=2)
  # Veins: a few smooth darker bluish curves across the back of the hand.
  veins = np.zeros((h, w), np.float32)
  for _ in range(rng.integers(3, 6)):
    x = np.linspace(rng.uniform(0.05, 0.2), rng.uniform(0.35, 0.5), 12) * w
    y = rng.uniform(0.3, 0.7) * h + np.cumsum(rng.normal(0, 0.03 * h, 12))
    cv2.polylines(veins, [np.stack([x, y], 1).astype(np.int32)], False, 1.0,
                  int(rng.integers(2, 5)), cv2.LINE_AA)
  veins = cv2.GaussianBlur(veins, (0, 0), 1.5)
  texture *= 1.0 - 0.12 * veins[..., None] * np.array([1.0, 0.8, 0.4], np.float32)
  # Freckles and moles.
  spots = np.zeros((h, w), np.float32)
  for _ in range(rng.integers(15, 60)):
    cv2.circle(spots, (int(rng.integers(w)), int(rng.integers(h))), int(rng.integers(1, 4)),
               float(rng.uniform(0.3, 1.0)), -1, cv2.LINE_AA)
  texture *= 1.0 - 0.25 * cv2.GaussianBlur(spots, (0, 0), 0.8)[..., None] * np.array([0.8, 1.0, 1.1])
  betas = rng.normal(0.0, 0.5, 10)
  return Appearance(skin=np.clip(skin, 0, 1), palm=palm, light_dir=light_dir,
                    light_color=light_color, ambient=float(rng.uniform(0.3, 0.45)),
                    texture=texture.astype(np.float32), betas=betas)


def shade_hand(rig: HandRig, look: Appearance, raster: render.Raster, vertices_cam: np.ndarray,
               curls: np.ndarray, press: np.ndarray, image: np.ndarray) -> None:
  """Paints the rasterised hand into `image` (H, W, 3) float32 in [0, 1], in place.

  curls (5,) and press (5,) in [0, 1] per finger (thumb..pinky) drive the creases, tendon
  relief, knuckle blanching and nail whitening; vertices_cam (V, 3) give normals and view.
  """
  mask = raster.mask
  if not mask.any():
    return
  faces = rig.faces
  face_ids = raster.face[mask]
  bary = raster.bary[mask]
  tri = faces[face_ids]
  attrs = np.einsum("pk,pkc->pc", bary, rig.attributes[tri])
  rest, dorsal = attrs[:, :3], np.clip(attrs[:, 3], -1, 1)
  local = (rest - rig.joints[0]) @ rig.basis.T
  label = rig.face_label[face_ids]
  p = len(face_ids)

  # Skin albedo: dorsal tone with texture detail, palmar tone underneath.
  tex_xy = ((local[:, :2] - rig.uv_min) / TEXTURE_RESOLUTION).astype(np.float32)
  cols = 1024  # cv2.remap maps must stay under 32767 pixels a side
  rows = -(-p // cols)
  tex_xy = np.pad(tex_xy, ((0, rows * cols - p), (0, 0))).reshape(rows, cols, 2)
  detail = cv2.remap(look.texture, tex_xy[..., 0], tex_xy[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT_101).reshape(-1, 3)[:p]
  t = np.clip(0.5 + 0.5 * dorsal, 0, 1)[:, None]
  albedo = (t * look.skin + (1 - t) * look.palm) * detail
  on_back = np.clip(dorsal * 2.0, 0, 1)

  # Knuckle creases: fine lines across each finger joint, deep when straight, stretched flat
  # (and blanched) when bent.
  crease = np.zeros(p)
  blanch = np.zeros(p)
  for k, chain in enumerate(FINGER_JOINTS):
    sel = label == k if k > 0 else label == 0
    joints_of_finger = chain[1:] if k == 0 else chain
    if k > 0:  # knuckles (MCP) sit on the palm part of the mesh too
      sel = sel | (label == 5)
    idx = np.flatnonzero(sel)
    if idx.size == 0:
      continue
    d = rig.finger_dirs[k]
    for level, joint in enumerate(joints_of_finger):
      offset = rest[idx] - rig.joints[joint]
      axial = offset @ d
      lateral = np.linalg.norm(offset - axial[:, None] * d[None], axis=1)
      width = 0.0045 if level == 0 and k > 0 else 0.0032
      band = np.exp(-(axial / width) ** 2) * (lateral < 0.012)
      level_in_chain = level + (1 if k == 0 else 0)
      bend = np.clip(curls[k] * CURL_ANGLES[k, level_in_chain] / 1.2, 0, 1)
      lines = 0.5 + 0.5 * np.cos(2 * np.pi * axial / 0.0011)
      crease[idx] += band * lines * (1 - bend) ** 2
      blanch[idx] += band * bend
  albedo *= (1 - 0.38 * np.clip(crease, 0, 1) * on_back)[:, None]
  albedo = albedo + (0.22 * np.clip(blanch, 0, 1) * on_back)[:, None] * (1.02 - albedo)

  # Extensor tendons: ridges from the wrist to each knuckle, standing out as a finger extends.
  palm_idx = np.flatnonzero(label == 5)
  tense = np.zeros(p)
  if palm_idx.size:
    relief = np.zeros(palm_idx.size)
    for k in range(1, 5):
      a, b = rig.joints[0] + 0.25 * (rig.joints[FINGER_JOINTS[k][0]] - rig.joints[0]), \
          rig.joints[FINGER_JOINTS[k][0]]
      ab = b - a
      s = np.clip(((rest[palm_idx] - a) @ ab) / (ab @ ab), 0, 1)
      dist = np.linalg.norm(rest[palm_idx] - a - s[:, None] * ab, axis=1)
      prominence = 0.05 + 0.16 * np.clip(1 - curls[k], 0, 1) + 0.08 * press[k]
      relief += prominence * (np.exp(-(dist / 0.0018) ** 2) - 0.5 * np.exp(-(dist / 0.004) ** 2))
      tense[palm_idx] = np.maximum(tense[palm_idx], press[k] * np.exp(-(dist / 0.05) ** 2))
    albedo[palm_idx] *= (1 + relief * on_back[palm_idx])[:, None]

  # A pressing finger tenses: the skin over its metacarpal and along the finger flushes.
  for k in range(5):
    on_finger = label == k
    tense[on_finger] = np.maximum(tense[on_finger], press[k])
  flush = PRESS_FLUSH * np.clip(tense, 0, 1) * on_back
  albedo = albedo + flush[:, None] * (PRESS_TONE - albedo)

  # Nails, whitening under a press, with a reddened rim around them.
  for k in range(5):
    idx = np.flatnonzero(label == k)
    if idx.size == 0:
      continue
    dist = np.linalg.norm(rest[idx] - rig.tips[k], axis=1)
    nail = np.clip((0.010 - dist) / 0.003, 0, 1) * np.clip(dorsal[idx] * 2 - 0.4, 0, 1)
    rim = np.exp(-((dist - 0.012) / 0.005) ** 2)
    nail_color = np.array([0.95, 0.78, 0.78]) + press[k] * np.array([0.05, 0.2, 0.2])
    albedo[idx] = albedo[idx] * (1 - nail[:, None]) + nail[:, None] * nail_color
    albedo[idx] *= 1 + press[k] * rim[:, None] * np.array([0.3, -0.3, -0.3])  # flushed tip

  # Lighting: Lambert + Blinn-Phong in the camera frame, normals from the posed mesh.
  normals = np.einsum("pk,pkc->pc", bary, render.vertex_normals(vertices_cam, faces)[tri])
  normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)
  points = np.einsum("pk,pkc->pc", bary, vertices_cam[tri])
  view = -points / np.linalg.norm(points, axis=1, keepdims=True)
  normals *= np.where(np.sum(normals * view, 1, keepdims=True) < 0, -1.0, 1.0)
  to_light = -look.light_dir
  diffuse = np.clip(normals @ to_light, 0, 1)
  half = view + to_light
  half /= np.linalg.norm(half, axis=1, keepdims=True)
  specular = 0.08 * np.clip(np.sum(normals * half, 1), 0, 1) ** 24
  color = albedo * (look.ambient + (1 - look.ambient) * diffuse)[:, None] * look.light_color
  image[mask] = np.clip(color + specular[:, None], 0, 1)


def forearm_mesh(rig: HandRig, length: float = 0.3, rings: int = 6, sides: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
  """A tapered elliptic tube from the wrist backwards (rest frame): vertices, faces."""
  j0 = rig.joints[0]
  t = np.linspace(0.012, -length, rings)
  angles = np.linspace(0, 2 * np.pi, sides, endpoint=False)
  verts = []
  for s in t:
    grow = 1.0 + 0.6 * (-min(s, 0) / length)
    for a in angles:
      verts.append(j0 + s * rig.forward + 0.027 * grow * np.cos(a) * rig.lateral
                   + 0.018 * grow * np.sin(a) * rig.dorsal - 0.004 * rig.dorsal)
  faces = []
  for r in range(rings - 1):
    for k in range(sides):
      a, b = r * sides + k, r * sides + (k + 1) % sides
      c, d = a + sides, b + sides
      faces += [(a, c, b), (b, c, d)]
  return np.asarray(verts), np.asarray(faces)


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """A desk-like surface (H, W, 3) float32 in [0, 1]: base colour, grain, a light gradient."""
  base = rng.uniform(0.25, 0.7, 3)
  grain = _smooth_noise(rng, (height, width), 2.0 + 6.0 * rng.random())
  stretch = cv2.resize(_smooth_noise(rng, (height, max(width // 8, 2)), 1.5), (width, height))
  gradient = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.2), width)[None, :]
  shade = (1 + 0.05 * grain + 0.08 * stretch) * gradient
  return np.clip(shade[..., None] * base, 0, 1).astype(np.float32)
