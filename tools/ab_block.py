"""A/B of the ViT block's hand-written backward passes and of its matmul forms, against PyTorch.

One process, interleaved (A B C ..., then reversed, ...): a one-block DINOv3 (patch embedding,
block, final norm) forward + backward, dd_jax with each hand-written VJP of dinov3.py replaced
by plain autodiff of the same forward (layer_norm, attention, gelu_dense; 'autodiff_all' all
three), and transformers' DINOv3 with the same shapes; then the block's matmuls one by one in
the three forms a train step uses (A @ B forward, A @ B^T input gradients, A^T @ B weight
gradients), XLA against torch.mm. Every compiled program's dots are listed by the library that
runs them (dd_jax.kernels.dot_kernels). Times are CPU seconds per call of this process (which
load from other processes does not inflate, unlike wall-clock time) and wall seconds, min and
median over the repeats.

  python tools/ab_block.py                         # this machine's ISA
  python tools/ab_block.py --emulate_avx2          # XLA, torch, MKL and oneDNN capped to AVX2
  python tools/ab_block.py --variants custom_vjp,autodiff --skip dots --json ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# Caps an AVX2-only machine would have; they must be in the environment before JAX and torch
# start. XLA's cap reaches its LLVM-emitted code and its own dots, not YNNPACK's kernels, which
# choose their ISA from CPUID (see docs/benchmarks.md).
AVX2_CAPS = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_time(fn) -> tuple[float, float]:
  start_cpu, start_wall = time.process_time(), time.perf_counter()
  fn()
  return time.process_time() - start_cpu, time.perf_counter() - start_wall


def interleave(fns: dict, rounds: int, per_round: int) -> dict[str, list[tuple[float, float]]]:
  """(cpu s, wall s) of each call; each round runs every function once untimed then
  `per_round` times timed, in alternating order."""
  for fn in fns.values():
    fn()
  out: dict[str, list] = {name: [] for name in fns}
  names = list(fns)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      fns[name]()
      out[name].extend(cpu_time(fns[name]) for _ in range(per_round))
  return out


def summary(times: list[tuple[float, float]]) -> dict[str, float]:
  cpu, wall = [t[0] for t in times], [t[1] for t in times]
  return {"cpu_min_s": min(cpu), "cpu_median_s": statistics.median(cpu), "wall_min_s": min(wall),
          "wall_median_s": statistics.median(wall)}


def block_programs(config, batch: int, image_size: int, only=()):
  """name -> zero-argument callable running one forward+backward, and name -> dot kernels."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel

  from reference import deltadorsal as tr  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
  side = image_size // config.patch_size
  weights = rng.standard_normal((batch, side, side, config.dim)).astype(np.float32)
  plain = {
      "layer_norm": lambda x, s, b, eps, dt: dinov3._layer_norm_fwd(x, s, b, eps, dt)[0],  # pylint: disable=protected-access
      "attention": lambda q, k, v: dinov3._attention_forward(q, k, v)[0],  # pylint: disable=protected-access
      "gelu_dense": lambda h, k, b, dt: dinov3._dense(dinov3.gelu(h.astype(dt)), k, b, dt),  # pylint: disable=protected-access
  }
  # name -> (implementation, its hand-written VJPs replaced by autodiff of the same forward)
  variants = {"custom_vjp": ("custom_vjp", ()), "autodiff": ("autodiff", ()),
              "custom_vjp-layer_norm": ("custom_vjp", ("layer_norm",)),
              "custom_vjp-attention": ("custom_vjp", ("attention",)),
              "custom_vjp-gelu_dense": ("custom_vjp", ("gelu_dense",)),
              "custom_vjp-all": ("custom_vjp", tuple(plain))}
  if only:
    variants = {k: v for k, v in variants.items() if k in only}
  fns, dots = {}, {}
  for name, (impl, replaced) in variants.items():
    saved = {key: getattr(dinov3, key) for key in plain}
    try:
      for key in replaced:
        setattr(dinov3, key, plain[key])
      model = dinov3.DinoV3(config, rngs=nnx.Rngs(0), impl=impl)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss(p, x, w, graphdef=graphdef, rest=rest):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x) * w)

      step = jax.jit(jax.grad(loss))
      compiled = step.lower(params, images, weights).compile()  # traced with the patch
    finally:
      for key, fn in saved.items():
        setattr(dinov3, key, fn)
    dots[name] = kernels.dot_kernels(compiled.as_text())
    fns[name] = (lambda c=compiled, p=params: jax.block_until_ready(c(p, images, weights)))
  torch_model = tr.Backbone(config).train()
  timages = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  tweights = torch.from_numpy(weights.transpose(0, 3, 1, 2).copy())

  def torch_step():
    torch_model.zero_grad(set_to_none=True)
    (torch_model(timages) * tweights).sum().backward()

  fns["torch"] = torch_step
  return fns, dots


