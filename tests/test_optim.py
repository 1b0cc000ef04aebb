"""The optimizer groups: defaults equal the original's AdamW, per-group lr and decay, layer
decay, schedules against optax's own, the EMA against NumPy, labelling errors at start-up."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dd_jax import (
  checkpointing,
  default_config,
  evaluation,
  experiment,
  optim,
  parallel,
  train_state,
)
from dd_jax.data import pipeline
from dd_jax.models import deltadorsal

import tiny

LR = 1e-3


def _config(**optimizer):
  """Pose config with a depth-4 custom backbone whose last 3 blocks train."""
  c = default_config.pose_config("demo")
  c.model.backbone.custom.update(dict(dim=8, depth=4, num_heads=2, ffn_hidden=16))
  c.model.backbone.n_unfrozen_blocks = 3
  c.optimizer.lr = LR
  c.optimizer.update(optimizer)
  return c


def _toy_params():
  """The trainable part of a depth-4, 3-unfrozen-block model, as nested dicts keyed like nnx
  paths: a kernel and a bias (or LayerNorm scale, LayerScale gamma) per module."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
  block = lambda: {"attn": {"qkv": {"kernel": leaf(4, 6), "bias": leaf(6)}},
                   "norm1": {"scale": leaf(4), "bias": leaf(4)}, "ls1": {"gamma": leaf(4)}}
  return {"backbone": {"blocks": {i: block() for i in (1, 2, 3)},
                       "norm": {"scale": leaf(4), "bias": leaf(4)}},
          "change": {"conv1": {"kernel": leaf(3, 3, 4, 2), "bias": leaf(2)}},
          "head": {"mlp1": {"kernel": leaf(2, 5), "bias": leaf(5)}}}


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {"/".join(str(optim._key(k)) for k in path): np.asarray(v, np.float64)
          for path, v in leaves[0]}


def _run(config, params, grads_per_step, plateau_scales=None):
  """Params after each update of optim.make_update (the train step's update)."""
  tx = optim.make_optimizer(config)
  update = jax.jit(optim.make_update(config, tx))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               plateau=optim.plateau_init(config), **optim.ema_init(config, params))
  out = []
  for t, grads in enumerate(grads_per_step):
    if plateau_scales is not None:
      state["plateau"] = state["plateau"]._replace(scale=jnp.float32(plateau_scales[t]))
    state = dict(update(state, grads), step=state["step"] + 1)
    out.append(state)
  return out


def test_defaults_equal_the_original_adamw_update(tiny_dataset):
  """Today's step (before the groups), rebuilt from optax alone: clip, AdamW with decay on every
  parameter, update x the plateau scale. The grouped optimizer must match it on the same
  gradients, clipping and a reduced plateau scale included."""
  config = tiny.config("pose", tiny_dataset)
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(0))
  depth = deltadorsal.backbone_config_from(config).depth
  _, params, _ = nnx.split(model, optim.trainable_filter(depth, 1), ...)
  keys = jax.random.split(jax.random.key(1), 4)
  # Scales that change per step, so that clipping each group apart (not globally) would show.
  grads = [jax.tree.map(lambda p, k=k, t=t: 3.0 ** t * jax.random.normal(k, p.shape), params)
           for t, k in enumerate(keys)]
  scales = [1.0, 1.0, 0.1, 0.1]

  o = config.optimizer
  reference_tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                             optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                         weight_decay=o.weight_decay))

  @jax.jit
  def reference_step(params, opt_state, grads, scale):
    updates, opt_state = reference_tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return optax.apply_updates(params, updates), opt_state

  expected, opt_state = params, reference_tx.init(params)
  got = _run(config, params, grads, scales)
  for t in range(4):
    expected, opt_state = reference_step(expected, opt_state, grads[t], jnp.float32(scales[t]))
    for name, value in _flat(expected).items():  # bit for bit
      np.testing.assert_array_equal(_flat(got[t]["params"])[name], value,
                                    err_msg=f"step {t}: {name}")
  assert optax.tree.norm(grads[0]) > 10 * o.clip_norm  # clipping was exercised


