"""Inference: a trained DeltaDorsal pose or force network applied to image arrays.

`load(path)` puts a dd_jax run (its best checkpoint), one checkpoint step, or a converted original
DeltaDorsal checkpoint on one device; a `Predictor` turns (image, base image[, HaMeR prior])
into a finger pose and 21 keypoints, or a press class, preprocessing as the evaluation does.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dd_jax import checkpointing, losses, optim
from dd_jax.data import store, transforms
from dd_jax.data.egodorsal import MOTION_LABELS
from dd_jax.mano import io as mano_io
from dd_jax.mano import model as mano_model
from dd_jax.models import deltadorsal

FORCE_CLASS_NAMES = ("no_press",) + tuple(sorted(MOTION_LABELS, key=MOTION_LABELS.get))
SYNTHETIC_MANO = "synthetic MANO-format hand (config.mano.path is empty): NOT the official MANO"


class PriorRequiredError(ValueError):
  """A pose model trained with use_prior was called without a HaMeR prior pose."""


# ------------------------------------------------------------------------------ the predictor


@dataclasses.dataclass
class Predictor:
  """A network on one device, jit-compiled once per batch size (inputs are resized to
  `image_size` first, so the image size never causes a recompile)."""
  config: ml_collections.ConfigDict
  source: str  # what was loaded: checkpoint step folder or converted folder
  graphdef: nnx.GraphDef
  states: tuple[nnx.State, ...]  # (trainable, frozen): arguments of the compiled call
  mano: mano_model.ManoModel | None  # pose only
  mano_source: str | None  # MANO path or SYNTHETIC_MANO

  def __post_init__(self):
    graphdef = self.graphdef
    if self.task == "pose":
      def network(states, img, base_img, prior):
        return nnx.merge(graphdef, *states)(img, base_img, prior)["theta"]
    else:
      def network(states, img, base_img, prior):
        del prior
        return nnx.merge(graphdef, *states)(img, base_img)
    self._network = jax.jit(network)
    self._keypoints = jax.jit(losses.pose_keypoints)
    self._mesh = jax.jit(_mano_mesh)

  @property
  def task(self) -> str:
    return self.config.task

  @property
  def image_size(self) -> int:
    return int(self.config.data.out_img_size)

  @property
  def uses_prior(self) -> bool:
    """Whether the network takes the HaMeR pose as input (pose models with head.use_prior)."""
    return self.task == "pose" and bool(self.config.model.head.use_prior)

  # ---------------------------------------------------------------------------- preprocessing

  def preprocess(self, images: Sequence[np.ndarray], what: str = "image") -> np.ndarray:
    """uint8 RGB (H, W, 3) arrays of any size -> (B, S, S, 3) float32 network input.

    The evaluation pipeline's own transform (antialiased square resize, ImageNet normalisation).
    """
    return np.stack([transforms.to_model_input(_check_image(x, f"{what} {i}"), self.image_size)
                     for i, x in enumerate(images)])

  # ---------------------------------------------------------------------------- the calls

  def __call__(self, image: np.ndarray, base_image: np.ndarray, prior=None, *,
               betas: np.ndarray | None = None) -> dict[str, Any]:
    """One pair -> pose: {pose (45,), keypoints (21, 3), betas (10,), forward_ms};
    force: {label, probabilities (n_classes,), logits, forward_ms} (per group if out_dim > 1).

    prior: None, a HaMeR .npy dict, a store.Prior, or a (45,) axis-angle / (15, 3, 3) pose.
    betas: (10,) shape; default the prior's betas, else zeros (see `predict_batch`).
    """
    out = self.predict_batch([image], [base_image], None if prior is None else [prior],
                             betas=None if betas is None else [betas])
    return {k: v if k == "forward_ms" else v[0] for k, v in out.items()}

  def predict_batch(self, images: Sequence[np.ndarray], base_images: Sequence[np.ndarray],
                    priors: Sequence[Any] | None = None, *,
                    betas: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """B pairs -> stacked outputs: pose (B, 45), keypoints (B, 21, 3), betas (B, 10) or
    label (B,) / (B, out_dim), probabilities (B, [out_dim,] n_classes); forward_ms (the
    network call for the whole batch, blocking; includes compilation on a new batch size).

    Keypoints are MANO's 21 OpenPose keypoints in metres computed as the trainer does:
    right hand, flat hand mean, zero global orientation and translation, shape `betas`
    (the trainer uses the BASE image's HaMeR betas[0]): subtract keypoints[:, :1] for
    wrist-relative coordinates.
    """
    if len(images) != len(base_images):
      raise ValueError(f"{len(images)} images but {len(base_images)} base images")
    n = len(images)
    if n == 0:
      raise ValueError("predict_batch needs at least one image pair")
    parsed = [None] * n if priors is None else [parse_prior(p, f"prior {i}")
                                                for i, p in enumerate(priors)]
    if len(parsed) != n:
      raise ValueError(f"{n} image pairs but {len(parsed)} priors")
    prior_pose = np.zeros((n, 45), np.float32)
    for i, p in enumerate(parsed):
      if p is not None and p.hand_pose is not None:
        prior_pose[i] = p.hand_pose
      elif self.uses_prior:
        raise PriorRequiredError(
            f"pair {i}: this pose model was trained with model.head.use_prior=True and needs the "
            "frame's HaMeR prior (a .npy dict with 'hand_pose'); none was given")
    img = self.preprocess(images, "image")
    base_img = self.preprocess(base_images, "base image")
    raw, forward_ms = self.forward(img, base_img, prior_pose)
    if self.task == "force":
      logits = np.asarray(raw, np.float32)
      probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
      label = np.argmax(logits, -1)
      squeeze = (lambda x: x[:, 0]) if logits.shape[1] == 1 else (lambda x: x)
      return {"label": squeeze(label), "probabilities": squeeze(probabilities),
              "logits": squeeze(logits), "forward_ms": forward_ms}
    shape = np.zeros((n, 10), np.float32)
    for i, p in enumerate(parsed):
      if betas is not None:
        shape[i] = _vector(betas[i], 10, f"betas {i}")
      elif p is not None and p.betas is not None:
        shape[i] = p.betas
    pose = np.asarray(raw, np.float32)
    keypoints = np.asarray(self.keypoints(pose, shape))
    return {"pose": pose, "keypoints": keypoints, "betas": shape, "forward_ms": forward_ms}

  def forward(self, img: np.ndarray, base_img: np.ndarray, prior_pose: np.ndarray
              ) -> tuple[jax.Array, float]:
    """Preprocessed (B, S, S, 3) inputs [+ (B, 45) prior] -> (theta or logits, wall ms)."""
    start = time.perf_counter()
    out = jax.block_until_ready(self._network(self.states, img, base_img, prior_pose))
    return out, 1000.0 * (time.perf_counter() - start)

  def warm_up(self, batch_size: int = 1) -> float:
    """Compiles the network for `batch_size` pairs; returns the seconds it took."""
    zeros = np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32)
    _, ms = self.forward(zeros, zeros, np.zeros((batch_size, 45), np.float32))
    if self.mano is not None:
      self.keypoints(np.zeros((batch_size, 45), np.float32), np.zeros((batch_size, 10), np.float32))
    return ms / 1000.0

  def keypoints(self, pose: np.ndarray, betas: np.ndarray) -> jax.Array:
    """(B, 45) axis-angle, (B, 10) betas -> (B, 21, 3) keypoints (losses.pose_keypoints)."""
    return self._keypoints(self.mano, jnp.asarray(pose, jnp.float32),
                           jnp.asarray(betas, jnp.float32))

  def hand_mesh(self, pose: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 45), (B, 10) -> vertices (B, 778, 3) in the keypoints' frame, faces (F, 3)."""
    vertices = self._mesh(self.mano, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
    return np.asarray(vertices), np.asarray(self.mano.faces)


def _mano_mesh(mano, pose, betas):
  zeros = jnp.zeros((pose.shape[0], 3), pose.dtype)
  return mano_model.mano_forward(mano, betas, pose, global_orient=zeros, transl=zeros,
                                 flat_hand_mean=True).vertices


def _check_image(image: Any, what: str) -> np.ndarray:
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
      or image.shape[2] != 3 or min(image.shape[:2]) < 2:
    got = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
           else type(image).__name__)
    raise ValueError(f"{what}: expected a uint8 RGB array (H, W, 3), got {got}")
  return image


def _vector(value: Any, size: int, what: str) -> np.ndarray:
  array = np.asarray(value, np.float32).reshape(-1)
  if array.size != size or not np.all(np.isfinite(array)):
    raise ValueError(f"{what}: expected {size} finite numbers, got shape {np.shape(value)}")
  return array


def parse_prior(prior: Any, what: str) -> store.Prior | None:
  """A HaMeR dict / store.Prior / (45,) or (15, 3, 3) pose / None -> store.Prior or None."""
  if prior is None or isinstance(prior, store.Prior):
    return prior
  if isinstance(prior, dict):
    return store.parse_prior(prior, what, None)
  try:
    pose = store.pose_to_axis_angle(np.asarray(prior, np.float64), what)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what}: not a HaMeR dict nor a pose ({e})") from None
  return store.Prior(hand_pose=pose, betas=None, keypoints_3d=None, cam_t=None)