def dot_programs(tokens: int, dim: int, hidden: int):
  """The block's dense matmuls in their three train-step forms, XLA and torch.mm."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  fns, flops, dots = {}, {}, {}
  for label, k, n in (("qkv", dim, 3 * dim), ("fc1", dim, hidden), ("fc2", hidden, dim)):
    x = rng.standard_normal((tokens, k)).astype(np.float32)  # activations (rows, in)
    w = rng.standard_normal((k, n)).astype(np.float32)  # kernel (in, out)
    g = rng.standard_normal((tokens, n)).astype(np.float32)  # output cotangent (rows, out)
    forms = {"A@B": (lambda a, b: a @ b, x, w, lambda a, b: torch.mm(a, b)),
             "A@B^T": (lambda a, b: a @ b.T, g, w, lambda a, b: torch.mm(a, b.t())),
             "A^T@B": (lambda a, b: a.T @ b, x, g, lambda a, b: torch.mm(a.t(), b))}
    for form, (f, a, b, tf) in forms.items():
      name = f"{label} {form}"
      compiled = jax.jit(f).lower(a, b).compile()
      dots[name] = kernels.dot_kernels(compiled.as_text())
      ja, jb = jax.device_put(a), jax.device_put(b)
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      fns[f"{name} xla"] = lambda c=compiled, ja=ja, jb=jb: c(ja, jb).block_until_ready()
      fns[f"{name} torch"] = lambda tf=tf, ta=ta, tb=tb: tf(ta, tb)
      flops[name] = 2.0 * tokens * k * n
  return fns, flops, dots


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--emulate_avx2", action="store_true", help="cap every library to AVX2")
  parser.add_argument("--threads", type=int, default=1, help="cores (pinned); 0: all usable")
  parser.add_argument("--batch", type=int, default=16, help="images (a train step's 8 pairs)")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--per_round", type=int, default=2)
  parser.add_argument("--skip", default="", help="comma list: block, dots")
  parser.add_argument("--variants", default="", help="comma list of block variants (default all)")
  parser.add_argument("--json", default="ab_block.json")
  args = parser.parse_args(argv)
  if args.emulate_avx2:
    for key, value in AVX2_CAPS.items():
      os.environ[key] = (os.environ.get(key, "") + " " + value).strip() if key == "XLA_FLAGS" else value
  if args.threads and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import torch  # pylint: disable=import-outside-toplevel

  from dd_jax import kernels  # pylint: disable=import-outside-toplevel
  from dd_jax.models import dinov3  # pylint: disable=import-outside-toplevel
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  config = dinov3.get_config("dinov3_vits16", depth=1)
  facts = kernels.cpu_facts()
  results = {"cpu": facts, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "impl": kernels.resolve_dinov3_impl(), "threads": threads,
             "loadavg_start": os.getloadavg(), "settings": vars(args)}
  print(f"CPU: {kernels.describe_cpu(facts)}; torch kernels "
        f"{results['torch_cpu_capability']}; dd_jax impl {results['impl']}; {threads} cores; "
        f"load {os.getloadavg()[0]:.1f}", flush=True)
  skip = set(args.skip.split(","))
  if "block" not in skip:
    fns, dots = block_programs(config, args.batch, args.image_size,
                               [v for v in args.variants.split(",") if v])
    times = interleave(fns, args.rounds, args.per_round)
    results["block"] = {name: dict(summary(ts), dot_kernels=dots.get(name)) for name, ts in times.items()}
    base = results["block"]["torch"]["cpu_min_s"]
    print(f"\none-block DINOv3 forward+backward, batch {args.batch} at {args.image_size}px "
          "(CPU s min / median; wall s min; torch / this = speed ratio)")
    for name, r in results["block"].items():
      print(f"  {name:22s} cpu {r['cpu_min_s']:.3f} / {r['cpu_median_s']:.3f}  wall "
            f"{r['wall_min_s']:.3f}  {base / r['cpu_min_s']:.2f}x torch"
            + (f"  dots: {kernels.describe_dot_kernels(r['dot_kernels'])}" if r["dot_kernels"] else ""),
            flush=True)
  if "dots" not in skip:
    tokens = args.batch * ((args.image_size // config.patch_size) ** 2 + config.num_prefix_tokens)
    fns, flops, dots = dot_programs(tokens, config.dim, config.ffn_hidden)
    times = interleave(fns, args.rounds, args.per_round)
    results["dots"] = {}
    print(f"\nmatmuls at {tokens} rows, GFLOP/s per CPU second (best): XLA (library) vs torch.mm")
    for name, flop in flops.items():
      xla, ref = summary(times[f"{name} xla"]), summary(times[f"{name} torch"])
      results["dots"][name] = {"xla": xla, "torch": ref, "gflop": flop / 1e9,
                               "dot_kernels": dots[name]}
      library = ",".join(dots[name]) or "?"
      print(f"  {name:10s} xla {flop / xla['cpu_min_s'] / 1e9:6.0f} ({library})  torch "
            f"{flop / ref['cpu_min_s'] / 1e9:6.0f}  ratio {ref['cpu_min_s'] / xla['cpu_min_s']:.2f}",
            flush=True)
  results["loadavg_end"] = os.getloadavg()
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else float(o))
  print(f"\nload {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}; "
        f"JSON: {args.json}")


if __name__ == "__main__":
  main()
