"""The network, its train state and the compiled train and eval steps on a mesh: what training,
evaluation and the benchmark all start from.

A train state is a plain dict pytree: step, the TRAINABLE parameters, their optimizer state,
the reduce-on-plateau state and, when optimizer.ema_decay > 0, the parameters' EMA. Frozen
parameters and other variables (RoPE periods) travel beside it, are never differentiated and are
not donated.

`build(config, mesh)` creates the network directly in its shardings (nothing is materialised
unsharded, so vit7b16 with FSDP fits), loads backbone weights, splits the trainable subset from
the frozen rest and jit-compiles the train step (train state donated) and the eval step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dd_jax import checkpointing, host, optim, parallel, tasks
from dd_jax.data import device_augment, transforms
from dd_jax.models import deltadorsal

TrainState = dict[str, Any]


@dataclasses.dataclass
class TrainSetup:
  """A run's network split into the train state and the frozen rest, placed on the mesh, with
  its task and compiled steps: everything a run needs besides data."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: tasks.Task
  graphdef: nnx.GraphDef
  state: TrainState
  abstract_state: TrainState  # shapes and shardings of `state` (restore target)
  frozen: nnx.State
  is_trainable: Callable  # nnx filter: which variables of the network are in state["params"]
  init_state: Callable  # trainable parameters -> a fresh train state in its shardings
  tx: optax.GradientTransformation
  train_step: Callable  # (state, frozen, batch, consts) -> (state, metrics); state donated
  eval_step: Callable  # (trainable, frozen, batch, consts) -> (metric sums, per-frame outputs)

  def model(self, trainable=None) -> nnx.Module:
    """The network with the given (default: current) trainable parameters."""
    return nnx.merge(self.graphdef, self.state["params"] if trainable is None else trainable,
                     self.frozen)


# ------------------------------------------------------------------ the steps


AUGMENT, NETWORK = 0, 1  # the train step's independent random streams