def test_each_group_gets_its_lr_with_layer_decay_and_head_multiplier():
  config = _config(layer_decay=0.5, head_lr_mult=10.0, weight_decay=0.0, clip_norm=1e9)
  groups = optim.optimizer_groups(config)
  for i in (1, 2, 3):  # BEiT's layer decay: lr x decay^(depth - i)
    assert groups[f"backbone_block_{i}"].lr == pytest.approx(LR * 0.5 ** (4 - i), rel=1e-12)
  params = jax.tree.map(jnp.zeros_like, _toy_params())  # at 0, float32 resolves lr-sized steps
  # Adam's first update of a constant gradient is lr x sign(gradient): the step size IS the lr.
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
  (after,) = _run(config, params, [grads])
  expected_lr = {"backbone/blocks/1": LR * 0.125, "backbone/blocks/2": LR * 0.25,
                 "backbone/blocks/3": LR * 0.5, "backbone/norm": LR, "change": LR,
                 "head": 10 * LR}
  before, moved = _flat(params), _flat(after["params"])
  for name, value in before.items():
    (lr,) = [lr for prefix, lr in expected_lr.items() if name.startswith(prefix + "/")]
    np.testing.assert_allclose(moved[name] - value, lr, rtol=1e-4, err_msg=name)


def test_layer_decay_per_block_equals_beits_layer_ids():
  """BEiT's assigner, written out: layer id 0 for the embeddings, i + 1 for block i, depth + 1
  for everything after the blocks; lr scale decay^(depth + 1 - layer id)."""
  decay, depth = 0.75, 24
  config = _config(layer_decay=decay)
  config.model.backbone.variant = "vitl16"
  config.model.backbone.custom = {}
  config.model.backbone.n_unfrozen_blocks = depth
  scales = [decay ** (depth + 1 - layer_id) for layer_id in range(depth + 2)]
  groups = optim.optimizer_groups(config)
  for i in range(depth):
    assert groups[f"backbone_block_{i}"].lr == pytest.approx(LR * scales[i + 1], rel=1e-12), i
  for name in ("backbone_norm", "change", "head"):
    assert groups[name].lr == pytest.approx(LR * scales[depth + 1], rel=1e-12), name
  assert groups["backbone_block_0"].lr == pytest.approx(LR * 0.75 ** 24, rel=1e-12)


@pytest.mark.parametrize("exclude", [False, True])
def test_no_decay_parameters_get_no_decay(exclude):
  config = _config(weight_decay=0.1, weight_decay_exclude=exclude)
  params = _toy_params()
  (after,) = _run(config, params, [jax.tree.map(jnp.zeros_like, params)])  # decay alone moves
  before, moved = _flat(params), _flat(after["params"])
  n_spared = 0
  for name, value in before.items():
    spared = exclude and name.rsplit("/", 1)[1] in ("bias", "scale", "gamma")
    n_spared += spared
    expected = value if spared else value * (1 - LR * 0.1)  # decoupled decay: p -= lr wd p
    np.testing.assert_allclose(moved[name], expected, rtol=1e-6, err_msg=name)
  assert n_spared == (16 if exclude else 0)


def test_no_decay_labels_are_the_models_norms_biases_and_layerscales(tiny_dataset):
  config = tiny.config("pose", tiny_dataset, **{"optimizer.weight_decay_exclude": True,
                                                "model.backbone.n_unfrozen_blocks": 2})
  abstract = nnx.state(nnx.eval_shape(lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(0))),
                       nnx.Param)
  labels = dict(nnx.to_flat_state(optim.group_labels(config, abstract)))
  for path, value in nnx.to_flat_state(abstract):
    if labels[path] != optim.FROZEN:  # tokens are 3-D but never train
      assert labels[path].endswith(optim.NO_DECAY) == (value.ndim == 1), (path, labels[path])


def _independent_group(path: tuple, value, *, depth: int, n_unfrozen: int, exclude: bool) -> str:
  """The documented labelling, written again from docs/training.md's table."""
  if path[0] in ("change", "head"):
    group = path[0]
  elif path[1] == "blocks" and int(path[2]) >= depth - n_unfrozen:
    group = f"backbone_block_{path[2]}"
  elif path[1] == "norm" and n_unfrozen:
    group = "backbone_norm"
  else:
    return "frozen"
  return group + "/no_decay" if exclude and value.ndim == 1 else group


