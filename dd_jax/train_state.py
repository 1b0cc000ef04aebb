"""The model, its train state and the compiled steps on a mesh: what training, evaluation,
inference and the benchmark all start from.

`build(config, mesh)` creates the network directly in its shardings (nothing is materialised
unsharded, so vit7b16 with FSDP fits), loads backbone weights, splits the trainable subset from
the frozen rest and jit-compiles the train step (train state donated) and the eval step.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dd_jax import optim, parallel, steps, tasks
from dd_jax.models import deltadorsal


@dataclasses.dataclass
class Built:
  """Everything a run needs besides data; `state` holds the trainable part, `frozen` the rest."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  task: Any
  graphdef: nnx.GraphDef
  state: dict[str, Any]
  abstract_state: dict[str, Any]  # shapes and shardings of `state` (restore target)
  frozen: nnx.State
  tx: optax.GradientTransformation
  train_step: Callable
  eval_step: Callable

  def model(self, trainable=None) -> nnx.Module:
    """The network with the given (default: current) trainable parameters."""
    return nnx.merge(self.graphdef, self.state["params"] if trainable is None else trainable,
                     self.frozen)


def release_freed_host_memory() -> None:
  """Hands heap memory that was freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

  XLA's compiler frees hundreds of MB when it finishes, but glibc keeps freed heap mapped, so
  a step's buffers would come on top of it (ViT-S on CPU: ~400 MB of peak memory).
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def compile_step(step: Callable, *args) -> Callable:
  """`step` (a jax.jit function) compiled for these arguments' shapes and shardings, with the
  compiler's freed memory released before the first execution allocates its buffers."""
  compiled = step.lower(*args).compile()
  release_freed_host_memory()
  return compiled


def create_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(graphdef, trainable, frozen): the network built in its shardings, weights loaded, split."""
  build_model = lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build_model))
  shardings = parallel.tree_shardings(mesh, abstract_state, config.mesh.fsdp)
  model_state = jax.jit(lambda: nnx.split(build_model())[1], out_shardings=shardings)()
  model = nnx.merge(graphdef, model_state)
  if config.model.backbone.weights:
    deltadorsal.load_backbone_weights(model, config.model.backbone.weights)
  depth = deltadorsal.backbone_config_from(config).depth
  is_trainable = optim.trainable_filter(depth, config.model.backbone.n_unfrozen_blocks)
  return nnx.split(model, is_trainable, ...)


def _init_fn(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  def init(trainable):
    return dict(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                plateau=optim.plateau_init(config),
                rng=jax.random.key_data(jax.random.key(config.seed)))
  return init


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Built:
  mesh = mesh or parallel.make_mesh()
  task = tasks.make_task(config)
  graphdef, trainable, frozen = create_model(config, mesh)
  tx = optim.make_optimizer(config)
  init = _init_fn(config, tx)
  abstract_state = jax.eval_shape(init, trainable)
  shardings = parallel.tree_shardings(mesh, abstract_state, config.mesh.fsdp)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  state = jax.jit(init, out_shardings=shardings)(trainable)
  train_step = jax.jit(steps.make_train_step(graphdef, tx, task.loss), donate_argnums=(0,))
  eval_step = jax.jit(steps.make_eval_step(graphdef, task.evaluate))
  release_freed_host_memory()  # what compiling the initialisers freed
  return Built(config, mesh, task, graphdef, state, abstract_state, frozen, tx, train_step,
               eval_step)