def step_rng(seed: int, step, stream: int = AUGMENT) -> jax.Array:
  """The train step's randomness for one stream (AUGMENT: on-device augmentation, NETWORK: the
  network's train mode, RoPE rescale): a function of the seed, the step and the stream, so a
  resumed run draws what the uninterrupted one drew and the streams are independent."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), stream)


def make_train_step(graphdef: nnx.GraphDef, update: Callable, loss_fn: Callable, seed: int = 0,
                    augment: transforms.AugmentConfig | None = None, *,
                    accumulate_steps: int = 1, loss_shares: Callable | None = None) -> Callable:
  """(state, frozen, batch, consts) -> (state, metrics);
  `loss_fn(model, batch, consts, rng) -> (loss, aux)`, rng = step_rng(seed, step, NETWORK).

  update: `optim.make_update`'s (state, grads) -> state after the optimizer step.
  uint8 batch images (data.augment_on_device) are augmented with `augment` (None: only
  normalised) from step_rng(seed, step) before the loss sees them.

  consts: the task's fixed arrays (MANO model, class weights), arguments rather than constants
  folded into the compiled program.

  accumulate_steps = k > 1 (optimizer.accumulate_steps): the batch goes through the network as
  k micro-batches of B/k, one after the other (a scan: activations of one micro-batch live at a
  time), and ONE optimizer update follows with the whole batch's gradient. `loss_shares(micro,
  consts)` (the task's) gives each micro-batch's share of the whole batch's loss (micro: the
  batch with a leading k axis), so that sum_j share_j loss_j IS the batch's loss and its
  gradient the batch's gradient: clipping, the schedule and the plateau see what one batch of B
  gives (up to float summation order). Micro-batch j holds samples j, j + k, j + 2k, ...: every
  device's samples stay on it. Augmentation and the network's randomness are drawn for the whole
  batch, as with k = 1. Metrics: the batch's loss and aux (share-weighted sums over micro-batches),
  and the norm of the gradient the optimizer saw.

  A non-finite loss (of any micro-batch) leaves the state unchanged (the host then stops the
  run), so the last good parameters are what any later checkpoint would hold.
  """
  k = accumulate_steps
  if k > 1 and loss_shares is None:
    raise ValueError("make_train_step: accumulate_steps > 1 needs loss_shares (the task's)")

  def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array], consts):
    keys = None  # the images' augmentation keys, drawn for the whole batch
    if augment is not None and batch["img"].dtype == jnp.uint8:
      keys = device_augment.image_keys(step_rng(seed, state["step"], AUGMENT),
                                       batch["img"].shape[0])
    rng = step_rng(seed, state["step"], NETWORK)

    def loss_and_grads(part, part_keys):
      # Augmented per micro-batch: its float32 images and their scratch are micro-batch sized.
      part = device_augment.model_inputs(part, part_keys, augment)

      def compute_loss(trainable):
        model = nnx.merge(graphdef, trainable, frozen)
        return loss_fn(model, part, consts, rng)
      return jax.value_and_grad(compute_loss, has_aux=True)(state["params"])

    if k == 1:
      (loss, aux), grads = loss_and_grads(batch, keys)
    else:
      micro = micro_batches(batch, k)
      micro_keys = None if keys is None else micro_batches({"keys": keys}, k)["keys"]
      shares = loss_shares(micro, consts).astype(jnp.float32)

      def accumulate(total, part_and_share):
        part, part_keys, share = part_and_share
        (loss, aux), grads = loss_and_grads(part, part_keys)
        total = jax.tree.map(lambda t, g: t + share * g, total, grads)
        return total, (loss, aux)

      zeros = jax.tree.map(jnp.zeros_like, state["params"])  # float32, as trainable params are
      grads, (losses, auxes) = jax.lax.scan(accumulate, zeros, (micro, micro_keys, shares))
      loss, aux = jax.tree.map(lambda x: jnp.tensordot(shares, x, axes=1), (losses, auxes))
    # A branch rather than a select between new and old: selecting keeps a copy of the old
    # optimizer state alive through the whole step (~75 MiB for ViT-S with 3 trained blocks).
    finite = jnp.isfinite(loss)
    new_state = jax.lax.cond(finite, update, lambda s, g: s, state, grads)
    new_state = dict(new_state, step=state["step"] + finite.astype(state["step"].dtype))
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return new_state, metrics

  return train_step


def micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """(B, ...) leaves -> (k, B/k, ...): micro-batch j = samples j, j + k, ... The batch is split
  over the devices in contiguous blocks of B/n (a multiple of k), so every micro-batch takes
  B/(nk) samples of each device's block and nothing moves between devices."""
  def split(x):
    if x.ndim == 0 or x.shape[0] % k:
      raise ValueError(f"batch leaf of shape {x.shape}: its batch dimension is not a multiple of "
                       f"optimizer.accumulate_steps={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: Callable) -> Callable:
  """(trainable, frozen, batch, consts) -> (metric sums, per-frame outputs)."""

  def eval_step(trainable: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], consts):
    batch = device_augment.model_inputs(batch)
    model = nnx.merge(graphdef, trainable, frozen)
    return eval_fn(model, batch, consts)

  return eval_step


def compile_step(step: Callable, *args) -> Callable:
  """`step` (a jax.jit function) compiled for these arguments' shapes and shardings, with the
  compiler's freed memory released before the first execution allocates its buffers."""
  compiled = step.lower(*args).compile()
  host.release_freed_host_memory()
  return compiled


# ------------------------------------------------------------------ building


def create_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 abstract: bool = False):
  """(is_trainable, (graphdef, trainable, frozen)): the network built in its shardings (frozen
  parameters in model.backbone.frozen_dtype), backbone weights loaded, split by the filter of
  what trains. abstract: ShapeDtypeStructs with their shardings instead, nothing allocated or
  read (tools/plan.py)."""
  depth = deltadorsal.backbone_config_from(config).depth
  is_trainable = optim.trainable_filter(depth, config.model.backbone.n_unfrozen_blocks)
  frozen_dtype = jnp.dtype(config.model.backbone.frozen_dtype)
  build_model = lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build_model))
  shardings = parallel.tree_shardings(mesh, abstract_state, config.mesh.fsdp)
  # Cast inside the initialiser: each device only ever holds its shard in the frozen dtype.
  init = jax.jit(lambda: cast_frozen(nnx.split(build_model())[1], is_trainable, frozen_dtype),
                 out_shardings=shardings)
  model = nnx.merge(graphdef, jax.eval_shape(init) if abstract else init())
  weights = config.model.backbone.weights
  if weights and not abstract:
    source = checkpointing.find(weights)
    if source.kind != checkpointing.DINOV3:
      raise ValueError(f"model.backbone.weights={weights}: not a converted DINOv3 backbone "
                       "(tools/convert_dinov3.py); start from a run or a converted DeltaDorsal "
                       "checkpoint with config.init_from")
    checkpointing.load_params(source, model)  # the variables' dtypes kept
  optim.group_sizes(config, nnx.state(model, nnx.Param))  # every parameter in a defined group
  return is_trainable, nnx.split(model, is_trainable, ...)


def cast_frozen(state: nnx.State, is_trainable: Callable, dtype) -> nnx.State:
  """`state` with its floating-point Params that do not train in `dtype`; trainable Params and
  other variables (RoPE periods) as they are."""
  def cast(path, variable):
    if (isinstance(variable, nnx.Param) and not is_trainable(path, variable)
        and jnp.issubdtype(variable.dtype, jnp.floating)):
      return variable.replace(variable.get_value().astype(dtype))
    return variable
  return nnx.map_state(cast, state)


def init_fn(config: ml_collections.ConfigDict, tx: optax.GradientTransformation
            ) -> Callable[[nnx.State], TrainState]:
  """trainable parameters -> a fresh train state (step 0, zero optimizer moments)."""
  def init(trainable):
    return dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                plateau=optim.plateau_init(config), **optim.ema_init(config, trainable))
  return init


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
          abstract: bool = False) -> TrainSetup:
  """abstract: state and frozen are ShapeDtypeStructs with their shardings and nothing is
  allocated or compiled; the steps can then be lowered and compiled ahead of time (what
  tools/plan.py measures)."""
  mesh = mesh or parallel.make_mesh()
  task = tasks.make_task(config)
  is_trainable, (graphdef, trainable, frozen) = create_model(config, mesh, abstract)
  tx = optim.make_optimizer(config)
  init = init_fn(config, tx)
  abstract_state = jax.eval_shape(init, trainable)
  shardings = parallel.tree_shardings(mesh, abstract_state, config.mesh.fsdp)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  init_state = jax.jit(init, out_shardings=shardings)
  state = abstract_state if abstract else init_state(trainable)
  augment = transforms.AugmentConfig() if config.data.augment else None
  train_step = jax.jit(make_train_step(graphdef, optim.make_update(config, tx), task.loss,
                                       config.seed, augment,
                                       accumulate_steps=config.optimizer.accumulate_steps,
                                       loss_shares=task.loss_shares),
                       donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, task.evaluate))
  host.release_freed_host_memory()  # what compiling the initialisers freed
  return TrainSetup(config, mesh, task, graphdef, state, abstract_state, frozen, is_trainable,
                    init_state, tx, train_step, eval_step)
