"""Default settings of the pose and force models (the original's), and the presets.

configs/pose.py and configs/force.py expose these to `--config`; tests build configs from here.
"""

import ml_collections

from dd_jax.logs import log
from dd_jax.mano.model import DELTADORSAL_TIP_IDS


def base_config(task: str) -> ml_collections.ConfigDict:
  """Settings shared by the pose and force configs (the original's defaults)."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 42
  c.train = True
  c.test = True
  c.ckpt_path = ""  # resume from (train=True) or evaluate (train=False) this checkpoint
  # Fine-tune from: a dd_jax run or step, a converted DeltaDorsal checkpoint, or a converted
  # DINOv3 backbone; parameters loaded, optimizer fresh. A run with checkpoints resumes instead.
  c.init_from = ""
  c.max_epochs = 10
  c.min_epochs = 1
  c.early_stopping_patience = 0  # epochs without improvement of the best metric; 0 = off
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200  # mid-epoch saves for resuming (0 = epoch ends only)
  c.num_val_pictures = 4
  c.logger = "tensorboard"  # or "wandb" (pip install wandb; docs/report.md)
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = "dd_jax"
  c.wandb.entity = ""  # "" = the account's default
  c.wandb.mode = ""  # "online", "offline", or "" = online when W&B is reachable and logged in
  c.wandb.group = ""  # tools/loso.py puts its folds in one group

  c.analysis = ml_collections.ConfigDict()
  # Per-frame fields for tools/report.py in test_outputs_epoch{N}.npy (beside the original's):
  # participant, trial, motion type, hand position, FSR, timestamp; pose: per-joint angle
  # errors and per-finger visibility of the ground-truth hand (docs/report.md).
  c.analysis.frame_fields = True
  c.analysis.face_labels = ""  # mano_face_labels.json; "" = generated from the MANO model

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "_DATA/egodorsal"
  c.data.format = "folder"  # or "array_record" (tools/pack_array_record.py)
  c.data.precropped = True  # False: online alignment from full frames (undistort + homography)
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.test_split = "test"
  c.data.all_participant_ids = ()  # empty: the split files decide
  c.data.leave_one_out = False  # train = all participants - val - test
  c.data.val_participants = ()
  c.data.test_participants = ()
  c.data.sample_ratio = 1.0
  c.data.out_img_size = 384
  c.data.batch_size = 96  # GLOBAL batch, split over processes and devices
  c.data.eval_batch_size = 96
  c.data.num_workers = 4  # Grain worker processes per host (0 = in-process)
  c.data.augment = True  # train split only; val/test never augment
  # Send uint8 images; augment and normalise inside the jitted steps (docs/data.md).
  # None: on for GPU / TPU, off on CPU.
  c.data.augment_on_device = ml_collections.config_dict.placeholder(bool)
  c.data.random_base = True  # online mode: random base per sample (else the first)
  c.data.skip_bad_frames = False
  c.data.fsr_thresh = 0.2
  c.data.validate = True  # check every referenced file before training
  # Paths in the JSON always stay inside frames_dir / bases_dir (and those inside data_dir);
  # True also lets the files be symlinks to places outside data_dir.
  c.data.allow_symlinks_outside_root = False
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.enabled = False  # generate a synthetic EgoDorsal set into data_dir if missing
  c.data.synthetic.participants = 8
  c.data.synthetic.trials = 6
  c.data.synthetic.frames = 10
  c.data.synthetic.image_size = 256
  c.data.synthetic.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.variant = "dinov3_vitl16"
  c.model.backbone.custom = ml_collections.ConfigDict()  # dim/depth/num_heads/... overrides
  c.model.backbone.weights = ""  # converted checkpoint (tools/convert_dinov3.py); "" = random init
  c.model.backbone.n_unfrozen_blocks = 3
  c.model.backbone.dtype = "bfloat16"  # compute dtype; params stay float32
  # Storage dtype of the parameters that do not train (frozen blocks, patch embedding, tokens):
  # "bfloat16" halves their memory; trainable parameters and optimizer state stay float32.
  c.model.backbone.frozen_dtype = "float32"
  # auto | custom_vjp | autodiff: how the blocks' backward passes are built (dd_jax/kernels.py);
  # auto picks by backend and CPU flags, DD_JAX_DINOV3_IMPL in the environment overrides it.
  c.model.backbone.impl = "auto"
  # Training only: RoPE coordinates times exp(U(-ln r, ln r)), a factor per block and per
  # backbone call (image, base), shared by the batch, as the original's train-mode backbone
  # (Meta's rescale_coords=2; docs/model.md); 0 = off. Never in evaluation.
  c.model.backbone.rope_rescale = 2.0
  c.model.change = ml_collections.ConfigDict()
  c.model.change.out_dim = 256
  c.model.change.use_delta = True
  c.model.change.use_orig_feat = True

  c.mano = ml_collections.ConfigDict()
  c.mano.path = ""  # MANO_RIGHT.pkl; "" = the synthetic MANO-format hand (tests, demo)
  c.mano.tip_ids = DELTADORSAL_TIP_IDS

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.weight_decay = 1e-2
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0
  # Gradient accumulation: each update's data.batch_size samples go through the network as this
  # many micro-batches (activation memory of one); the update is that of the whole batch.
  c.optimizer.accumulate_steps = 1
  c.optimizer.plateau_factor = 0.1  # reduce-on-plateau scale, on top of any schedule
  # Fine-tuning recipes (docs/training.md); these defaults are the original's plain AdamW.
  c.optimizer.layer_decay = 1.0  # unfrozen block i of D: lr x layer_decay^(D - i); 1 = off
  c.optimizer.head_lr_mult = 1.0  # the head's lr = lr x head_lr_mult
  c.optimizer.weight_decay_exclude = False  # True: no decay on norms, biases, LayerScale
  c.optimizer.schedule = "plateau"  # constant lr; or "cosine" / "linear" decay to 0
  c.optimizer.warmup_steps = 0  # linear warmup from 0 (any schedule)
  c.optimizer.decay_steps = 0  # end of the cosine / linear decay; 0 = max_epochs x steps/epoch
  c.optimizer.ema_decay = 0.0  # > 0: keep an EMA of the trained weights; it is what is evaluated

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = False  # also shard parameters over the data axis (vith16plus / vit7b16)
  return c


def pose_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pose model's settings; `arg` names a preset (demo, or a backbone variant)."""
  c = base_config("pose")
  c.model.head = ml_collections.ConfigDict()
  c.model.head.use_prior = False
  c.model.head.use_film = False
  c.model.head.gated = False
  c.model.head.pool = "avg"  # or "attn"
  c.model.head.hidden = 512
  c.loss = ml_collections.ConfigDict()
  c.loss.keypoint_weight = 0.05
  c.loss.pose_weight = 0.001
  c.optimizer.lr = 1e-3
  c.optimizer.plateau_patience = 5
  c.best_metric = "val/mpjpe"
  c.best_mode = "min"
  return apply_preset(c, arg)


