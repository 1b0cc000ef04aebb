"""dd_jax against the PyTorch original on this machine: prints a table and writes JSON.

Rows: pose train step, pose inference, MANO forward, input pipeline, the input pipeline at real
sizes per core (tools/bench_input.py: 4K online frames, 1200 px precrops, packed crops), peak
memory of the train step (separate processes) and train-step compile time. Both frameworks use the same threads,
float32, shapes and weights; warm-up is excluded; each time is the median of several repeats,
taken alternately (torch, jax, jax, torch, ...) so that load from elsewhere hits both alike.

  python tools/benchmark.py                     # full run, ViT-S/16 224x224 batch 8 (~4 min)
  python tools/benchmark.py --quick             # tiny model smoke check (~1 min)
  python tools/benchmark.py --rows train,mano --json bench_results.json
  python tools/benchmark.py --rows hamer --hamer_size small   # HaMeR forward, batch 1 and 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):  # dd_jax and tests/reference
  if _path not in sys.path:
    sys.path.insert(0, _path)

import bench_input  # noqa: E402  (tools/, beside this script)
import numpy as np  # noqa: E402

ROWS = ("train", "infer", "mano", "pipeline", "input", "memory", "compile", "hamer", "e2e")


@dataclasses.dataclass
class Settings:
  variant: str = "dinov3_vits16"
  custom: dict = dataclasses.field(default_factory=dict)  # backbone overrides (quick mode)
  image_size: int = 224
  batch: int = 8
  n_unfrozen: int = 3
  warmup: int = 2
  repeats: int = 7
  mano_batches: tuple = (1, 64, 1024)
  mano_seconds: float = 1.0  # per repeat
  pipeline_samples: int = 24  # per repeat
  crop_size: int = 512  # the decoded JPEG crops (frame and base)
  out_size: int = 384
  input_frame: tuple = (3840, 2160)  # the input row: online-mode frames, precrops, packed crops
  input_crop: int = 1200
  input_samples: int = 2  # per timed call
  compile_depths: tuple = (6, 12, 24)  # with n_unfrozen fixed: frozen blocks grow
  compile_unfrozen: tuple = (0, 12)  # at the variant's depth
  memory_steps: int = 3
  matmul_sizes: tuple = (1024, 2048)
  threads: int = 0  # 0: every core this process may use
  dtype: str = "float32"  # dd_jax backbone compute dtype (not float32: --jax_only)
  jax_only: bool = False  # accelerators: time dd_jax alone (no CUDA torch here)
  backbone_fields: dict = dataclasses.field(default_factory=dict)  # set for torch-only children
  hamer_size: str = "small"  # HAMER_SIZES key: the HaMeR row's network
  hamer_batches: tuple = (1, 32)
  e2e_frames: int = 16  # raw synthetic frames (256x192, distorted) of the end-to-end row

  @classmethod
  def quick(cls) -> "Settings":
    return cls(variant="custom", custom=dict(dim=64, depth=2, num_heads=2, ffn="mlp",
                                             ffn_hidden=128, qkv_bias=True),
               image_size=32, batch=2, n_unfrozen=1, warmup=1, repeats=2, mano_batches=(1, 64),
               mano_seconds=0.05, pipeline_samples=2, crop_size=96, out_size=64,
               input_frame=(480, 270), input_crop=200, input_samples=1,
               compile_depths=(1, 2), compile_unfrozen=(0,), memory_steps=1, matmul_sizes=(256,),
               hamer_size="tiny", hamer_batches=(1, 2), e2e_frames=3)


# ------------------------------------------------------------------ timing


def cpu_threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def pin_cores(n: int) -> None:
  """Restricts this process (and its children) to its first n usable cores. XLA:CPU sizes its
  thread pool to the usable cores when it starts, so call this before JAX's first use."""
  if n and hasattr(os, "sched_setaffinity") and n < cpu_threads():
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def set_threads(n: int) -> None:
  """torch intra-op threads and OpenCV's; XLA:CPU sizes its pool to the usable cores itself."""
  import cv2  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(n)
  cv2.setNumThreads(n)