# ------------------------------------------------------------------------------ files


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 RGB (H, W, 3); errors (store.FrameLoadError) name the file."""
  return store.decode_image(store.read_file(path, None, "image"), path, None)


def read_prior(path: str) -> store.Prior:
  """A HaMeR .npy dict, loaded without running code; bad files raise FrameLoadError naming it."""
  return store.parse_prior(store.load_npy_dict(path, None), path, None)


# ------------------------------------------------------------------------------ loading


def load(path: str, *, config: ml_collections.ConfigDict | None = None, step: int | None = None,
         mano_path: str | None = None, image_size: int | None = None,
         backbone_dtype: str | None = None) -> Predictor:
  """A Predictor from a dd_jax run folder / its checkpoints/ / one step folder (the best step
  when several; `step` picks one), or a converted original checkpoint (deltadorsal.json +
  params/, tools/convert_deltadorsal.py).

  config: only for converted checkpoints (default: configs/pose.py or force.py with the
    model settings stored in deltadorsal.json; input size 384, the paper's).
  mano_path: MANO_RIGHT.pkl to use instead of the configured one.
  image_size: network input size instead of the configured data.out_img_size.
  backbone_dtype: backbone compute dtype instead of the configured one (parameters stay
    float32): "float32" is several times faster than the default bfloat16 on most CPUs, and
    gives slightly different numbers than a bfloat16 evaluation.
  """
  checkpoint = checkpointing.find(path, step=step, config=config)
  predictor_config = ml_collections.ConfigDict(checkpoint.config.to_dict())
  predictor_config.model.backbone.weights = ""  # the checkpoint holds the whole backbone
  if backbone_dtype:
    predictor_config.model.backbone.dtype = backbone_dtype
  model = _placeholder_network(predictor_config)
  checkpointing.load_params(checkpoint, model)
  graphdef, trainable, frozen = _split(model, predictor_config)
  states, source = (trainable, frozen), checkpoint.path
  if image_size is not None:
    predictor_config.data.out_img_size = int(image_size)
  mano, mano_source = None, None
  if predictor_config.task == "pose":
    if mano_path is not None:
      predictor_config.mano.path = mano_path
    if predictor_config.mano.path and not os.path.isfile(predictor_config.mano.path):
      raise FileNotFoundError(f"{predictor_config.mano.path}: the MANO model of {source} is not "
                              "there; give its location (mano_path= / --mano)")
    mano = mano_io.load_mano_or_synthetic(predictor_config.mano.path,
                                               tip_ids=tuple(predictor_config.mano.tip_ids))
    mano_source = predictor_config.mano.path or SYNTHETIC_MANO
  return Predictor(predictor_config, source, graphdef, states, mano, mano_source)


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _split(model_or_abstract, config):
  depth = deltadorsal.backbone_config_from(config).depth
  is_trainable = optim.trainable_filter(depth, config.model.backbone.n_unfrozen_blocks)
  return nnx.split(model_or_abstract, is_trainable, ...)


def _placeholder_network(config: ml_collections.ConfigDict) -> nnx.Module:
  """The network with zero parameters, to be overwritten by a checkpoint, on one device.

  Its other variables (RoPE periods) are computed. Random initialisation is skipped (compiling
  it takes seconds) unless a layer has no counterpart in the original files: head.attn_pool
  then keeps its fresh initialisation, as the converter documents.
  """
  build = lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(config.seed))
  device = _single_device()
  if config.model.head.pool == "attn":
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(build())[1], out_shardings=device)())
  graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  others = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2], out_shardings=device)()
  zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params),
                  out_shardings=device)()
  return nnx.merge(graphdef, zeros, others)


def from_model(config: ml_collections.ConfigDict, model: nnx.Module, *, source: str = "<model>",
               mano_path: str | None = None) -> Predictor:
  """A Predictor around an already built network (e.g. random weights for a benchmark)."""
  config = ml_collections.ConfigDict(config.to_dict())
  graphdef, trainable, frozen = _split(model, config)
  mano, mano_source = None, None
  if config.task == "pose":
    if mano_path is not None:
      config.mano.path = mano_path
    mano = mano_io.load_mano_or_synthetic(config.mano.path,
                                               tip_ids=tuple(config.mano.tip_ids))
    mano_source = config.mano.path or SYNTHETIC_MANO
  return Predictor(config, source, graphdef, (trainable, frozen), mano, mano_source)
