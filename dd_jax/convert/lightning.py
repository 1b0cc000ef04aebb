"""DeltaDorsal Lightning .ckpt files (SPEC.md §6) -> dd_jax checkpoints, without torch.

The .ckpt is read with the torch-free reader in stub mode: its optimizer, scheduler and
hyper-parameter objects load as inert placeholders (never executed) and are skipped.

Converted format (dd_jax.params' converted folders, as dd_jax.models.dinov3_weights'):
  deltadorsal.json  {"format": "dd_jax.deltadorsal", "format_version": 2, "task": "pose"|"force",
                    "model": config.model as a dict, "backbone_config": {DinoV3Config fields},
                    "source": str, "notes": [str], "num_params": int, "arrays": {path: shape}}
  params/           <dotted path>.npy, one float32 array per variable of the network, the
                    layout of nnx.to_pure_dict(nnx.state(PoseNet|ForceNet)):
                    backbone.* (dd_jax.convert.dinov3's layout), change.conv{1,2}.{kernel,bias},
                    head.{film, neck, mlp1, mlp2, mlp3} (pose) or head.{neck, trunk1, trunk2, out}
                    (force), each {kernel (in, out) / (kh, kw, in, out), bias}.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from flax import nnx

from dd_jax import losses
from dd_jax import params as params_lib
from dd_jax.convert import dinov3 as convert_dinov3
from dd_jax.convert import torch_file
from dd_jax.models import deltadorsal, dinov3

FORMAT = "dd_jax.deltadorsal"
FORMAT_VERSION = params_lib.CONVERTED_VERSION
META_FILE = "deltadorsal.json"
TOOL = "tools/convert_deltadorsal.py"

BACKBONE_PREFIX = "backbone.backbone.model."
CHANGE_LAYERS = {"backbone.change.conv.0": ("change", "conv1"),
                 "backbone.change.conv.2": ("change", "conv2")}
POSE_HEAD_LAYERS = {"head.film.0": ("head", "film"), "head.neck.0": ("head", "neck"),
                    "head.mlp.0": ("head", "mlp1"), "head.mlp.2": ("head", "mlp2"),
                    "head.mlp.4": ("head", "mlp3")}
FORCE_HEAD_LAYERS = {"head.neck.0": ("head", "neck"), "head.trunk.0": ("head", "trunk1"),
                     "head.trunk.2": ("head", "trunk2"), "head.head": ("head", "out")}
# The pose module registers its MANO layer (smplx buffers) in the state_dict.
IGNORED_PREFIXES = ("mano_fit.", "mano.")
# The force module registers its loss, nn.CrossEntropyLoss(weight=class weights): the weights are
# checked against config.loss.class_counts (`check_class_weights`), not converted.
CLASS_WEIGHTS_KEY = "force_loss.weight"


class LightningConversionError(ValueError):
  """The checkpoint does not fit the configured network; the message lists every problem."""


def read_lightning_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
  """(state_dict, notes): the .ckpt's "state_dict"; everything else in the file is skipped."""
  path = os.fspath(path)
  stubs: list[str] = []
  ckpt = torch_file.read_torch_file(path, unknown_globals="stub", stub_names=stubs)
  if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
    kind = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise LightningConversionError(
        f"{path}: not a Lightning checkpoint (no 'state_dict' dict; found {kind})")
  notes = []
  skipped = sorted(str(k) for k in ckpt if k != "state_dict")
  if skipped:
    notes.append("skipped (not executed): " + ", ".join(skipped))
  if stubs:
    notes.append("pickled objects loaded as inert stubs: " + ", ".join(sorted(set(stubs))))
  return ckpt["state_dict"], notes


# ---------------------------------------------------------------------------------------------
# What the file says about the head and change encoder (for clear mismatch errors)
# ---------------------------------------------------------------------------------------------

def _shape(sd, key):
  value = sd.get(key)
  return tuple(value.shape) if hasattr(value, "shape") else None


