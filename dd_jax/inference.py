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

from dd_jax import checkpointing, losses, optim, parallel
from dd_jax.data import align, store, transforms
from dd_jax.data.egodorsal import MOTION_LABELS
from dd_jax.full_frames import stages
from dd_jax.mano import io as mano_io
from dd_jax.mano import model as mano_model
from dd_jax.models import deltadorsal
from dd_jax.priors import job as priors_job
from dd_jax.priors.predictor import HamerPredictor

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

    def place(mano, pose, betas, orient, wrist, focal, centre):
      zeros = jnp.zeros((pose.shape[0], 3), pose.dtype)
      hand = mano_model.mano_forward(mano, betas, pose, global_orient=zeros, transl=zeros,
                                     flat_hand_mean=True)
      placed = stages.place_hand(hand.vertices, hand.keypoints, orient, wrist, focal, centre)
      return {"keypoints_3d": hand.keypoints, **placed}

    def full(states, mano, img, base_img, prior_pose, betas, orient, wrist, focal, centre):
      raw = network(states, img, base_img, prior_pose)
      if mano is None:
        return {"logits": raw}
      return {"pose": raw, **place(mano, raw, betas, orient, wrist, focal, centre)}
    self._place = jax.jit(place)
    self._full = jax.jit(full)

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

  def full_forward(self, img, base_img, prior_pose, betas, place: stages.Placement
                   ) -> dict[str, jax.Array]:
    """The network, then MANO placed in the frame, in one compiled call (inputs may be global
    arrays split over a mesh): pose models {pose (B, 45), keypoints_3d (B, 21, 3) as the
    trainer computes them, keypoints_cam, vertices_cam, keypoints_2d (stages.place_hand)};
    force models {logits}."""
    return self._full(self.states, self.mano if self.task == "pose" else None, img, base_img,
                      prior_pose, betas, place.orient, place.wrist, place.focal, place.centre)

  def place(self, pose, betas, place: stages.Placement) -> dict[str, jax.Array]:
    """A (B, 45) pose with (B, 10) betas, placed in the frame (pose models): full_forward's
    outputs without the network (e.g. after smoothing the pose)."""
    return self._place(self.mano, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32),
                       place.orient, place.wrist, place.focal, place.centre)

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
         backbone_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None) -> Predictor:
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
  mesh: replicate the network (and MANO) over this mesh, for batches split over its data axis
    (default: the first device alone).
  """
  checkpoint = checkpointing.find(path, step=step, config=config)
  if checkpoint.config is None:
    raise ValueError(f"{path}: a converted DINOv3 backbone has no DeltaDorsal heads; train "
                     f"from it (--config.init_from or --config.model.backbone.weights)")
  predictor_config = ml_collections.ConfigDict(checkpoint.config.to_dict())
  predictor_config.model.backbone.weights = ""  # the checkpoint holds the whole backbone
  if backbone_dtype:
    predictor_config.model.backbone.dtype = backbone_dtype
  sharding = _single_device() if mesh is None else parallel.replicated(mesh)
  model = _placeholder_network(predictor_config, sharding)
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
    mano = jax.device_put(mano, sharding)
    mano_source = predictor_config.mano.path or SYNTHETIC_MANO
  return Predictor(predictor_config, source, graphdef, states, mano, mano_source)


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _split(model_or_abstract, config):
  depth = deltadorsal.backbone_config_from(config).depth
  is_trainable = optim.trainable_filter(depth, config.model.backbone.n_unfrozen_blocks)
  return nnx.split(model_or_abstract, is_trainable, ...)


def _placeholder_network(config: ml_collections.ConfigDict, device) -> nnx.Module:
  """The network with zero parameters, to be overwritten by a checkpoint, placed with
  `device` (a sharding: one device, or replicated over a mesh).

  Its other variables (RoPE periods) are computed. Random initialisation is skipped (compiling
  it takes seconds) unless a layer has no counterpart in the original files: head.attn_pool
  then keeps its fresh initialisation, as the converter documents.
  """
  build = lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(config.seed))
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


# ------------------------------------------------------------------------------ end to end


@dataclasses.dataclass(frozen=True, eq=False)
class Base:
  """A base image ready for alignment: undistorted, with its HaMeR prior (a usable hand)."""
  image: np.ndarray  # (H, W, 3) uint8 RGB, undistorted
  prior: stages.HandPrior
  camera: stages.Camera
  name: str = "base"


class Pipeline:
  """A raw camera frame and a base image of the same hand -> a DeltaDorsal prediction, end to
  end: HaMeR priors for both (dd_jax.priors), the online alignment and crop (data.align, the
  data pipeline's own code), the network, and MANO placed in the full frame (docs/inference.md).

    pipeline = Pipeline.from_dirs(hamer="/ckpt/hamer", deltadorsal="runs/demo")
    out = pipeline(frame, base)   # uint8 RGB arrays; K=, d= optional
    out["pose"], out["keypoints_2d"]   # (45,), (21, 2) pixels of the raw frame

  Problems with a frame or its base raise stages.PredictionError saying why. `timings`
  accumulates seconds per stage (prior, align, network; `*_compiled`: inside the compiled
  functions) over all calls.
  """

  def __init__(self, network: Predictor, hamer: HamerPredictor,
               options: priors_job.Options = priors_job.Options()):
    self.network, self.hamer, self.options = network, hamer, options
    self._undistort = align.Undistorter()
    self.timings = dict.fromkeys(("prior", "prior_compiled", "align", "network",
                                  "network_compiled"), 0.0)

  @classmethod
  def from_dirs(cls, *, hamer: str, deltadorsal: str, mano: str | None = None,
                hamer_variant: str = "hamer_vith", hamer_custom: dict | None = None,
                hamer_dtype: str = "float32", rescale_factor: float = 2.0,
                **load_kwargs) -> "Pipeline":
    """HaMeR from a converted folder (tools/convert_hamer.py) or its .ckpt (`hamer_variant` /
    `hamer_custom` give a .ckpt's sizes), DeltaDorsal as `load` takes it (a run, a step, a
    converted original; `load_kwargs` are load's). mano: MANO_RIGHT.pkl for both networks
    (default: the DeltaDorsal config's; its empty path means the synthetic hand)."""
    network = load(deltadorsal, mano_path=mano, **load_kwargs)
    hand = network.mano
    if hand is None:  # force models have no MANO of their own; HaMeR needs one
      hand = mano_io.load_mano_or_synthetic(mano or network.config.mano.path)
    hamer_predictor, _ = HamerPredictor.from_weights(
        hamer, hand, parallel.make_mesh(jax.devices()[:1]), variant=hamer_variant,
        custom=hamer_custom, dtype=hamer_dtype)
    return cls(network, hamer_predictor, priors_job.Options(rescale_factor=rescale_factor))

  def camera(self, image: np.ndarray, K=None, d=None) -> stages.Camera:
    return stages.make_camera(K, d, width=image.shape[1], height=image.shape[0])

  def prior(self, image: np.ndarray, camera: stages.Camera, *, box=None,
            track_from: dict | None = None) -> stages.HandPrior:
    """HaMeR's prior of an UNDISTORTED image: box (x0, y0, x1, y1) or (box, is_right), else the
    box around `track_from`'s keypoints_2d, else the whole image."""
    if box is not None and len(box) == 4:
      box = (np.asarray(box, np.float64), True)
    start = time.perf_counter()
    value = stages.hamer_priors(self.hamer, [image], [camera], [box], [track_from],
                                self.options, timings=self.timings)[0]
    self.timings["prior"] += time.perf_counter() - start
    return stages.as_prior(value, "HaMeR prior")

  def base(self, image: np.ndarray, *, K=None, d=None, camera: stages.Camera | None = None,
           box=None, prior: dict | None = None, name: str = "base") -> Base:
    """A raw base image -> Base (undistorted, its prior); PredictionError if it shows no
    usable hand. `prior`: a prior dict to use instead of running HaMeR."""
    image = _check_image(image, name)
    camera = camera or self.camera(image, K, d)
    start = time.perf_counter()
    undistorted = self._undistort(image, camera.K, camera.d)
    self.timings["align"] += time.perf_counter() - start
    hand = (stages.as_prior(prior, f"{name} prior") if prior is not None
            else self.prior(undistorted, camera, box=box))
    problem = stages.hand_problem(hand, camera.K, undistorted)
    if problem:
      raise stages.PredictionError(f"{name}: no usable hand: {problem}")
    return Base(undistorted, hand, camera, name)

  def __call__(self, frame: np.ndarray, base: "np.ndarray | Base", *, K=None, d=None,
               box=None, track_from: dict | None = None, base_box=None,
               prior: dict | None = None) -> dict[str, Any]:
    """One raw frame and its base (a raw image, or a Base) -> the prediction (numpy):
    pose models: pose (45,), betas (10,), keypoints_3d (21, 3) as the trainer computes them,
    keypoints_cam (21, 3) and vertices_cam (778, 3) in the readers' camera frame, keypoints_2d
    (21, 2) in the raw frame's pixels; force models: label, probabilities, logits. Both:
    prior_pose (45,), prior_keypoints_2d (21, 2) raw pixels, prior (the prior dict), inputs
    (stages.PairInputs), camera. K (3, 3) and d: the frame's camera (the base's too when raw);
    without K the assumed camera (stages.ASSUMED_NOTE). prior: the frame's prior dict instead
    of running HaMeR."""
    frame = _check_image(frame, "frame")
    camera = self.camera(frame, K, d)
    if not isinstance(base, Base):
      base = self.base(base, camera=camera, box=base_box)
    start = time.perf_counter()
    undistorted = self._undistort(frame, camera.K, camera.d)
    self.timings["align"] += time.perf_counter() - start
    hand = (stages.as_prior(prior, "frame prior") if prior is not None
            else self.prior(undistorted, camera, box=box, track_from=track_from))
    return self.predict_prepared(undistorted, camera, hand, base)

  def predict_prepared(self, undistorted: np.ndarray, camera: stages.Camera,
                       prior: stages.HandPrior, base: Base) -> dict[str, Any]:
    """The rest of __call__ for an undistorted frame and its prior."""
    start = time.perf_counter()
    height, width = undistorted.shape[:2]
    problem = stages.hand_problem(prior, camera.K, undistorted)
    if problem:
      raise stages.PredictionError(f"frame: no usable hand: {problem}")
    inputs = stages.pair_inputs(undistorted, base.image, camera.K, prior, base.prior,
                                self.network.image_size)
    place, _ = stages.placement([prior], [camera.K], [(width, height)])
    self.timings["align"] += time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(self.network.full_forward(
        inputs.img[None], inputs.base_img[None], inputs.prior_pose[None], inputs.betas[None],
        place))
    compiled = time.perf_counter() - start
    out = {k: np.asarray(v)[0] for k, v in out.items()}
    record: dict[str, Any] = {
        "prior_pose": inputs.prior_pose, "prior": prior.raw, "inputs": inputs, "camera": camera,
        "prior_keypoints_2d": stages.to_raw_pixels(
            stages.prior_keypoints_2d(prior, camera.K, width, height), camera)}
    if self.task == "force":
      logits = out["logits"].astype(np.float32)
      probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
      squeeze = (lambda x: x[0]) if logits.shape[0] == 1 else (lambda x: x)
      record.update(label=squeeze(np.argmax(logits, -1)), probabilities=squeeze(probabilities),
                    logits=squeeze(logits))
    else:
      record.update(pose=out["pose"], betas=inputs.betas, keypoints_3d=out["keypoints_3d"],
                    keypoints_cam=out["keypoints_cam"], vertices_cam=out["vertices_cam"],
                    keypoints_2d=stages.to_raw_pixels(out["keypoints_2d"], camera))
    self.timings["network"] += time.perf_counter() - start
    self.timings["network_compiled"] += compiled
    return record

  @property
  def task(self) -> str:
    return self.network.task