def test_the_start_up_table_counts_every_group_with_its_lr_and_decay(tiny_dataset):
  config = tiny.config("pose", tiny_dataset, **{
      "optimizer.weight_decay_exclude": True, "optimizer.layer_decay": 0.5,
      "optimizer.head_lr_mult": 10.0, "optimizer.weight_decay": 0.02,
      "model.backbone.n_unfrozen_blocks": 1})
  abstract = nnx.state(nnx.eval_shape(lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(0))),
                       nnx.Param)
  expected = {}
  for path, value in nnx.to_flat_state(abstract):
    name = _independent_group(path, value, depth=2, n_unfrozen=1, exclude=True)
    expected[name] = expected.get(name, 0) + value.size
  lr = {"backbone_block_1": 0.5 * LR, "backbone_norm": LR, "change": LR, "head": 10 * LR}
  lines = optim.group_table(config, abstract).splitlines()
  assert lines[0].split() == ["group", "params", "lr", "weight", "decay"]
  rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
  assert set(rows) == set(expected) | {"trainable"}, rows
  for name, size in expected.items():
    count, *rest = rows[name]
    assert int(count.replace(",", "")) == size, name
    if name == "frozen":
      assert rest == ["-", "-"]
    else:
      assert float(rest[0]) == pytest.approx(lr[name.split("/")[0]]), name
      assert float(rest[1]) == (0.0 if name.endswith("/no_decay") else 0.02), name
  n_trainable = sum(size for name, size in expected.items() if name != "frozen")
  assert rows["trainable"] == [f"{n_trainable:,}"]
  assert lines[-1].startswith("lr schedule: constant; x0.1 after 5 validations")