def file_settings(sd: dict[str, Any]) -> dict[str, Any]:
  """The settings the shapes imply (only those the file can tell)."""
  out: dict[str, Any] = {}
  task = ("pose" if any(k.startswith("head.mlp.") for k in sd)
          else "force" if any(k.startswith("head.trunk.") for k in sd) else None)
  out["task"] = task
  cls = _shape(sd, BACKBONE_PREFIX + "cls_token")
  conv0 = _shape(sd, "backbone.change.conv.0.weight")
  if cls and conv0:
    dim, c_in = cls[-1], conv0[1]
    out["change.out_dim"] = conv0[0]
    options = {dim: (False, False), dim + 1: (True, False), 3 * dim + 1: (True, True)}
    if c_in in options:
      out["change.use_delta"], out["change.use_orig_feat"] = options[c_in]
  if task == "pose":
    mlp0, mlp4 = _shape(sd, "head.mlp.0.weight"), _shape(sd, "head.mlp.4.weight")
    neck = _shape(sd, "head.neck.0.weight")
    if mlp0 and neck:
      out["head.hidden"] = mlp0[0]
      out["head.use_prior"] = mlp0[1] != neck[0]
    if mlp4:
      out["head.gated"] = mlp4[0] == 2 * 45
    out["file_has_film"] = "head.film.0.weight" in sd
  elif task == "force":
    trunk0, last = _shape(sd, "head.trunk.0.weight"), _shape(sd, "head.head.weight")
    if trunk0:
      out["head.hidden"] = trunk0[0]
    if last:
      out["head.n_classes*out_dim"] = last[0]
  return out


def _setting_mismatches(found: dict[str, Any], config) -> list[str]:
  m, problems = config.model, []
  for key in ("change.out_dim", "change.use_delta", "change.use_orig_feat", "head.hidden",
              "head.use_prior", "head.gated"):
    if key not in found:
      continue
    section, name = key.split(".")
    want = m[section].get(name)
    if want is None:
      continue
    if section == "change" and name == "use_orig_feat" and not m.change.use_delta:
      continue  # ignored without deltas
    if want != found[key]:
      problems.append(f"config.model.{key}={want!r} but the file was trained with {found[key]!r}")
  if found.get("task") == "pose":
    film_active = bool(m.head.use_film and m.head.use_prior)
    if film_active and not found["file_has_film"]:
      problems.append("config.model.head.use_film=True (with use_prior) but the file has no "
                      "head.film.0 weights")
    if not film_active and found["file_has_film"] and m.head.use_prior:
      problems.append("the file has FiLM weights (head.film.0) used with its prior, but "
                      "config.model.head.use_film=False")
  if "head.n_classes*out_dim" in found:
    want = m.head.n_classes * m.head.out_dim
    if want != found["head.n_classes*out_dim"]:
      problems.append(f"config.model.head n_classes*out_dim = {want} but the file's head.head "
                      f"has {found['head.n_classes*out_dim']} outputs")
  return problems


def check_class_weights(weight: Any, config) -> tuple[list[str], list[str]]:
  """(problems, notes): the file's force_loss.weight against config.loss.class_counts.

  The original weights its cross-entropy by 1 / class frequency (losses.class_weights); the
  converted folder holds only the network, so a different config would silently fine-tune with
  other weights. A mismatch is an error that names the counts reproducing the file's weights.
  """
  if not hasattr(weight, "shape"):
    return [f"{CLASS_WEIGHTS_KEY}: a {type(weight).__name__}, not an array"], []
  weight = np.asarray(weight, np.float64)
  shown = "(" + ",".join(f"{w:.6g}" for w in weight) + ")"
  counts = tuple(config.loss.get("class_counts") or ())
  if not counts:
    return [], [f"{CLASS_WEIGHTS_KEY} not checked: config.loss.class_counts=() counts the train "
                f"split; the file's class weights are {shown}"]
  want = losses.class_weights(counts).astype(np.float64)
  if weight.shape == want.shape and np.allclose(weight, want, rtol=1e-5, atol=0):
    return [], [f"{CLASS_WEIGHTS_KEY} (the original's class weights) matches "
                f"config.loss.class_counts={counts}"]
  frequencies = "(" + ",".join(f"{1 / w:.6g}" if w > 0 else "0" for w in weight) + ")"
  return [f"{CLASS_WEIGHTS_KEY} (the original's class weights) is {shown}, but "
          f"config.loss.class_counts={counts} gives "
          f"({','.join(f'{w:.6g}' for w in want)}); to train with the file's weights pass "
          f"--config.loss.class_counts={frequencies} (class frequencies; any scale)"], []


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------

