"""Augmentation and normalisation on the accelerator (data.augment_on_device).

The host then only decodes, crops and resizes, and sends uint8 images (a quarter of the float32
bytes); inside the jitted steps `model_inputs` turns them into the network's float32 inputs:
brightness and contrast jitter in random order, gamma, Gaussian noise with the [0, 1] clip and
the Gaussian blur (the host path's operations, dd_jax/data/transforms.py, SPEC.md §4), then the
ImageNet normalisation. Each image's parameters come from its own key, split from the step's key
by its position in the GLOBAL batch, so the augmented batch is the same whatever the number of
devices or processes it is spread over.

Unlike the host path, which augments the decoded crop before resizing it, this augments the
resized image (noise and blur act at the training resolution); with crops packed at the
training size (tools/pack_array_record.py --image_size) the two paths are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dd_jax.data.transforms import GRAY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

_MEAN = tuple(float(v) for v in IMAGENET_MEAN)
_STD = tuple(float(v) for v in IMAGENET_STD)
_GRAY = tuple(float(v) for v in GRAY_WEIGHTS)
_AUGMENT_STREAM = 0x5A17  # folds the step key into the augmentation's own stream


def enabled(data_config) -> bool:
  """data.augment_on_device, where unset (None): on for GPU / TPU, off on CPU."""
  value = data_config.get("augment_on_device", None)
  return jax.default_backend() != "cpu" if value is None else bool(value)


def draw(key: jax.Array, config: AugmentConfig = AugmentConfig()) -> dict[str, jax.Array]:
  """One image's parameters (the host's `draw_augment`, from a JAX key): scalars."""
  keys = jax.random.split(key, 5)
  uniform = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)
  return {"brightness": uniform(keys[0], max(0.0, 1 - config.brightness), 1 + config.brightness),
          "contrast": uniform(keys[1], max(0.0, 1 - config.contrast), 1 + config.contrast),
          "brightness_first": jax.random.uniform(keys[2], ()) < 0.5,
          "gamma": 1.0 + uniform(keys[3], -config.gamma, config.gamma),
          "blur_sigma": uniform(keys[4], *config.blur_sigma)}


def color(image: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
  """Brightness, contrast (the drawn order) and gamma of one uint8 image, (H, W, 3) -> [0, 1].

  The contrast's grayscale mean is computed from integer sums (exact, so the same whatever
  the batch's sharding; a float reduction's rounding depends on how XLA splits it): before
  the brightness it is the mean of the image; after it, the unclipped pixels scale by b and
  the clipped ones count 1.
  """
  x = image.astype(jnp.float32) / 255.0
  b, c = params["brightness"], params["contrast"]
  n = image.shape[0] * image.shape[1]
  gray = jnp.asarray(_GRAY, jnp.float32)
  bright = b * x
  clipped = bright >= 1.0
  # uint32: sums of up to 16.8M uint8 pixels are exact.
  channel_sums = jnp.sum(image, axis=(0, 1), dtype=jnp.uint32).astype(jnp.float32)
  unclipped_sums = jnp.sum(jnp.where(clipped, 0, image), axis=(0, 1), dtype=jnp.uint32)
  clipped_counts = jnp.sum(clipped, axis=(0, 1), dtype=jnp.uint32).astype(jnp.float32)
  mean_before = jnp.sum(gray * channel_sums) / (255.0 * n)
  mean_after = jnp.sum(gray * (b * unclipped_sums.astype(jnp.float32) / 255.0 + clipped_counts)) / n
  bright = jnp.clip(bright, 0.0, 1.0)
  contrast = lambda x, mean: jnp.clip(c * x + (1.0 - c) * mean, 0.0, 1.0)
  x = jnp.where(params["brightness_first"], contrast(bright, mean_after),
                jnp.clip(b * contrast(x, mean_before), 0.0, 1.0))
  return x ** params["gamma"]


def blur(x: jax.Array, sigma: jax.Array, kernel: int) -> jax.Array:
  """OpenCV's GaussianBlur (kernel x kernel, REFLECT_101 borders) of one (H, W, C) image."""
  if kernel == 1:
    return x
  r = kernel // 2
  offsets = jnp.arange(-r, r + 1, dtype=jnp.float32)
  taps = jnp.exp(-offsets ** 2 / (2 * sigma ** 2))
  taps = taps / jnp.sum(taps)
  h, w = x.shape[:2]
  padded = jnp.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")  # numpy's reflect = REFLECT_101
  x = sum(taps[i] * padded[i:i + h] for i in range(kernel))
  padded = jnp.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(taps[i] * padded[:, i:i + w] for i in range(kernel))


def normalise(x: jax.Array) -> jax.Array:
  """[0, 1] RGB -> (x - mean) / std."""
  return (x - jnp.asarray(_MEAN, x.dtype)) / jnp.asarray(_STD, x.dtype)


def apply(image: jax.Array, params: dict[str, jax.Array], noise: jax.Array | None,
          config: AugmentConfig = AugmentConfig()) -> jax.Array:
  """uint8 (H, W, 3) -> augmented, normalised float32, with given parameters and noise
  ([0, 1] units, (H, W, 3); None: no noise), the host's `apply_augment`."""
  x = color(image, params)
  if noise is not None:
    x = jnp.clip(x + noise, 0.0, 1.0)
  return normalise(blur(x, params["blur_sigma"], config.blur_kernel))


def augment(key: jax.Array, image: jax.Array, config: AugmentConfig = AugmentConfig()
            ) -> jax.Array:
  """uint8 (H, W, 3) -> augmented, ImageNet-normalised float32 (H, W, 3), drawn from `key`."""
  params_key, noise_key = jax.random.split(key)
  noise = None
  if config.noise_std > 0:
    noise = config.noise_std * jax.random.normal(noise_key, image.shape, jnp.float32)
  return apply(image, draw(params_key, config), noise, config)


def image_keys(key: jax.Array, batch_size: int) -> jax.Array:
  """(B, 2) keys of a batch's images (frame, base) from the step's augmentation key: one per
  image by its place in the global batch, so independent of the sharding and of how the batch is
  split into micro-batches."""
  return jax.random.split(jax.random.fold_in(key, _AUGMENT_STREAM), (batch_size, 2))


def model_inputs(batch: dict[str, jax.Array], keys: jax.Array | None = None,
                 config: AugmentConfig | None = None) -> dict[str, jax.Array]:
  """A batch as the network takes it: uint8 img / base_img (B, S, S, 3) become float32,
  augmented (with `config` and the images' `keys`, `image_keys`: the train step) and
  normalised; float32 images (the host path's) pass unchanged. Masked samples (valid False) get
  zero images, as on the host."""
  if batch["img"].dtype != jnp.uint8:
    return batch
  images = jnp.stack([batch["img"], batch["base_img"]], axis=1)  # (B, 2, S, S, 3)
  if config is None:
    out = normalise(images.astype(jnp.float32) / 255.0)
  else:
    out = jax.vmap(jax.vmap(lambda k, x: augment(k, x, config)))(keys, images)
  out = jnp.where(batch["valid"][:, None, None, None, None], out, 0.0)
  return dict(batch, img=out[:, 0], base_img=out[:, 1])