def test_optimizer_state_only_for_trainable_parameters_whatever_the_groups(tiny_dataset):
  """With every group defined (layer decay, no-decay twins), the Adam moments still cover the
  trainable parameters once; a frozen-labelled parameter handed to the optimizer anyway gets
  no state and no update (optax.set_to_zero)."""
  config = tiny.config("pose", tiny_dataset, **{
      "optimizer.weight_decay_exclude": True, "optimizer.layer_decay": 0.5})
  model = deltadorsal.build_model(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  labels = dict(nnx.to_flat_state(optim.group_labels(config, params)))
  n_trainable = sum(v.size for p, v in nnx.to_flat_state(params) if labels[p] != optim.FROZEN)
  n_frozen = sum(v.size for p, v in nnx.to_flat_state(params) if labels[p] == optim.FROZEN)
  assert n_frozen > 0 and n_trainable > 0
  tx = optim.make_optimizer(config)
  opt_state = tx.init(params)
  n_adam_groups = len(optim.optimizer_groups(config)) - 1  # one step counter each
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n_trainable + n_adam_groups
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  for path, update in nnx.to_flat_state(updates):
    moved = bool(np.any(np.asarray(update.get_value() if hasattr(update, "get_value")
                                   else update)))
    assert moved == (labels[path] != optim.FROZEN), path


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_and_decay_match_optax_schedules_with_the_plateau_scale_on_top(schedule):
  warmup, decay = 3, 10
  config = _config(schedule=schedule, warmup_steps=warmup, decay_steps=decay, weight_decay=0.0,
                   clip_norm=1e9)
  if schedule == "cosine":
    reference = optax.warmup_cosine_decay_schedule(0.0, LR, warmup, decay)
  else:
    reference = optax.join_schedules([optax.linear_schedule(0.0, LR, warmup),
                                      optax.linear_schedule(LR, 0.0, decay - warmup)], [warmup])
  params = jax.tree.map(jnp.zeros_like, _toy_params())
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
  steps = 12
  plateau_scales = [1.0] * 6 + [0.1] * (steps - 6)
  states = _run(config, params, [grads] * steps, plateau_scales)
  previous = 0.0
  for t, state in enumerate(states):
    now = _flat(state["params"])["change/conv1/kernel"]
    expected = float(reference(t)) * plateau_scales[t]
    np.testing.assert_allclose(now - previous, expected, rtol=1e-4, atol=1e-10, err_msg=f"step {t}")
    previous = now
  assert float(reference(steps - 1)) == 0.0 and float(reference(1)) > 0.0


def _mesh():
  return parallel.make_mesh(jax.devices()[:1])


def test_ema_of_the_trained_weights_equals_numpy(tiny_dataset):
  decay = 0.7
  config = tiny.config("pose", tiny_dataset, **{"optimizer.ema_decay": decay})
  built = train_state.build(config, _mesh())
  it = iter(pipeline.make_train_loader(config.data, config.task, seed=config.seed))
  state = built.state
  ema = _flat(state["params"])
  np.testing.assert_array_equal(_flat(state["ema"])["head/mlp1/kernel"], ema["head/mlp1/kernel"])
  for _ in range(3):
    state, _ = built.train_step(state, built.frozen, parallel.global_batch(built.mesh, next(it)),
                                built.task.consts)
    params = _flat(state["params"])
    ema = {k: decay * ema[k] + (1 - decay) * params[k] for k in ema}
  got = _flat(optim.evaluated_params(state))
  for name, value in ema.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  assert not np.allclose(got["head/mlp1/kernel"], params["head/mlp1/kernel"])


def test_validation_and_the_best_checkpoint_use_the_ema(tiny_dataset, tmp_path, caplog):
  """A run with an EMA validates the EMA (the logged val/loss is the EMA's, not the raw
  weights'), and prints its optimizer groups at start-up. A large lr makes the two differ."""
  config = tiny.config("pose", tiny_dataset, max_epochs=1, test=False, **{
      "optimizer.ema_decay": 0.5, "optimizer.lr": 0.05})
  workdir = str(tmp_path / "run")
  caplog.set_level(logging.INFO, logger="dd_jax")
  experiment.train_and_evaluate(config, workdir, _mesh())
  assert "optimizer groups:\ngroup" in caplog.text and "EMA of the weights: 0.5" in caplog.text
  (step, logged), = tiny.val_losses(workdir).items()
  built = train_state.build(config, _mesh())
  restored, frozen, _ = checkpointing.restore_training(
      checkpointing.resolve(workdir)[0], step, built.abstract_state, built.frozen)

  def val_loss(params):
    loader = pipeline.make_eval_loader(config.data, config.task, config.data.val_split)
    return evaluation.evaluate(built.eval_step, (params, frozen, built.task.consts), loader,
                               built.mesh, built.task.finalize).metrics["loss"]

  ema_loss, raw_loss = val_loss(restored["ema"]), val_loss(restored["params"])
  assert abs(ema_loss - raw_loss) > 1e-3 * abs(raw_loss), (ema_loss, raw_loss)
  np.testing.assert_allclose(logged, ema_loss, rtol=1e-5)


def test_a_labelling_typo_is_a_start_up_error(tiny_dataset, monkeypatch):
  config = tiny.config("pose", tiny_dataset)
  real_group = optim.param_group

  def typo(path, **kwargs):
    group = real_group(path, **kwargs)
    return "backbone_blocks_1" if group == "backbone_block_1" else group

  monkeypatch.setattr(optim, "param_group", typo)
  with pytest.raises(ValueError, match=r"backbone/blocks/1/attn/proj/bias -> 'backbone_blocks_1'"):
    train_state.build(config, _mesh())

  # A typo that drops a group's every parameter into another group.
  monkeypatch.setattr(optim, "param_group", lambda path, **kw: "head" if path[0] == "change"
                      else real_group(path, **kw))
  with pytest.raises(ValueError, match=r"groups without any parameter: \['change'\]"):
    train_state.build(config, _mesh())


def test_a_parameter_outside_every_group_is_a_start_up_error(tiny_dataset, monkeypatch):
  config = tiny.config("pose", tiny_dataset)
  real_build = deltadorsal.build_model

  def with_mask_token(config, *, rngs):
    model = real_build(config, rngs=rngs)
    model.backbone.mask_token = nnx.Param(jnp.zeros((1, 32)))
    return model

  monkeypatch.setattr(deltadorsal, "build_model", with_mask_token)
  with pytest.raises(ValueError, match="backbone/mask_token belongs to no optimizer group"):
    train_state.build(config, _mesh())


def test_bad_optimizer_settings_are_named():
  with pytest.raises(ValueError, match="optimizer.schedule='cosin'"):
    optim.make_optimizer(_config(schedule="cosin"))
  with pytest.raises(ValueError, match="optimizer.layer_decay=1.5"):
    optim.make_optimizer(_config(layer_decay=1.5))
  with pytest.raises(ValueError, match=r"needs optimizer.decay_steps \(0\) > optimizer.warmup"):
    optim.lr_schedule(_config(schedule="cosine"))