def _torch_to_flax(key: str, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array, dtype=np.float32)
  if key.endswith(".weight") and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  if key.endswith(".weight") and array.ndim == 2:
    return array.T  # (out, in) -> (in, out)
  return array


def _set(tree: dict, path: tuple, value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def expected_shapes(config) -> dict[str, tuple]:
  """Dotted path -> shape of every variable of build_model(config), without allocating it."""
  abstract = nnx.eval_shape(lambda: deltadorsal.build_model(config, rngs=nnx.Rngs(0)))
  return {params_lib.path_str(path): tuple(var.shape)
          for path, var in nnx.to_flat_state(nnx.state(abstract))}


def lightning_state_dict_to_params(state_dict: dict[str, Any], config, *, source: str = "ckpt",
                                   notes: list[str] | None = None) -> dict:
  """A Lightning state_dict -> nested params of build_model(config) (np.float32).

  The backbone architecture is detected from the shapes and must equal the configured one;
  head settings the file cannot tell (pool, and FiLM without a prior) come from `config`.
  Raises LightningConversionError listing every problem.
  """
  notes = [] if notes is None else notes
  problems = []
  found = file_settings(state_dict)
  if found["task"] is None:
    raise LightningConversionError(f"{source}: no head.mlp.* (pose) or head.trunk.* (force) keys; "
                                   f"keys start: {sorted(state_dict)[:10]}")
  if found["task"] != config.task:
    raise LightningConversionError(f"{source}: a {found['task']} checkpoint, but config.task is "
                                   f"{config.task!r}")
  problems += _setting_mismatches(found, config)

  params: dict = {}
  # Backbone: helper A's Meta-key mapping, architecture from the file.
  backbone_keys = {k: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
  if not backbone_keys:
    problems.append(f"no {BACKBONE_PREFIX}* keys (the DINOv3 backbone)")
  else:
    wanted = deltadorsal.backbone_config_from(config)
    backbone_notes: list[str] = []
    try:  # the architecture from the shapes, so a wrong variant is named as such
      file_config, backbone = convert_dinov3.meta_state_dict_to_params(
          backbone_keys, None, prefix=BACKBONE_PREFIX, source=source, notes=backbone_notes)
    except convert_dinov3.ConversionError:
      file_config, backbone = wanted, None  # undetectable: convert as configured below
    if file_config != wanted:
      diffs = dinov3.config_differences(file_config, wanted, found_as="file")
      problems.append(f"backbone is {dinov3.variant_name(file_config)}, config.model.backbone "
                      f"is {dinov3.variant_name(wanted)}: " + "; ".join(diffs))
    else:
      try:
        if backbone is None:
          _, backbone = convert_dinov3.meta_state_dict_to_params(
              backbone_keys, wanted, prefix=BACKBONE_PREFIX, source=source, notes=backbone_notes)
        params["backbone"] = backbone
        notes.extend(backbone_notes)
      except convert_dinov3.ConversionError as e:
        problems.append(str(e))

  head_layers = POSE_HEAD_LAYERS if config.task == "pose" else FORCE_HEAD_LAYERS
  film_active = config.task == "pose" and config.model.head.use_film and config.model.head.use_prior
  layers = {**CHANGE_LAYERS, **head_layers}
  unknown, ignored = [], []
  for key, value in state_dict.items():
    if key.startswith(BACKBONE_PREFIX):
      continue
    if key.startswith(IGNORED_PREFIXES):
      ignored.append(key)
      continue
    if key == CLASS_WEIGHTS_KEY and config.task == "force":
      weight_problems, weight_notes = check_class_weights(value, config)
      problems += weight_problems
      notes += weight_notes
      continue
    layer, _, leaf = key.rpartition(".")
    if layer not in layers or leaf not in ("weight", "bias"):
      unknown.append(key)
      continue
    if layer == "head.film.0" and not film_active:
      if not config.model.head.use_prior:
        ignored.append(key)  # the original builds it with use_film but never uses it
      continue  # with a prior, _setting_mismatches already reported it
    if not hasattr(value, "shape"):
      problems.append(f"{key}: a {type(value).__name__}, not an array")
      continue
    _set(params, layers[layer] + ("kernel" if leaf == "weight" else "bias",),
         _torch_to_flax(key, value))
  if unknown:
    problems.append(f"unexpected keys ({len(unknown)}): " + ", ".join(sorted(unknown)))
  if ignored:
    notes.append(f"ignored {len(ignored)} keys (MANO buffers, inactive FiLM): "
                 + ", ".join(sorted(ignored)[:8]) + (" ..." if len(ignored) > 8 else ""))

  # Every variable of the configured network, with its exact shape.
  expected = expected_shapes(config)
  given = {params_lib.path_str(path): np.shape(v)
           for path, v in params_lib.flatten_params(params)}
  optional = ("head.attn_pool.",)
  if "backbone" in params:  # otherwise already reported
    missing = sorted(k for k in expected if k not in given and not k.startswith(optional))
    if missing:
      problems.append(f"missing for the configured network ({len(missing)}): "
                      + ", ".join(missing))
  for key, shape in given.items():
    if key in expected and expected[key] != shape:
      problems.append(f"{key}: file gives shape {shape}, the configured network expects "
                      f"{expected[key]}")
    elif key not in expected and not key.startswith("backbone."):
      problems.append(f"{key}: in the file but not in the configured network")
  if problems:
    raise LightningConversionError(f"{source}: does not fit config.model ({config.task}):\n  "
                                   + "\n  ".join(dict.fromkeys(problems)))
  if config.model.head.pool == "attn":
    notes.append("pool='attn': the original's attention-pooling conv is not a saved layer (it "
                 "was re-drawn at random on every call); head.attn_pool keeps its fresh "
                 "initialisation")
  return params


def convert_lightning(path: str | os.PathLike, config) -> tuple[dict, list[str]]:
  """Reads and converts a DeltaDorsal .ckpt for `config` -> (params, notes)."""
  path = os.fspath(path)
  state_dict, notes = read_lightning_state_dict(path)
  params = lightning_state_dict_to_params(state_dict, config, source=path, notes=notes)
  return params, notes


# ---------------------------------------------------------------------------------------------
# The converted format
# ---------------------------------------------------------------------------------------------

def save_deltadorsal_checkpoint(out_dir: str | os.PathLike, params: dict, config, *,
                                source: str = "", notes: list[str] | None = None) -> None:
  """Writes a converted folder (dd_jax.params: out_dir/deltadorsal.json + params/*.npy);
  replaces an earlier one."""
  meta = dict(format=FORMAT, task=config.task, model=config.model.to_dict(),
              backbone_config=dataclasses.asdict(deltadorsal.backbone_config_from(config)),
              source=str(source), notes=list(notes or []))
  params_lib.write_converted(out_dir, META_FILE, meta, params)


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
  return params_lib.read_converted_meta(path, META_FILE, FORMAT, TOOL)


def load_deltadorsal_checkpoint(path: str | os.PathLike) -> dict:
  """A converted folder -> nested params (np.float32; backbone block keys int)."""
  return params_lib.load_converted_tree(path, read_checkpoint_meta(path))


def apply_deltadorsal_checkpoint(model: deltadorsal.PoseNet | deltadorsal.ForceNet,
                                 path: str | os.PathLike) -> None:
  """Loads a converted folder into a built PoseNet / ForceNet (shardings kept, each array read
  straight into them)."""
  params_lib.load_converted_into(model, path, read_checkpoint_meta(path),
                                 allow_missing=("head.attn_pool",))
