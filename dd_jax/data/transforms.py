"""Image transforms of the input pipeline: train augmentation, resize, ImageNet normalisation.

Same operations as the released torchvision pipeline (SPEC.md §4), in OpenCV/numpy on whole
arrays: ColorJitter(brightness 0.1, contrast 0.1, random order), gamma 1 +- 0.1, Gaussian noise
(std 0.007, clipped to [0, 1]), Gaussian blur (kernel 5, sigma U(0.1, 1)), then an antialiased
resize to a square and (x - mean) / std. The pointwise steps and the normalisation are folded
into one lookup table on the uint8 image (the contrast mean comes exactly from the image's
histograms); noise, clip, blur and resize then work in normalised units.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64)
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114])  # torchvision rgb_to_grayscale
_LEVELS = np.arange(256, dtype=np.float64) / 255.0
_NORMALISE_LUT = np.ascontiguousarray(
    ((_LEVELS[:, None] - IMAGENET_MEAN) / IMAGENET_STD)[None].astype(np.float32))  # (1, 256, 3)
_SCALE = (1.0 / IMAGENET_STD).astype(np.float32)
_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
_LOW = tuple(float(v) for v in -IMAGENET_MEAN / IMAGENET_STD) + (0.0,)  # cv2 Scalars
_HIGH = tuple(float(v) for v in (1 - IMAGENET_MEAN) / IMAGENET_STD) + (0.0,)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  brightness: float = 0.1
  contrast: float = 0.1
  gamma: float = 0.1
  noise_std: float = 0.007
  blur_kernel: int = 5
  blur_sigma: tuple[float, float] = (0.1, 1.0)


def _histograms(image: np.ndarray) -> np.ndarray:
  """(3, 256) per-channel pixel counts of a uint8 RGB image."""
  return np.stack([cv2.calcHist([image], [c], None, [256], [0, 256]).reshape(256) for c in range(3)])


@dataclasses.dataclass(frozen=True)
class AugmentDraw:
  """One image's random augmentation parameters (drawn by `draw_augment`)."""
  brightness: float
  contrast: float
  brightness_first: bool  # ColorJitter's random order of the two
  gamma: float
  noise_seed: int | None  # OpenCV's RNG seed for the noise (None: no noise)
  blur_sigma: float


def draw_augment(rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> AugmentDraw:
  """The parameters of one image's augmentation, in the order the pipeline has always drawn them."""
  b = rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness)
  c = rng.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast)
  brightness_first = bool(rng.random() < 0.5)
  gamma = 1.0 + rng.uniform(-config.gamma, config.gamma)
  noise_seed = int(rng.integers(0, 2**31 - 1)) if config.noise_std > 0 else None
  return AugmentDraw(b, c, brightness_first, gamma, noise_seed, rng.uniform(*config.blur_sigma))


def color_lut(image: np.ndarray, draw: AugmentDraw) -> np.ndarray:
  """The (3, 256) float table of brightness, contrast (in the drawn order) and gamma for `image`."""
  b, c = draw.brightness, draw.contrast
  lut = np.broadcast_to(_LEVELS, (3, 256))
  counts = None

  def contrast(lut):
    nonlocal counts
    if counts is None:
      counts = _histograms(image)
    mean = float(np.sum(GRAY_WEIGHTS[:, None] * counts * lut) / counts[0].sum())
    return np.clip(c * lut + (1.0 - c) * mean, 0.0, 1.0)

  def brightness(lut):
    return np.clip(b * lut, 0.0, 1.0)

  for op in ((brightness, contrast) if draw.brightness_first else (contrast, brightness)):
    lut = op(lut)
  return lut ** draw.gamma


def noise_field(shape: tuple[int, ...], draw: AugmentDraw, config: AugmentConfig) -> np.ndarray:
  """The drawn Gaussian noise in normalised units, float32 `shape` (H, W, 3)."""
  # cv2.randn is ~3x faster than numpy's normals; its per-thread RNG is seeded from the draw
  # right before use, so the noise stays a deterministic function of the element's rng.
  noise = np.empty(shape, np.float32)
  cv2.setRNGSeed(draw.noise_seed)
  cv2.randn(noise, (0.0, 0.0, 0.0), tuple(float(v) for v in config.noise_std / IMAGENET_STD))
  return noise


def augment(image: np.ndarray, rng: np.random.Generator,
            config: AugmentConfig = AugmentConfig()) -> np.ndarray:
  """uint8 (H, W, 3) RGB -> augmented, ImageNet-normalised float32 (H, W, 3)."""
  return apply_augment(image, draw_augment(rng, config), config)


def apply_augment(image: np.ndarray, draw: AugmentDraw,
                  config: AugmentConfig = AugmentConfig()) -> np.ndarray:
  """`augment` with given parameters.

  The normalisation (x - mean) / std is folded into the lookup table, and the noise, the
  [0, 1] clip and the blur are done in normalised units (the blur and the later resize are
  linear, so they commute with the per-channel affine map): the result equals augmenting in
  [0, 1] and normalising afterwards, with two fewer passes over the image.
  """
  lut = (color_lut(image, draw).T - IMAGENET_MEAN) / IMAGENET_STD  # (256, 3)
  out = cv2.LUT(image, np.ascontiguousarray(lut[None].astype(np.float32)))
  if draw.noise_seed is not None:
    cv2.add(out, noise_field(out.shape, draw, config), dst=out)
    cv2.max(out, _LOW, dst=out)  # the clip to [0, 1] before normalisation
    cv2.min(out, _HIGH, dst=out)
  sigma, k = draw.blur_sigma, config.blur_kernel
  return cv2.GaussianBlur(out, (k, k), sigmaX=sigma, sigmaY=sigma,
                          borderType=cv2.BORDER_REFLECT_101)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased resize to (size, size) (area averaging when shrinking, bilinear otherwise)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
  """(size, size, 3) float32 ImageNet-normalised model input.

  `image` is uint8 RGB (eval: resized, then normalised through a lookup table) or the float32
  output of `augment`, which is already normalised (train: only resized).
  """
  image = resize_square(image, size)
  if image.dtype == np.uint8:
    return cv2.LUT(image, _NORMALISE_LUT)
  return np.asarray(image, np.float32)


def normalise(image: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] (float) -> (x - mean) / std, float32."""
  return np.asarray(image, np.float32) * _SCALE + _OFFSET


def denormalise(image: np.ndarray) -> np.ndarray:
  """Inverse of the normalisation, for pictures: (..., 3) float -> uint8 RGB (uint8 images,
  data.augment_on_device's batches, are returned as they are)."""
  if image.dtype == np.uint8:
    return image
  x = np.asarray(image, np.float64) * IMAGENET_STD + IMAGENET_MEAN
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
