"""The jit-compiled, sharded train and eval steps, shared by the trainer, evaluator and benchmark.

A train state is a plain dict pytree: step, the TRAINABLE parameters, their optimizer state,
the reduce-on-plateau state and an RNG key. Frozen parameters and other variables (RoPE
periods) travel beside it, are never differentiated and are not donated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

TrainState = dict[str, Any]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable) -> Callable:
  """(state, frozen, batch, consts) -> (state, metrics); `loss_fn(model, batch, consts) -> (loss, aux)`.

  consts: the task's fixed arrays (MANO model, class weights), arguments rather than constants
  folded into the compiled program.

  A non-finite loss leaves the state unchanged (the host then stops the run), so the last
  good parameters are what any later checkpoint would hold.
  """

  def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array], consts):

    def compute_loss(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      return loss_fn(model, batch, consts)

    (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      scale = state["plateau"].scale
      updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
      return optax.apply_updates(params, updates), opt_state

    # A branch rather than a select between new and old: selecting keeps a copy of the old
    # optimizer state alive through the whole step (~75 MiB for ViT-S with 3 trained blocks).
    finite = jnp.isfinite(loss)
    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state["params"],
                                     state["opt_state"])
    new_state = dict(state, step=state["step"] + finite.astype(state["step"].dtype),
                     params=params, opt_state=opt_state)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: Callable) -> Callable:
  """(trainable, frozen, batch, consts) -> (metric sums, per-frame outputs)."""

  def eval_step(trainable: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], consts):
    model = nnx.merge(graphdef, trainable, frozen)
    return eval_fn(model, batch, consts)

  return eval_step