def apply_preset(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  if not arg:
    return c
  if arg == "demo":
    c.data.data_dir = "_cache/synthetic_egodorsal"
    c.data.synthetic.enabled = True
    c.data.out_img_size = 96
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.data.num_workers = 0
    c.model.backbone.variant = "custom"
    c.model.backbone.custom.update(dict(dim=96, depth=4, num_heads=4, ffn="mlp",
                                        ffn_hidden=384, qkv_bias=True))
    c.model.backbone.n_unfrozen_blocks = 4
    c.model.backbone.dtype = "float32"
    c.model.change.out_dim = 64
    c.max_epochs = 30
    if c.task == "pose":
      c.model.head.use_prior = True  # the residual head starts AT the prior: beating it is learning
    return c
  c.model.backbone.variant = arg if arg.startswith("dinov3_") else f"dinov3_{arg}"
  return c


def force_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The force model's settings; `arg` names a preset (demo, or a backbone variant)."""
  c = base_config("force")
  c.max_epochs = 30
  c.model.backbone.n_unfrozen_blocks = 0
  c.model.change.use_orig_feat = False
  c.model.head = ml_collections.ConfigDict()
  c.model.head.n_classes = 7
  c.model.head.out_dim = 1
  c.model.head.hidden = 512
  c.model.head.pool = "avg"
  c.loss = ml_collections.ConfigDict()
  c.loss.class_counts = (30714, 1860, 1860, 1860, 1860, 1860, 1860)  # () = count the train split
  c.optimizer.lr = 5e-4
  c.optimizer.plateau_patience = 10
  c.best_metric = "val/acc"
  c.best_mode = "max"
  c = apply_preset(c, arg)
  if arg == "demo":
    # Plain cross-entropy: with inverse-frequency weights (the original's, for its 16:1 real
    # imbalance) a from-scratch ViT on 360 frames guesses press classes and never settles.
    c.loss.class_counts = (1,) * 7
  return c


# ------------------------------------------------------------------ start-up checks

_DTYPES = ("float32", "bfloat16", "float16")


def check(c: ml_collections.ConfigDict) -> None:
  """Refuses settings a run cannot mean, listing every problem at once (ValueError) before any
  work; settings the run would ignore are problems too, so that nothing is silently dropped.

  Settings the original also ignores (use_orig_feat without use_delta, use_film without
  use_prior) are warnings. Unknown keys and wrong types are refused earlier, by ConfigDict itself (--config.a.b=...).
  """
  from dd_jax.models import dinov3  # pylint: disable=g-import-not-at-top

  problems = []

  def need(ok: bool, problem: str) -> None:
    if not ok:
      problems.append(problem)

  d, o, m = c.data, c.optimizer, c.model
  need(c.task in ("pose", "force"), f"task must be 'pose' or 'force', got {c.task!r}")
  need(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
  need(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1 and b2 must be in [0, 1), got {o.b1}, "
       f"{o.b2}")
  need(o.eps > 0, f"optimizer.eps must be > 0, got {o.eps}")
  need(o.clip_norm >= 0, f"optimizer.clip_norm must be >= 0 (0 = off), got {o.clip_norm}")
  need(0 < o.plateau_factor <= 1, f"optimizer.plateau_factor must be in (0, 1], got "
       f"{o.plateau_factor}")
  need(o.accumulate_steps >= 1, f"optimizer.accumulate_steps must be >= 1, got "
       f"{o.accumulate_steps}")
  need(o.accumulate_steps < 1 or d.batch_size % o.accumulate_steps == 0,
       f"data.batch_size={d.batch_size} must be a multiple of optimizer.accumulate_steps="
       f"{o.accumulate_steps} (it is the global batch of one update, split into micro-batches)")
  for name in ("batch_size", "eval_batch_size", "out_img_size"):
    need(d[name] > 0, f"data.{name} must be > 0, got {d[name]}")
  need(d.out_img_size % 16 == 0, f"data.out_img_size must be a multiple of the patch size 16, "
       f"got {d.out_img_size}")
  need(0 < d.sample_ratio <= 1, f"data.sample_ratio must be in (0, 1], got {d.sample_ratio}")
  need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
  need(d.format in ("folder", "array_record"),
       f"data.format must be 'folder' or 'array_record', got {d.format!r}")
  for name in ("max_epochs", "log_every_steps"):
    need(c[name] >= 1, f"{name} must be >= 1, got {c[name]}")
  for name in ("min_epochs", "early_stopping_patience", "checkpoint_every_steps",
               "num_val_pictures"):
    need(c[name] >= 0, f"{name} must be >= 0, got {c[name]}")
  need(c.best_mode in ("min", "max"), f"best_mode must be 'min' or 'max', got {c.best_mode!r}")
  need(c.best_metric.startswith("val/"), f"best_metric must be a validation metric 'val/...', "
       f"got {c.best_metric!r}")
  variants = sorted(dinov3.VARIANTS) + ["custom"]
  need(m.backbone.variant in variants,
       f"model.backbone.variant must be one of {variants}, got {m.backbone.variant!r}")
  need(m.backbone.dtype in _DTYPES,
       f"model.backbone.dtype must be one of {list(_DTYPES)}, got {m.backbone.dtype!r}")
  need(m.backbone.frozen_dtype in ("float32", "bfloat16"),
       f"model.backbone.frozen_dtype must be 'float32' or 'bfloat16', got "
       f"{m.backbone.frozen_dtype!r}")
  need(m.backbone.rope_rescale == 0 or m.backbone.rope_rescale >= 1,
       f"model.backbone.rope_rescale must be 0 (off) or >= 1, got {m.backbone.rope_rescale}")
  need(m.head.pool in ("avg", "attn"), f"model.head.pool must be 'avg' or 'attn', got "
       f"{m.head.pool!r}")
  need(m.change.out_dim > 0 and m.head.hidden > 0,
       "model.change.out_dim and model.head.hidden must be > 0")
  if c.task == "pose":
    need(c.loss.keypoint_weight >= 0 and c.loss.pose_weight >= 0,
         "loss.keypoint_weight and loss.pose_weight must be >= 0")
  else:
    need(m.head.n_classes >= 2 and m.head.out_dim >= 1,
         "model.head.n_classes must be >= 2 and model.head.out_dim >= 1")
    need(not c.loss.class_counts or (len(c.loss.class_counts) == m.head.n_classes
                                     and all(n > 0 for n in c.loss.class_counts)),
         f"loss.class_counts must be empty (counted from the train split) or "
         f"{m.head.n_classes} positive counts, got {tuple(c.loss.class_counts)}")
  # Settings the current mode would ignore.
  if not d.leave_one_out:
    for name in ("val_participants", "test_participants", "all_participant_ids"):
      need(not d[name], f"data.{name} is used only with data.leave_one_out=True (without it "
           "the split files decide); set data.leave_one_out=True or drop it")
  need(c.train or c.test, "train and test are both False: nothing to do")
  need(c.train or not c.init_from, "init_from starts a training run; with train=False use "
       "ckpt_path")
  need(not (c.ckpt_path and c.init_from), "ckpt_path (resume / test) and init_from (fine-tune) "
       "exclude each other")
  ignored = []  # documented no-ops of the original's: a warning
  if m.change.use_orig_feat and not m.change.use_delta:
    ignored.append("model.change.use_orig_feat is ignored without use_delta (only Ft is used)")
  if c.task == "pose" and m.head.use_film and not m.head.use_prior:
    ignored.append("model.head.use_film is ignored without use_prior")
  for line in ignored:
    log.warning("config: %s", line)
  if problems:
    raise ValueError("config: " + ("\n  ".join([f"{len(problems)} problem(s):"] + problems)))