def _time(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compare(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, rounds: int = 2,
            gap: float = 0.05) -> dict[str, list[float]]:
  """Seconds per call of each function, `repeats` timed calls each (rounded up to a multiple
  of `rounds`), taken in `rounds` blocks per function in alternating order (A B, B A, ...)
  so that drifting load from elsewhere hits every function alike. Each block starts with one
  untimed call: the other framework has just run, and its first step back pays for pages and
  caches the other one took (a training process runs one framework only)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  names = list(fns)
  per_block = -(-repeats // rounds)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(gap)
      fns[name]()
      times[name].extend(_time(fns[name]) for _ in range(per_block))
  return times


def median(xs: list[float]) -> float:
  return float(statistics.median(xs))


def matmul_peak(sizes: tuple, repeats: int = 5, dtype: str = "float32",
                jax_only: bool = False) -> dict[str, float]:
  """Best square matmul FLOP/s of torch (float32) and of XLA (`dtype`) on this machine."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  best = {"jax": 0.0} if jax_only else {"torch": 0.0, "jax": 0.0}
  for n in sizes:
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja = jnp.asarray(a, dtype)
    dot = jax.jit(jnp.dot)
    fns = {"jax": lambda: dot(ja, ja).block_until_ready()}
    if not jax_only:
      import torch  # pylint: disable=import-outside-toplevel
      ta = torch.from_numpy(a)
      fns["torch"] = lambda: torch.mm(ta, ta)
    for name, ts in compare(fns, 1, repeats, gap=0.02).items():
      best[name] = max(best[name], 2 * n ** 3 / min(ts))
  best["best"] = max(best.values())
  return best


# ------------------------------------------------------------------ the pose model, both sides


def backbone_config(s: Settings):
  """The DinoV3Config; in a torch-only child, a namespace of its fields (no JAX import)."""
  if s.backbone_fields:
    return types.SimpleNamespace(**s.backbone_fields)
  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel
  return dinov3.get_config(s.variant, **s.custom)


def pose_config(s: Settings, depth: int | None = None, n_unfrozen: int | None = None):
  from dd_jax import default_config  # pylint: disable=import-outside-toplevel
  c = default_config.pose_config()
  c.model.backbone.variant = s.variant
  c.model.backbone.custom.update(s.custom)
  if depth is not None:
    c.model.backbone.custom.depth = depth
  c.model.backbone.dtype = s.dtype
  c.model.backbone.n_unfrozen_blocks = s.n_unfrozen if n_unfrozen is None else n_unfrozen
  c.data.out_img_size = s.image_size
  c.data.batch_size = s.batch
  c.mano.path = ""  # the synthetic MANO-format hand (the same one reference.deltadorsal writes)
  return c


def host_batch(s: Settings, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b, n = s.batch, s.image_size
  return {"img": rng.standard_normal((b, n, n, 3), np.float32),
          "base_img": rng.standard_normal((b, n, n, 3), np.float32),
          "hamer_pose": (0.3 * rng.standard_normal((b, 45))).astype(np.float32),
          "hamer_shape": rng.standard_normal((b, 10)).astype(np.float32),
          "gt_pose": (0.3 * rng.standard_normal((b, 45))).astype(np.float32),
          "valid": np.ones((b,), bool)}


def one_device_mesh():
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import parallel  # pylint: disable=import-outside-toplevel
  return parallel.make_mesh(jax.devices()[:1])


def torch_pose(s: Settings, mano_dir: str):
  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
  return tr.PoseRunner(backbone_config(s), s.n_unfrozen, mano_dir)


class JaxPose:
  """dd_jax's compiled train step (train_state.build, as the trainer uses it), with the weights
  of a reference.deltadorsal.PoseRunner when given one, and a compiled forward for inference."""

  def __init__(self, s: Settings, torch_runner=None):
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from dd_jax import host, optim, parallel, train_state  # pylint: disable=import-outside-toplevel
    from dd_jax import params as params_lib  # pylint: disable=import-outside-toplevel
    self.jax, self.parallel = jax, parallel
    self.release_freed_host_memory = host.release_freed_host_memory
    self.mesh = one_device_mesh()
    config = pose_config(s)
    built = train_state.build(config, self.mesh)
    self.built = built
    state, frozen = built.state, built.frozen
    if torch_runner is not None:
      from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
      model = built.model()
      params_lib.assign_params(model, tr.jax_params(torch_runner.net, backbone_config(s)),
                                source="reference.deltadorsal")
      is_trainable = optim.trainable_filter(backbone_config(s).depth, s.n_unfrozen)
      _, trainable, frozen = nnx.split(model, is_trainable, ...)
      state = dict(state, params=trainable, opt_state=built.tx.init(trainable))
    self.state, self.frozen, self.consts = state, frozen, built.task.consts
    self.compiled_step = None
    graphdef = built.graphdef
    self.forward = jax.jit(lambda p, f, img, base, prior:
                           nnx.merge(graphdef, p, f)(img, base, prior)["theta"])
    self.compiled_forward = None

  def batch(self, host):
    return self.parallel.global_batch(self.mesh, host)

  def rope_scale(self, step: int):
    """The train-mode RoPE factors (depth, 2) that the train step draws at `step`, or None."""
    from dd_jax import train_state  # pylint: disable=import-outside-toplevel
    config = self.built.config
    key = train_state.step_rng(config.seed, step, train_state.NETWORK)
    scale = self.built.model().draw_rope_scale(key, config.model.backbone.rope_rescale)
    return None if scale is None else np.asarray(scale)

  def compile_train_step(self, host) -> dict[str, float]:
    """Times tracing+lowering and compilation of the train step; returns them and XLA's FLOPs."""
    start = time.perf_counter()
    lowered = self.built.train_step.lower(self.state, self.frozen, self.batch(host), self.consts)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    self.release_freed_host_memory()  # as the trainer does after compiling (not timed)
    self.compiled_step = compiled  # the jit cache does not see AOT compilations: call this one
    return {"trace_lower_s": traced - start, "compile_s": done - traced,
            "xla_flops": _xla_flops(compiled), "dot_kernels": _dot_kernels(compiled)}

  def train_step(self, host) -> dict[str, float]:
    step = self.compiled_step or self.built.train_step
    self.state, metrics = step(self.state, self.frozen, self.batch(host), self.consts)
    return {k: float(v) for k, v in self.jax.device_get(metrics).items()}

  def compile_infer(self, host) -> dict[str, float]:
    start = time.perf_counter()
    self.compiled_forward = self.forward.lower(self.state["params"], self.frozen, host["img"],
                                               host["base_img"], host["hamer_pose"]).compile()
    return {"compile_s": time.perf_counter() - start, "xla_flops": _xla_flops(self.compiled_forward),
            "dot_kernels": _dot_kernels(self.compiled_forward)}

  def infer(self, host):
    forward = self.compiled_forward or self.forward
    return forward(self.state["params"], self.frozen, host["img"], host["base_img"],
                   host["hamer_pose"]).block_until_ready()


def _dot_kernels(compiled) -> dict[str, dict[str, float]]:
  """The compiled program's dots by the library that runs them (kernels.dot_kernels)."""
  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  try:
    return kernels.dot_kernels(compiled.as_text())
  except Exception:  # pylint: disable=broad-except
    return {}  # e.g. a backend without HLO text: the rest of the row still counts


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench_pose(s: Settings, peak: float, mano_dir: str) -> dict[str, Any]:
  """Rows 1 and 2: train step and inference, samples/s and fraction of the matmul peak."""
  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
  host = host_batch(s)
  torch_runner = None if s.jax_only else torch_pose(s, mano_dir)
  jax_pose = JaxPose(s, torch_runner)
  compile_info = jax_pose.compile_train_step(host)
  infer_info = jax_pose.compile_infer(host)
  # The first step of each: its loss and gradient norm come from the same weights and batch
  # (before the update), so they check that both sides compute the same thing.
  parity: dict[str, Any] = {}
  first_rope_scale = jax_pose.rope_scale(step=0)  # drawn by dd_jax's first step; torch uses it
  first = {"jax": _time(lambda: parity.update(jax=jax_pose.train_step(host)))}
  train_fns, infer_fns = {"jax": lambda: jax_pose.train_step(host)}, {"jax": lambda: jax_pose.infer(host)}
  if torch_runner is not None:
    first["torch"] = _time(lambda: parity.update(
        torch=torch_runner.train_step(host, rope_scale=first_rope_scale)))
    for key in ("loss", "grad_norm"):
      parity[f"rel_{key}_diff"] = abs(parity["jax"][key] / parity["torch"][key] - 1)
    train_fns["torch"] = lambda: torch_runner.train_step(host)
    infer_fns["torch"] = lambda: torch_runner.infer(host)
  config = backbone_config(s)
  flops_train = tr.pose_step_flops(config, s.image_size, s.n_unfrozen) * s.batch
  flops_infer = tr.pose_step_flops(config, s.image_size, s.n_unfrozen, train=False) * s.batch
  train = compare(train_fns, s.warmup - 1, s.repeats)
  infer = compare(infer_fns, s.warmup, s.repeats)
  rows = {}
  for name, times, flops, xla in (("train", train, flops_train, compile_info["xla_flops"]),
                                  ("infer", infer, flops_infer, infer_info["xla_flops"])):
    row = {"flops_per_sample_analytic": flops / s.batch, "flops_per_sample_xla": xla / s.batch}
    for fw, ts in times.items():
      sec = median(ts)
      row[fw] = {"seconds": ts, "samples_per_s": s.batch / sec, "flops_per_s": flops / sec,
                 "fraction_of_peak": flops / sec / peak}
    if "torch" in row:
      row["ratio"] = row["jax"]["samples_per_s"] / row["torch"]["samples_per_s"]
    rows[name] = row
  rows["train"].update(parity=parity, first_step_s=first, compile=compile_info)
  rows["infer"].update(compile=infer_info)
  return rows


# ------------------------------------------------------------------ MANO


def bench_mano(s: Settings, mano_dir: str) -> dict[str, Any]:
  """Row 3: hands/s of jitted mano_forward and smplx's MANO (no grad), per batch size."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax.mano import io as mano_io  # pylint: disable=import-outside-toplevel
  from dd_jax.mano import model as mano_model  # pylint: disable=import-outside-toplevel

  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
  smplx_mano = tr.make_mano(mano_dir)
  ours = mano_io.load_mano(os.path.join(mano_dir, "MANO_RIGHT.pkl"))
  forward = jax.jit(lambda m, betas, pose: mano_model.mano_forward(m, betas, pose))
  rows = {}
  for b in s.mano_batches:
    rng = np.random.default_rng(b)
    betas = rng.standard_normal((b, 10)).astype(np.float32)
    pose = (0.4 * rng.standard_normal((b, 45))).astype(np.float32)
    tb, tp, zeros = torch.from_numpy(betas), torch.from_numpy(pose), torch.zeros(b, 3)
    jb, jp = jax.device_put(betas), jax.device_put(pose)
    compile_s = _time(lambda: jax.block_until_ready(forward(ours, jb, jp)))
    got = forward(ours, jb, jp)
    with torch.no_grad():
      want = smplx_mano(betas=tb, hand_pose=tp, global_orient=zeros, transl=zeros)
    err = float(np.max(np.abs(np.asarray(got.vertices) - want.vertices.numpy())))

    def torch_call():
      with torch.no_grad():
        return smplx_mano(betas=tb, hand_pose=tp, global_orient=zeros, transl=zeros)

    def jax_call():
      return jax.block_until_ready(forward(ours, jb, jp))

    # Calls per repeat sized so that each repeat lasts about mano_seconds.
    calls = {name: max(1, int(s.mano_seconds / max(1e-6, _time(fn))))
             for name, fn in (("torch", torch_call), ("jax", jax_call))}
    times = compare({name: (lambda fn=fn, n=calls[name]: [fn() for _ in range(n)])
                     for name, fn in (("torch", torch_call), ("jax", jax_call))},
                    1, s.repeats)
    row = {"first_call_s": compile_s, "max_abs_vertex_diff_m": err}
    for name, ts in times.items():
      row[name] = {"hands_per_s": b * calls[name] / median(ts), "calls_per_repeat": calls[name]}
    row["ratio"] = row["jax"]["hands_per_s"] / row["torch"]["hands_per_s"]
    rows[str(b)] = row
  return rows


def bench_mano_sync(s: Settings, mano_dir: str) -> dict[str, Any]:
  """Row 3b: batch 1 again in a child process with synchronous CPU dispatch (the setting
  README recommends for per-hand calls; it must be set before JAX's CPU client starts)."""
  return run_child("mano_sync", dataclasses.replace(s, mano_batches=(1,)), mano_dir)


def run_child(kind: str, s: Settings, mano_dir: str) -> dict[str, Any]:
  """This script as a child process (`--_child kind`); returns the JSON it prints last."""
  cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--_settings",
         json.dumps(dataclasses.asdict(s)), "--_mano_dir", mano_dir]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ input pipeline


def synthetic_jpegs(size: int, count: int = 4, seed: int = 0) -> list[bytes]:
  """JPEGs (quality 95) with photo-like content: smooth shading, edges and sensor noise."""
  import cv2  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    low = cv2.resize(rng.uniform(40, 220, (8, 8, 3)).astype(np.float32), (size, size),
                     interpolation=cv2.INTER_CUBIC)
    mid = cv2.resize(rng.normal(0, 20, (size // 8, size // 8, 3)).astype(np.float32),
                     (size, size), interpolation=cv2.INTER_LINEAR)
    image = np.clip(low + mid + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out.append(data.tobytes())
  return out


def bench_pipeline(s: Settings) -> dict[str, Any]:
  """Row 4: per-sample decode + augment both images + resize + normalise, one process."""
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax.data import samples, store  # pylint: disable=import-outside-toplevel

  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
  jpegs = synthetic_jpegs(s.crop_size)
  augment, finalize = samples.Augment(), samples.Finalize(s.out_size)
  transform = tr.TorchvisionStyleTransform(s.out_size, generator=torch.Generator().manual_seed(0))
  n = s.pipeline_samples

  def ours():
    for i in range(n):
      sample = {"img": store.decode_image(jpegs[i % 4], "img", i),
                "base_img": store.decode_image(jpegs[(i + 1) % 4], "base", i), "valid": True}
      sample = finalize.map(augment.random_map(sample, np.random.default_rng(i)))
      assert sample["img"].shape == (s.out_size, s.out_size, 3)

  def original():
    for i in range(n):
      img, _ = tr.original_sample(jpegs[i % 4], jpegs[(i + 1) % 4], transform)
      assert img.shape == (3, s.out_size, s.out_size)

  times = compare({"torch": original, "jax": ours}, 1, s.repeats)
  row = {"crop_size": s.crop_size, "out_size": s.out_size}
  for name, ts in times.items():
    row[name] = {"samples_per_s": n / median(ts)}
  row["ratio"] = row["jax"]["samples_per_s"] / row["torch"]["samples_per_s"]
  return row


# ------------------------------------------------------------------ memory (child processes)


def peak_rss_mib() -> float:
  """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
  fork + exec, so a child would report at least its parent's size."""
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_memory(framework: str, s: Settings, mano_dir: str) -> dict[str, Any]:
  """Peak RSS of a process that builds the pose model and runs `memory_steps` train steps."""
  host = host_batch(s)
  if framework == "torch":
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    set_threads(s.threads or cpu_threads())
    after_import = peak_rss_mib()
    pose = torch_pose(s, mano_dir)
  else:
    import jax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    after_import = peak_rss_mib()
    pose = JaxPose(dataclasses.replace(s, backbone_fields={}))
    pose.compile_train_step(host)  # as the trainer: compiled on the first batch, then run
  for _ in range(s.memory_steps):
    pose.train_step(host)
  leaked = [m for m in ("torch", "jax") if m != framework and m in sys.modules]
  return {"peak_rss_mib": peak_rss_mib(), "after_import_mib": after_import, "other_framework": leaked}


def bench_memory(s: Settings, mano_dir: str) -> dict[str, Any]:
  child = dataclasses.replace(s, backbone_fields=dataclasses.asdict(backbone_config(s)))
  row = {framework: run_child(framework, child, mano_dir) for framework in ("torch", "jax")}
  row["ratio"] = row["jax"]["peak_rss_mib"] / row["torch"]["peak_rss_mib"]
  return row


# ------------------------------------------------------------------ compile time


def compile_time(s: Settings, depth: int, n_unfrozen: int) -> dict[str, float]:
  """Trace+lower and compile seconds of the train step on abstract inputs (nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import train_state  # pylint: disable=import-outside-toplevel
  config = pose_config(s, depth=depth, n_unfrozen=n_unfrozen)
  setup = train_state.build(config, one_device_mesh(), abstract=True)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host_batch(s))
  start = time.perf_counter()
  lowered = setup.train_step.lower(setup.state, setup.frozen, batch, setup.task.consts)
  traced = time.perf_counter()
  lowered.compile()
  return {"depth": depth, "n_unfrozen": n_unfrozen, "frozen_blocks": depth - n_unfrozen,
          "trace_lower_s": traced - start, "compile_s": time.perf_counter() - traced}


def bench_compile(s: Settings) -> dict[str, Any]:
  """Row 6: compile time vs frozen blocks (depth grows at fixed n_unfrozen) and vs n_unfrozen."""
  depth = backbone_config(s).depth
  by_depth = [compile_time(s, d, min(s.n_unfrozen, d)) for d in s.compile_depths]
  by_unfrozen = [compile_time(s, depth, n) for n in s.compile_unfrozen]
  # Seconds per extra frozen block between consecutive depths: roughly constant = linear.
  slopes = [(b["trace_lower_s"] + b["compile_s"] - a["trace_lower_s"] - a["compile_s"])
            / max(1, b["frozen_blocks"] - a["frozen_blocks"])
            for a, b in zip(by_depth, by_depth[1:])]
  return {"by_depth": by_depth, "by_unfrozen": by_unfrozen, "seconds_per_frozen_block": slopes}


# ------------------------------------------------------------------ HaMeR


# The HaMeR row's networks: the released ViT-H/16 + 6-layer decoder, a ViT-S-sized one that
# fits a CPU run, and the tests' tiny one. (dd_jax custom-config fields; the torch reference
# takes the same sizes.)
HAMER_SIZES = {
    "vith": {},
    "small": {"backbone": dict(dim=384, depth=12, num_heads=6, ffn_hidden=1536),
              "head": dict(dim=512, depth=6, heads=8, dim_head=64, mlp_dim=512)},
    "tiny": {"backbone": dict(dim=64, depth=2, num_heads=2, ffn_hidden=256),
             "head": dict(dim=64, depth=2, heads=2, dim_head=16, mlp_dim=64)},
}


def hamer_config(size: str):
  from dd_jax.models import hamer  # pylint: disable=import-outside-toplevel
  if size not in HAMER_SIZES:
    raise ValueError(f"unknown HaMeR size {size!r}; known: {sorted(HAMER_SIZES)}")
  return hamer.get_config("custom", **HAMER_SIZES[size]) if HAMER_SIZES[size] else \
      hamer.get_config()


def hamer_flops_per_image(config) -> float:
  """Matmul FLOPs of one hand (2 per multiply-add): patch embedding, each ViT block
  (24 T D^2 + 4 T^2 D over T patch tokens), the decoder (self-attention and feed-forward on one
  token, cross-attention k, v over the T context tokens) and the read-outs. MANO is < 0.1%."""
  b, h = config.backbone, config.head
  t = b.grid[0] * b.grid[1]
  d, inner = b.dim, h.heads * h.dim_head
  backbone = 2 * t * 3 * b.patch_size ** 2 * d + b.depth * (
      2 * t * (3 * d * d + d * d + 2 * d * b.ffn_hidden) + 4 * t * t * d)
  per_layer = (2 * (3 * h.dim * inner + inner * h.dim)  # self-attention (1 token)
               + 2 * t * d * 2 * inner + 2 * h.dim * inner + 4 * t * inner  # cross-attention
               + 2 * inner * h.dim + 2 * 2 * h.dim * h.mlp_dim)  # its output, feed-forward
  readout = 2 * h.dim * (96 + 10 + 3)
  return float(backbone + h.depth * per_layer + readout)


def bench_hamer(s: Settings, mano_dir: str) -> dict[str, Any]:
  """HaMeR forward (network + MANO keypoints + crop camera), images/s per batch size, dd_jax's
  compiled predictor against the PyTorch reference with the same random weights."""
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import parallel  # pylint: disable=import-outside-toplevel
  from dd_jax.convert import hamer as convert_hamer  # pylint: disable=import-outside-toplevel
  from dd_jax.mano import io as mano_io  # pylint: disable=import-outside-toplevel
  from dd_jax.priors import predictor as predictor_lib  # pylint: disable=import-outside-toplevel
  config = hamer_config(s.hamer_size)
  mesh = one_device_mesh()
  torch_model = None
  if s.jax_only:
    model = predictor_lib.build_model(config, _random_hamer_params(config), mesh,
                                      dtype=jax.numpy.dtype(s.dtype))
  else:
    import torch  # pylint: disable=import-outside-toplevel

    from reference import hamer as ref  # pylint: disable=import-outside-toplevel
    b, hd = config.backbone, config.head
    torch_model = ref.HAMER(mano_dir, ref.mean_params(), backbone=dict(
        dim=b.dim, depth=b.depth, num_heads=b.num_heads), head=dict(
            dim=hd.dim, depth=hd.depth, heads=hd.heads, dim_head=hd.dim_head,
            mlp_dim=hd.mlp_dim)).eval()
    ref.randomise(torch_model, 0)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = predictor_lib.build_model(config, convert_hamer.state_dict_to_params(state, config),
                                      mesh)
    del state
  mano = mano_io.load_mano(os.path.join(mano_dir, "MANO_RIGHT.pkl"))
  predictor = predictor_lib.HamerPredictor(model, mano, mesh)
  flops = hamer_flops_per_image(config)
  rows: dict[str, Any] = {"size": s.hamer_size, "config": dataclasses.asdict(config),
                          "flops_per_image": flops}
  for batch in s.hamer_batches:
    crops = np.random.default_rng(batch).standard_normal((batch, 256, 256, 3), np.float32)
    device_crops = parallel.global_batch(mesh, {"crops": crops})["crops"]
    start = time.perf_counter()
    predictor.compile(batch)
    compile_s = time.perf_counter() - start
    fns = {"jax": lambda: jax.block_until_ready(predictor(device_crops))}
    row: dict[str, Any] = {"compile_s": compile_s}
    if torch_model is not None:
      nchw = torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())
      got = predictor.predict(crops)
      want = torch_model(nchw)
      row["max_abs_hand_pose_diff"] = float(np.abs(
          got["hand_pose"] - want["pred_mano_params"]["hand_pose"].numpy()).max())
      fns["torch"] = lambda: torch_model(nchw)
    repeats = s.repeats if batch * flops < 2e12 else 2
    for fw, ts in compare(fns, 1, repeats).items():
      sec = median(ts)
      row[fw] = {"seconds": ts, "images_per_s": batch / sec, "flops_per_s": batch * flops / sec}
    if "torch" in row:
      row["ratio"] = row["jax"]["images_per_s"] / row["torch"]["images_per_s"]
    rows[str(batch)] = row
  return rows


def _random_hamer_params(config) -> dict:
  """Random weights for a jax-only run (no torch): fan-in scaled, every path exercised."""
  from dd_jax.convert import hamer as convert_hamer  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  params: dict = {}
  for path, shape in convert_hamer.expected_shapes(config).items():
    scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = (scale * rng.standard_normal(shape)).astype(np.float32)
  return params


def bench_end_to_end(s: Settings) -> dict[str, Any]:
  """Raw frames end to end, as `python -m dd_jax.predict --frames` runs them (batch 1): the
  synthetic set's distorted frames, HaMeR of hamer_size (random weights, its output layers
  scaled down so it sees a mean hand of a usable size), the infer row's pose network, MANO.
  frames/s after a warm-up pass, and the share of each stage; "glue" is the time outside the
  decode and the compiled HaMeR and network calls (the issue's goal: at most 15%)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from dd_jax import inference  # pylint: disable=import-outside-toplevel
  from dd_jax.data import egodorsal  # pylint: disable=import-outside-toplevel
  from dd_jax.full_frames import sequence  # pylint: disable=import-outside-toplevel
  from dd_jax.models import deltadorsal  # pylint: disable=import-outside-toplevel
  from dd_jax.priors import predictor as predictor_lib  # pylint: disable=import-outside-toplevel
  from dd_jax.synthetic import dataset as synthetic  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp(prefix="dd_jax_bench_e2e_")
  data_dir = os.path.join(root, "set")
  synthetic.make_synthetic_dataset(data_dir, participants=1, trials=1, frames=s.e2e_frames,
                                   bases=1)
  index = egodorsal.load_index(data_dir)
  frames = egodorsal.select_frames(index, "all")
  trial = index.trials[frames[0].trial_id]
  folder = os.path.join(root, "frames")
  os.makedirs(folder)
  for frame in frames:
    shutil.copy(frame.img_path, folder)
  config = pose_config(s)
  network = inference.from_model(config, deltadorsal.build_model(config, rngs=nnx.Rngs(0)),
                                 source="random weights")
  hamer_cfg = hamer_config(s.hamer_size)
  params = _random_hamer_params(hamer_cfg)
  head = params["mano_head"]
  for name in ("decpose", "decshape", "deccam"):
    head[name] = {k: 0.05 * v for k, v in head[name].items()}
  head["init_hand_pose"] = np.tile(np.float32([1, 0, 0, 0, 1, 0]), (1, 16))
  head["init_cam"] = np.float32([[3.5, 0.0, 0.0]])
  mesh = one_device_mesh()
  hamer = predictor_lib.HamerPredictor(predictor_lib.build_model(hamer_cfg, params, mesh),
                                       network.mano, mesh)
  pipeline = inference.Pipeline(network, hamer)
  settings = sequence.Settings(track=False, overlay=False)
  base = index.bases[trial.p_id][0].img_path
  run = lambda: sequence.run(pipeline, folder, base, os.path.join(root, "out"), K=trial.K,
                             d=trial.d, settings=settings, echo=lambda _: None)
  run()  # compiles
  pipeline.timings = dict.fromkeys(pipeline.timings, 0.0)
  summary = run()
  shutil.rmtree(root, ignore_errors=True)
  seconds = summary["seconds"]
  t = summary["stage_seconds"]
  shares = {"decode": t["decode"], "hamer_compiled": t["prior_compiled"],
            "network_compiled": t["network_compiled"]}
  shares["glue"] = seconds - sum(shares.values())
  return {"frames": summary["frames"], "predicted": summary["predicted"],
          "hamer_size": s.hamer_size, "backend": jax.default_backend(), "seconds": seconds,
          "frames_per_s": summary["frames_per_s"], "stage_seconds": t,
          "share": {k: v / seconds for k, v in shares.items()}}


# ------------------------------------------------------------------ report


def machine_info(jax_only: bool = False) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  isa = kernels.cpu_facts()
  info = {"cpu": isa["cpu"], "isa": isa, "dinov3_impl": kernels.resolve_dinov3_impl(),
          "cores_usable": cpu_threads(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "jax_device": str(jax.devices()[0].device_kind), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "loadavg_start": os.getloadavg()}
  if not jax_only:
    import torch  # pylint: disable=import-outside-toplevel
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability())
  return info


def fmt_rate(x: float, unit: str) -> str:
  return f"{x:,.1f} {unit}" if x < 100 else f"{x:,.0f} {unit}"


def header(results: dict[str, Any]) -> list[str]:
  """The lines above the table: CPU and ISA facts, and the kernels of the step's dots."""
  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  machine, lines = results.get("machine", {}), []
  if "isa" in machine:
    torch_isa = (f"; torch kernels {machine['torch_cpu_capability']}"
                 if machine.get("torch_cpu_capability") else "")
    lines.append(f"CPU: {kernels.describe_cpu(machine['isa'])}{torch_isa}; "
                 f"dd_jax DINOv3 implementation {machine.get('dinov3_impl', '?')}")
  for name, what in (("train", "train step"), ("infer", "inference")):
    found = results.get("rows", {}).get(name, {}).get("compile", {}).get("dot_kernels")
    if found:
      lines.append(f"XLA dots, {what}: {kernels.describe_dot_kernels(found)}")
  return lines + [""] if lines else []


def table(results: dict[str, Any]) -> str:
  """The README table: one line per measurement with dd_jax, PyTorch, ratio and the goal."""
  lines = header(results) + ["| row | dd_jax | PyTorch | ratio | goal |", "|---|---|---|---|---|"]
  rows = results["rows"]
  for name, title, goal in (("train", "pose train step", ">= 1.15x, >= 80% of peak"),
                            ("infer", "pose inference", ">= 1.2x, >= 80% of peak")):
    if name in rows:
      r = rows[name]
      cell = lambda fw, r=r: (f"{r[fw]['samples_per_s']:.2f} samples/s "
                              f"({100 * r[fw]['fraction_of_peak']:.0f}%)" if fw in r else "-")
      ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
      lines.append(f"| {title} ({r['flops_per_sample_analytic'] / 1e9:.3g} GFLOP/sample) | "
                   f"{cell('jax')} | {cell('torch')} | {ratio} | {goal} |")
  mano = [(f"batch {b}", r) for b, r in rows.get("mano", {}).items()]
  mano += [("batch 1, synchronous CPU dispatch", r) for r in rows.get("mano_sync", {}).values()]
  for what, r in mano:
    lines.append(f"| MANO forward, {what} (first call {r['first_call_s']:.1f} s) | "
                 f"{fmt_rate(r['jax']['hands_per_s'], 'hands/s')} | "
                 f"{fmt_rate(r['torch']['hands_per_s'], 'hands/s')} (smplx) | {r['ratio']:.1f}x | "
                 ">= 5x at 1 and 1024; compile < 10 s |")
  if "pipeline" in rows:
    r = rows["pipeline"]
    lines.append(f"| input pipeline ({r['crop_size']}px JPEG pair -> {r['out_size']}px) | "
                 f"{r['jax']['samples_per_s']:.1f} samples/s | {r['torch']['samples_per_s']:.1f} "
                 f"samples/s (torchvision emulated) | {r['ratio']:.2f}x | >= 2x |")
  if "input" in rows:
    lines += bench_input.table_lines(rows["input"])
  if "memory" in rows:
    r = rows["memory"]
    lines.append(f"| peak RSS, train step | {r['jax']['peak_rss_mib']:,.0f} MiB | "
                 f"{r['torch']['peak_rss_mib']:,.0f} MiB | {r['ratio']:.2f}x | <= 1x |")
  if "train" in rows:
    c = rows["train"]["compile"]
    eager = rows["train"]["first_step_s"].get("torch")
    lines.append(f"| first train step compile | {c['trace_lower_s'] + c['compile_s']:.1f} s "
                 f"(trace {c['trace_lower_s']:.1f} + XLA {c['compile_s']:.1f}) | "
                 + (f"first eager step {eager:.1f} s" if eager else "-") + " | | < 60 s |")
  if "compile" in rows:
    for r in rows["compile"]["by_depth"] + rows["compile"]["by_unfrozen"]:
      lines.append(f"| compile, depth {r['depth']}, {r['n_unfrozen']} unfrozen | "
                   f"{r['trace_lower_s'] + r['compile_s']:.1f} s | | | linear in frozen blocks |")
  if "hamer" in rows:
    r = rows["hamer"]
    gflop = r["flops_per_image"] / 1e9
    for batch, row in r.items():
      if not isinstance(row, dict) or "jax" not in row:
        continue
      torch_cell = (f"{fmt_rate(row['torch']['images_per_s'], 'images/s')}" if "torch" in row
                    else "-")
      ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
      lines.append(f"| HaMeR forward ({r['size']}, {gflop:.3g} GFLOP/image), batch {batch} | "
                   f"{fmt_rate(row['jax']['images_per_s'], 'images/s')} "
                   f"({row['jax']['flops_per_s'] / 1e9:.0f} GFLOP/s) | {torch_cell} | {ratio} | "
                   ">= 1.5x |")
  if "e2e" in rows:
    r = rows["e2e"]
    split = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["share"].items())
    lines.append(f"| end to end, raw frames (HaMeR {r['hamer_size']}, batch 1; {split}) | "
                 f"{r['frames_per_s']:.2f} frames/s | - | | glue <= 15% |")
  if "matmul_peak" in results:
    m = results["matmul_peak"]
    lines.append(f"\nmatmul peak ({results['settings']['dtype']} XLA / float32 torch): "
                 + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in m.items())
                 + "; percentages are of the best")
  return "\n".join(lines)


NEEDS_TORCH = ("mano", "pipeline", "input", "memory")


def run(s: Settings, rows: tuple[str, ...], log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the requested rows; returns the results dict (what the JSON file holds)."""
  s.threads = s.threads or cpu_threads()
  if s.jax_only:
    rows = tuple(r for r in rows if r not in NEEDS_TORCH)
  else:
    set_threads(s.threads)
  results: dict[str, Any] = {"machine": machine_info(s.jax_only),
                             "settings": dataclasses.asdict(s), "rows": {}}
  mano_dir = tempfile.mkdtemp(prefix="dd_jax_bench_mano_")
  if not s.jax_only:
    from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel
    tr.make_mano(mano_dir)  # writes the synthetic MANO_RIGHT.pkl the children read
  else:
    from dd_jax.synthetic import hand as synthetic  # pylint: disable=import-outside-toplevel
    synthetic.write_synthetic_mano(os.path.join(mano_dir, "MANO_RIGHT.pkl"), layout="cleaned")
  if {"train", "infer"} & set(rows):
    log("matmul peak ...")
    results["matmul_peak"] = matmul_peak(s.matmul_sizes, dtype=s.dtype, jax_only=s.jax_only)
    log("pose train step and inference ...")
    pose = bench_pose(s, results["matmul_peak"]["best"], mano_dir)
    results["rows"].update({k: v for k, v in pose.items() if k in rows or k == "train"})
    results["matmul_peak_after"] = matmul_peak(s.matmul_sizes, dtype=s.dtype,
                                               jax_only=s.jax_only)
  if "mano" in rows:
    log("MANO ...")
    results["rows"]["mano"] = bench_mano(s, mano_dir)
    if 1 in s.mano_batches:
      results["rows"]["mano_sync"] = bench_mano_sync(s, mano_dir)
  if "pipeline" in rows:
    log("input pipeline ...")
    results["rows"]["pipeline"] = bench_pipeline(s)
  if "input" in rows:
    log("input pipeline at real sizes, one core ...")
    sizes = bench_input.InputSizes(tuple(s.input_frame), s.input_crop, s.out_size,
                                   s.input_samples)
    results["rows"]["input"] = bench_input.run_row(sizes, s.repeats, compare, median)
  if "memory" in rows:
    log("peak memory (child processes) ...")
    results["rows"]["memory"] = bench_memory(s, mano_dir)
  if "compile" in rows:
    log("compile times ...")
    results["rows"]["compile"] = bench_compile(s)
  if "hamer" in rows:
    log(f"HaMeR forward ({s.hamer_size}) ...")
    results["rows"]["hamer"] = bench_hamer(s, mano_dir)
  if "e2e" in rows:
    log(f"end to end, raw frames (HaMeR {s.hamer_size}) ...")
    results["rows"]["e2e"] = bench_end_to_end(s)
  results["machine"]["loadavg_end"] = os.getloadavg()
  return results


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model smoke check")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {ROWS}")
  parser.add_argument("--json", default="bench_results.json", help="output path")
  parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
  parser.add_argument("--threads", type=int, default=0,
                      help="cores for both frameworks (0: all usable); pins the process")
  parser.add_argument("--variant", help="backbone variant, e.g. dinov3_vitl16")
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--batch", type=int)
  parser.add_argument("--n_unfrozen", type=int)
  parser.add_argument("--dtype", help="dd_jax compute dtype (bfloat16 implies --jax_only)")
  parser.add_argument("--jax_only", action="store_true",
                      help="time dd_jax alone (accelerators; rows train, infer, compile, hamer)")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS (e.g. cuda, tpu)")
  parser.add_argument("--hamer_size", choices=sorted(HAMER_SIZES),
                      help="the hamer row's network: vith (released), small, tiny")
  parser.add_argument("--hamer_batches", help="comma list of batch sizes for the hamer row")
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_settings", help=argparse.SUPPRESS)
  parser.add_argument("--_mano_dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", args.platform)
  if args._child:  # pylint: disable=protected-access
    fields = json.loads(args._settings)  # pylint: disable=protected-access
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    if args._child == "mano_sync":  # pylint: disable=protected-access
      import jax  # pylint: disable=import-outside-toplevel
      jax.config.update("jax_cpu_enable_async_dispatch", False)
      set_threads(s.threads or cpu_threads())
      print(json.dumps(bench_mano(s, args._mano_dir)))  # pylint: disable=protected-access
    else:
      print(json.dumps(child_memory(args._child, s, args._mano_dir)))  # pylint: disable=protected-access
    return
  s = Settings.quick() if args.quick else Settings()
  for name in ("variant", "image_size", "batch", "n_unfrozen", "dtype"):
    if getattr(args, name) is not None:
      setattr(s, name, getattr(args, name))
  if args.variant:
    s.custom = {}
  if args.hamer_size:
    s.hamer_size = args.hamer_size
  if args.hamer_batches:
    s.hamer_batches = tuple(int(b) for b in args.hamer_batches.split(","))
  s.jax_only = args.jax_only or s.dtype != "float32" or args.platform != "cpu"
  if args.platform != "cpu":
    s.matmul_sizes = (4096, 8192)  # large enough to reach an accelerator's peak
  s.repeats = args.repeats or s.repeats
  pin_cores(args.threads)  # before JAX starts: both frameworks then see the same cores
  s.threads = args.threads
  rows = tuple(r for r in args.rows.split(",") if r)
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown rows {unknown}; known: {ROWS}")
  results = run(s, rows, log=lambda m: print(m, file=sys.stderr, flush=True))
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=float)
  print(table(results))
  m = results["machine"]
  print(f"{m['cpu']} ({m['jax_device']}), {m['cores_usable']} cores, load "
        f"{m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}; jax {m['jax']}"
        + (f", torch {m['torch']}" if "torch" in m else "") + f"; JSON: {args.json}")


if __name__ == "__main__":
  main()
