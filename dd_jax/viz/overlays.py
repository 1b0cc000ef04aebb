"""Pictures of one prediction: the predicted hand over its input image, or beside it.

The network predicts a finger pose only (no global orientation, no camera), so a hand can be
put on the image only through a HaMeR prior's 2D keypoints; otherwise it is drawn in a fixed
canonical view of the back of the hand next to the image.
"""

from __future__ import annotations

import cv2
import numpy as np

from dd_jax.data import align
from dd_jax.viz import draw, pictures

MIN_SIDE = 384  # small network-sized crops are enlarged so the drawing stays legible
PRIOR_COLOR = pictures.PRIOR_COLOR
MESH_COLOR = (150, 200, 150)
# Light travelling into the scene (+z) from the upper left; render_mesh's default comes from
# behind the hand and leaves camera-facing triangles at the ambient level.


def _affine_render(background: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                   camera: np.ndarray) -> np.ndarray:
  """Mesh (V, 3) drawn with a (2, 4) affine camera: an orthographic view, z-buffered.

  The depth axis is the normal of the camera's two rows; a pinhole camera far away
  (K = diag(C, C, 1), vertices (u Z / C, v Z / C, Z)) reproduces the affine pixels exactly,
  so draw.render_mesh can shade and z-buffer it.
  """
  height, width = background.shape[:2]
  homogeneous = np.concatenate([vertices, np.ones((len(vertices), 1))], 1)
  uv = homogeneous @ camera.T
  normal = np.cross(camera[0, :3], camera[1, :3])
  scale = np.sqrt(np.linalg.norm(normal)) + 1e-12
  depth = vertices @ (normal / (scale * scale)) * scale  # pixels, + away from the viewer
  far = 1e4 * max(width, height)
  z = far + depth - depth.min() + 1.0
  camera_points = np.stack([uv[:, 0] * z / far, uv[:, 1] * z / far, z], 1)
  K = np.diag([far, far, 1.0])
  return draw.render_mesh(camera_points, faces, K, (width, height), background=background,
                            color=MESH_COLOR, alpha=0.55)


def _project(camera: np.ndarray, points: np.ndarray) -> np.ndarray:
  return np.concatenate([points, np.ones((len(points), 1))], 1) @ camera.T


def _enlarged(image: np.ndarray) -> tuple[np.ndarray, float]:
  scale = max(1.0, MIN_SIDE / max(image.shape[:2]))
  if scale == 1.0:
    return image.copy(), 1.0
  size = (int(round(image.shape[1] * scale)), int(round(image.shape[0] * scale)))
  return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), scale


def _scale_pixels(points: np.ndarray, scale: float) -> np.ndarray:
  return (points + 0.5) * scale - 0.5  # pixel centres at integer coordinates


