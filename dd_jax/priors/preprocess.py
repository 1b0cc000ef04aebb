"""HaMeR's demo preprocessing (ViTDetDataset + generate_image_patch_cv2), pixel for pixel.

From a hand box: centre and scale with the demo's rescale factor (2.0), the box grown to HaMeR's
3:4 (w:h) shape and made square, an anti-alias Gaussian blur when the crop shrinks the image
more than 2.2x, a horizontal flip for left hands, the affine crop that puts the box centre on
pixel (128, 128) of a 256x256 crop, and ImageNet normalisation. The same arithmetic in the same
dtypes as HaMeR (float32 box maths, cv2's affine and bilinear warp, a float64 blur), so crops
equal HaMeR's to float rounding (tests/test_priors.py). One speed difference, exact: HaMeR blurs
the whole image; this blurs only the window the warp reads (+ the kernel radius), placed in a
lazily zero-filled image of the full size so the warp itself is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB, of [0, 1] pixels
IMAGE_STD = (0.229, 0.224, 0.225)
BBOX_SHAPE = (192, 256)  # (w, h): the backbone's input, which the box is grown to
DEMO_RESCALE_FACTOR = 2.0  # demo.py's --rescale_factor default (2.5 is only the class default)
ANTIALIAS_THRESHOLD = 1.1  # blur when side / 256 / 2 exceeds this
BLUR_TRUNCATE = 4.0  # skimage.filters.gaussian -> scipy.ndimage.gaussian_filter's default


@dataclasses.dataclass(frozen=True)
class CropBox:
  """Where HaMeR crops: the box centre (un-mirrored, full-image pixels, float32), the side of
  the square crop (float32, HaMeR's `box_size`) and the hand side."""
  center: np.ndarray  # (2,) float32
  size: np.float32
  is_right: bool


def expand_to_aspect_ratio(width: np.float32, height: np.float32,
                           aspect: tuple[int, int] = BBOX_SHAPE) -> tuple[np.float32, np.float32]:
  """The box grown (never shrunk) to aspect (w, h), in float32 as HaMeR computes it."""
  w_t, h_t = aspect
  if height / width < h_t / w_t:
    return width, max(width * h_t / w_t, height)
  return max(height * w_t / h_t, width), height


def crop_box(box, is_right: bool, rescale_factor: float = DEMO_RESCALE_FACTOR) -> CropBox:
  """A hand box (x0, y0, x1, y1) in pixels -> HaMeR's crop: centre = box centre, side =
  max(r h, r w 4/3) for rescale factor r (the box grown to 3:4, then the longer side)."""
  box = np.asarray(box, np.float32).reshape(4)
  if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
    raise ValueError(f"hand box {box.tolist()}: expected finite (x0, y0, x1, y1) with x1 > x0 "
                     "and y1 > y0")
  center = (box[2:4] + box[0:2]) / 2.0
  scale = rescale_factor * (box[2:4] - box[0:2]) / 200.0
  width, height = scale * 200
  size = max(expand_to_aspect_ratio(width, height))
  return CropBox(center=center, size=np.float32(size), is_right=bool(is_right))


def affine_matrix(center_x: np.float32, center_y: np.float32, size: np.float32,
                  image_size: int) -> np.ndarray:
  """cv2's 2x3 transform taking the box centre to pixel (S/2, S/2) and the box's half side to
  S/2 (gen_trans_from_patch_cv with scale 1 and no rotation): the centre lands on pixel 128,
  not 127.5."""
  src = np.zeros((3, 2), np.float32)
  src[0] = (center_x, center_y)
  src[1] = src[0] + np.array([0, size * 0.5], np.float32)
  src[2] = src[0] + np.array([size * 0.5, 0], np.float32)
  half = image_size * 0.5
  dst = np.array([[half, half], [half, image_size], [image_size, half]], np.float32)
  return cv2.getAffineTransform(src, dst)


def blur_sigma(size: np.float32, image_size: int) -> float | None:
  """The anti-alias sigma HaMeR uses for a crop of side `size`, or None (no blur)."""
  factor = (size * 1.0) / image_size / 2.0
  return float((factor - 1) / 2) if factor > ANTIALIAS_THRESHOLD else None


def _source_window(matrix: np.ndarray, image_size: int, width: int, height: int, margin: int
                   ) -> tuple[int, int, int, int]:
  """The (x0, x1, y0, y1) part of the source a warp to image_size reads, grown by `margin`."""
  inverse = cv2.invertAffineTransform(matrix)
  corners = np.array([[-1, -1, 1], [image_size + 1, -1, 1], [-1, image_size + 1, 1],
                      [image_size + 1, image_size + 1, 1]], np.float64)
  points = corners @ inverse.T
  pad = margin + 2
  x0 = int(np.clip(math.floor(points[:, 0].min()) - pad, 0, width))
  x1 = int(np.clip(math.ceil(points[:, 0].max()) + pad + 1, 0, width))
  y0 = int(np.clip(math.floor(points[:, 1].min()) - pad, 0, height))
  y1 = int(np.clip(math.ceil(points[:, 1].max()) + pad + 1, 0, height))
  return x0, x1, y0, y1


def crop_pixels(image: np.ndarray, box: CropBox, image_size: int = 256) -> np.ndarray:
  """The crop before normalisation: (S, S, C) uint8 without blur (cv2 rounds), float64 with
  it, exactly as HaMeR's warp of its (flipped, blurred) image. `image` (H, W, C) uint8."""
  height, width = image.shape[:2]
  center_x, center_y = box.center[0], box.center[1]
  flip = not box.is_right
  if flip:  # generate_image_patch_cv2: mirror the image and the centre
    center_x = width - center_x - 1
  matrix = affine_matrix(center_x, center_y, box.size, image_size)
  sigma = blur_sigma(box.size, image_size)
  radius = int(BLUR_TRUNCATE * sigma + 0.5) if sigma is not None else 0
  x0, x1, y0, y1 = _source_window(matrix, image_size, width, height, radius)
  # Coordinates above are in the (possibly mirrored) frame; mirrored column x is width-1-x.
  window = image[y0:y1, width - x1:width - x0][:, ::-1] if flip else image[y0:y1, x0:x1]
  if sigma is not None:
    window = cv2.GaussianBlur(np.ascontiguousarray(window, np.float64),
                              (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                              borderType=cv2.BORDER_REPLICATE)
  # np.zeros maps zero pages lazily: only the window's pages are ever written or read.
  source = np.zeros(image.shape, window.dtype)
  source[y0:y1, x0:x1] = window
  return cv2.warpAffine(source, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def normalize(crop: np.ndarray) -> np.ndarray:
  """(S, S, 3) RGB crop -> float32 (x - 255 mean) / (255 std), through float32 first as HaMeR
  (convert_cvimg_to_tensor) and the subtraction in float64."""
  pixels = crop.astype(np.float32).astype(np.float64)
  mean = 255.0 * np.asarray(IMAGE_MEAN)
  std = 255.0 * np.asarray(IMAGE_STD)
  return ((pixels - mean) / std).astype(np.float32)


def hamer_input(image_rgb: np.ndarray, box: CropBox, image_size: int = 256) -> np.ndarray:
  """An RGB uint8 image and a CropBox -> HaMeR's network input (S, S, 3) float32 NHWC."""
  if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} "
                     f"{image_rgb.dtype}")
  return normalize(crop_pixels(image_rgb, box, image_size))