def _label(picture: np.ndarray, text: str, row: int = 0) -> None:
  """White text on a dark band, in place; `row` counts lines from the top."""
  font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
  (w, h), baseline = cv2.getTextSize(text, font, scale, 1)
  y = 6 + (h + baseline + 4) * row
  picture[y:y + h + baseline + 4, 2:min(w + 10, picture.shape[1])] //= 3
  cv2.putText(picture, text, (6, y + h + 2), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def canonical_camera(keypoints: np.ndarray, size: int) -> np.ndarray:
  """(2, 4) camera looking at the back of a right hand, fingers up, filling a size^2 panel.

  Axes from the palm keypoints (wrist 0, index / middle / pinky knuckles 5, 9, 17), which the
  finger pose does not move: forward = wrist -> middle knuckle, lateral = pinky -> index
  knuckle, dorsal = forward x lateral.
  """
  forward = keypoints[9] - keypoints[0]
  forward /= np.linalg.norm(forward)
  lateral = keypoints[5] - keypoints[17]
  lateral -= forward * (lateral @ forward)
  lateral /= np.linalg.norm(lateral)
  # Image x towards the pinky (thumb on the left), image y towards the wrist: the view axis
  # x cross y = -dorsal looks at the back of the hand.
  rows = np.stack([-lateral, -forward])
  centre = keypoints.mean(0)
  extent = np.abs((keypoints - centre) @ rows.T).max() + 1e-6
  scale = 0.42 * size / extent
  camera = np.zeros((2, 4))
  camera[:, :3] = scale * rows
  camera[:, 3] = size / 2 - scale * rows @ centre
  return camera


def pose_overlay(image: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                 keypoints: np.ndarray, *, prior_keypoints_3d: np.ndarray | None = None,
                 prior_keypoints_2d: np.ndarray | None = None) -> tuple[np.ndarray, str]:
  """[image | predicted hand] as uint8 RGB, and a sentence saying how the hand was placed.

  image: uint8 RGB (H, W, 3). vertices (778, 3), keypoints (21, 3): the prediction in MANO's
  frame (zero global orientation). prior_keypoints_3d (21, 3): the prior pose's keypoints in
  the same frame (same betas); prior_keypoints_2d (21, 2): the prior file's pixels.
  With both, and when `align.place_prior_keypoints` can place the 2D keypoints on this image, a
  least-squares affine camera from the prior's 3D to its 2D keypoints (pictures.fit_affine_camera)
  draws the predicted mesh and skeleton over the image (prior keypoints in red). Otherwise the
  prediction (and the prior, red) is drawn in `canonical_camera`'s view beside the image.
  """
  big, scale = _enlarged(image)
  height, width = image.shape[:2]
  placed, how = (align.place_prior_keypoints(prior_keypoints_2d, width, height)
                 if prior_keypoints_3d is not None else (None, "no prior pose"))
  if placed is not None:
    placed = _scale_pixels(placed, scale)
    camera = pictures.fit_affine_camera(np.asarray(prior_keypoints_3d, np.float64), placed)
    overlay = _affine_render(big, np.asarray(vertices, np.float64), faces, camera)
    overlay = draw.draw_hand_keypoints(overlay, placed, PRIOR_COLOR, radius=1)
    overlay = draw.draw_hand_keypoints(overlay, _project(camera, keypoints), radius=3,
                                         thickness=2)
    _label(overlay, "prediction (mesh, coloured); prior (red)")
    _label(overlay, f"placed by {how}", 1)
    return np.concatenate([big, overlay], 1), how
  size = big.shape[0]
  camera = canonical_camera(np.asarray(keypoints, np.float64), size)
  panel = np.full((size, size, 3), 40, np.uint8)
  panel = _affine_render(panel, np.asarray(vertices, np.float64), faces, camera)
  if prior_keypoints_3d is not None:
    panel = draw.draw_hand_keypoints(panel, _project(camera, prior_keypoints_3d), PRIOR_COLOR,
                                       radius=1)
  panel = draw.draw_hand_keypoints(panel, _project(camera, keypoints), radius=3, thickness=2)
  _label(panel, "canonical view: back of the hand")
  _label(panel, f"(not placed: {how})", 1)
  how = f"canonical view beside the image ({how})"
  return np.concatenate([big, panel], 1), how


def force_overlay(image: np.ndarray, lines: list[str]) -> np.ndarray:
  """The image (enlarged if small) with the predicted class written on it."""
  big, _ = _enlarged(image)
  for row, text in enumerate(lines):
    _label(big, text, row)
  return big


# ------------------------------------------------------------------------------ full frames

_RAW_TO_UNDISTORTED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _raw_to_undistorted(K: np.ndarray, d: np.ndarray, width: int, height: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """For every raw (distorted) pixel, where it lies in the undistorted image (cv2.remap maps)."""
  key = (K.tobytes(), d.tobytes(), width, height)
  if key not in _RAW_TO_UNDISTORTED:
    if len(_RAW_TO_UNDISTORTED) > 4:
      _RAW_TO_UNDISTORTED.pop(next(iter(_RAW_TO_UNDISTORTED)))
    grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).reshape(-1, 1, 2)
    ideal = cv2.undistortPoints(grid.astype(np.float64), K, d, P=K).reshape(height, width, 2)
    _RAW_TO_UNDISTORTED[key] = (ideal[..., 0].astype(np.float32),
                                ideal[..., 1].astype(np.float32))
  return _RAW_TO_UNDISTORTED[key]


def full_frame_overlay(frame: np.ndarray, lines: list[str], *, keypoints_2d=None,
                       prior_keypoints_2d=None, vertices_cam=None, faces=None,
                       focal: float | None = None, K=None, d=None) -> np.ndarray:
  """The raw frame (uint8 RGB) with the prediction drawn where it is: the predicted mesh
  (vertices_cam (778, 3) in the readers' camera frame: focal `focal`, principal point at the
  centre; rendered in the undistorted image, then carried into the raw frame through the lens
  model K, d), the predicted skeleton (keypoints_2d (21, 2), raw pixels, coloured by finger),
  the prior's skeleton (red) and `lines` of text."""
  height, width = frame.shape[:2]
  out = np.ascontiguousarray(frame.copy())
  if vertices_cam is not None and focal is not None:
    pinhole = np.array([[focal, 0, width / 2.0], [0, focal, height / 2.0], [0, 0, 1]])
    layer = draw.render_mesh(np.asarray(vertices_cam, np.float64), faces, pinhole,
                             (width, height), color=MESH_COLOR)
    mask = np.any(layer > 0, axis=-1).astype(np.float32)
    if K is not None and d is not None and np.any(d):
      maps = _raw_to_undistorted(np.asarray(K, np.float64), np.asarray(d, np.float64), width,
                                 height)
      layer = cv2.remap(layer, *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
      mask = cv2.remap(mask, *maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = 0.55 * mask[..., None]
    out = np.clip(np.rint(alpha * layer + (1 - alpha) * out), 0, 255).astype(np.uint8)
  if prior_keypoints_2d is not None:
    out = draw.draw_hand_keypoints(out, prior_keypoints_2d, PRIOR_COLOR, radius=1)
  if keypoints_2d is not None:
    out = draw.draw_hand_keypoints(out, keypoints_2d, radius=2, thickness=2)
  for row, text in enumerate(lines):
    _label(out, text, row)
  return out
