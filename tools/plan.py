r"""Will it fit? Per-device memory of a training run, from an ahead-of-time compile.

  python tools/plan.py --config configs/pose.py:vitl16 --config.data.batch_size=96 \
      --devices 8 --memory_gib 80
  python tools/plan.py --config configs/pose.py:vit7b16 --config.mesh.fsdp=True \
      --config.model.backbone.frozen_dtype=bfloat16 --devices 16 --memory_gib 16   # v5e-16

Nothing is allocated: the network, train state and batch are abstract (train_state.build with
abstract=True), and the train step is lowered and compiled for `--devices` devices
(`jax.jit(...).lower(...).compile()`); the compiler's buffer assignment gives the step's
temporaries (activations, gradients, the optimizer's scratch), analytic sizes of the arrays'
shards give the rest. By default the devices are emulated CPU devices, so a laptop plans a pod;
`--backend default` compiles for this machine's own accelerators instead (closer: the CPU
compiler fuses and schedules differently). docs/plan.md says how good the estimate is.

Deep backbones are compiled at reduced depth (the trained blocks plus one and two frozen ones)
and the temporaries extrapolated linearly in the frozen blocks; parameter and optimizer bytes
are always those of the full depth. The largest per-device batch comes from a line through the
temporaries at the config's micro-batch and twice it.

`--measure` instead runs the config's train step on this machine's CPU and reports the growth of
peak resident memory from the compiled program to the end of the steps: what the plan predicts
when the devices are this CPU (tests/test_plan.py holds the two together).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define_flags() -> None:
  """Only when run as a program, so importing this module (tests do) defines no absl flags."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pose.py:vitl16.",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 8, "Devices of the planned mesh (the data axis).")
  flags.DEFINE_float("memory_gib", 80.0, "Memory of one device, GiB.")
  flags.DEFINE_float("usable", 0.9, "Fraction of a device's memory the run may use (on GPUs set "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION to it; JAX preallocates 0.75 by default).")
  flags.DEFINE_enum("backend", "cpu", ["cpu", "default"], "cpu: emulate --devices CPU devices; "
                    "default: compile for this machine's accelerators.")
  flags.DEFINE_bool("full_depth", False, "Compile the whole backbone (slow for deep ones) instead "
                    "of extrapolating from one and two frozen blocks.")
  flags.DEFINE_bool("measure", False, "Run the train step here on CPU and report peak memory.")
  flags.DEFINE_integer("steps", 3, "Train steps of --measure.")
  flags.DEFINE_string("json", None, "Also write the result here.")
  flags.mark_flags_as_required(["config"])


FLAGS = flags.FLAGS

GIB = 2.0**30


# ------------------------------------------------------------------ sizes


def shard_bytes(tree) -> int:
  """Bytes ONE device holds of a pytree of sharded arrays / ShapeDtypeStructs (the largest
  shard of each leaf)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(config, mesh):
  """The train batch the loaders would send, abstract and split over the mesh's data axis."""
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import parallel  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_shapes(config).items()}


def batch_shapes(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  from dd_jax.data import device_augment, samples  # pylint: disable=import-outside-toplevel
  return samples.batch_shapes(config.task, config.data.batch_size, config.data.out_img_size,
                              device_augment.enabled(config.data))


def variant_config(config, *, depth: int | None = None, per_device_batch: int | None = None,
                   devices: int = 1, fsdp: bool | None = None):
  """A copy of `config` with another backbone depth, per-device batch or FSDP setting."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if depth is not None:
      c.model.backbone.custom.depth = depth
    if per_device_batch is not None:
      c.data.batch_size = per_device_batch * devices
    if fsdp is not None:
      c.mesh.fsdp = fsdp
  return c


@dataclasses.dataclass
class Resident:
  """Per-device bytes of the arrays that live through the whole run."""
  trainable: int  # trainable parameters (float32)
  frozen: int  # frozen parameters (model.backbone.frozen_dtype) and buffers
  optimizer: int  # AdamW moments (+ reduce-on-plateau state and step)
  ema: int  # the EMA of the trained weights (optimizer.ema_decay > 0)
  consts: int  # the task's fixed arrays (MANO model, class weights), replicated
  batch_per_sample: int  # one sample of the input batch

  def total(self, per_device_batch: int) -> int:
    return (self.trainable + self.frozen + self.optimizer + self.ema + self.consts
            + self.batch_per_sample * per_device_batch)


def resident_bytes(config, mesh) -> Resident:
  """Analytic per-device sizes of the full-depth run (nothing allocated or compiled)."""
  import jax  # pylint: disable=import-outside-toplevel

  from dd_jax import train_state  # pylint: disable=import-outside-toplevel
  setup = train_state.build(config, mesh, abstract=True)
  state = setup.state
  n = mesh.devices.size
  per_sample = shard_bytes(abstract_batch(variant_config(config, per_device_batch=1, devices=n),
                                          mesh))
  return Resident(trainable=shard_bytes(state["params"]), frozen=shard_bytes(setup.frozen),
                  optimizer=shard_bytes({k: v for k, v in state.items()
                                         if k not in ("params", "ema")}),
                  ema=shard_bytes(state.get("ema", {})),
                  consts=sum(x.nbytes for x in jax.tree.leaves(setup.task.consts)),
                  batch_per_sample=per_sample)


def compile_memory(config, mesh) -> dict[str, int]:
  """The compiler's per-device buffer sizes of the train step for `config` on `mesh`."""
  from dd_jax import host, train_state  # pylint: disable=import-outside-toplevel
  setup = train_state.build(config, mesh, abstract=True)
  compiled = setup.train_step.lower(setup.state, setup.frozen, abstract_batch(config, mesh),
                                    setup.task.consts).compile()
  m = compiled.memory_analysis()
  del compiled
  host.release_freed_host_memory()
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
          "code": m.generated_code_size_in_bytes}


# ------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Estimate:
  """Per-device memory of a config's train step as a function of the per-device batch: the
  resident arrays' exact sizes plus the compiler's temporaries, a line in the micro-batch."""
  config: Any
  devices: int
  resident: Resident
  temp_base: float  # temporaries at micro-batch 0 (extrapolated to the full depth)
  temp_per_sample: float  # temporaries per sample of a micro-batch
  temp_per_frozen_block: float
  out_extra: int  # outputs not aliased to the donated train state (the metrics)
  compiled: dict[str, dict[str, int]]  # the compiles behind the lines

  @property
  def per_device_batch(self) -> int:
    return self.config.data.batch_size // self.devices

  def temporaries(self, micro_batch: float) -> float:
    return max(0.0, self.temp_base + self.temp_per_sample * micro_batch)

  def peak(self, per_device_batch: int, accumulate_steps: int | None = None) -> float:
    k = accumulate_steps or self.config.optimizer.accumulate_steps
    return (self.resident.total(per_device_batch) + self.temporaries(per_device_batch / k)
            + self.out_extra)


def estimate(config, mesh, full_depth: bool = False, log=print) -> Estimate:
  """Compiles `config`'s train step on `mesh` at two micro-batch sizes (and, for a deep
  backbone, at one and two frozen blocks instead of all of them); nothing is allocated."""
  from dd_jax.models import deltadorsal  # pylint: disable=import-outside-toplevel
  n = mesh.devices.size
  k = config.optimizer.accumulate_steps
  if config.data.batch_size % (n * k):
    raise ValueError(f"data.batch_size={config.data.batch_size} is not a multiple of {n} devices "
                     f"x optimizer.accumulate_steps={k}")
  micro = config.data.batch_size // (n * k)
  depth = deltadorsal.backbone_config_from(config).depth
  unfrozen = min(config.model.backbone.n_unfrozen_blocks, depth)
  # Temporaries at (depth d, micro-batch m): the config's micro-batch and twice it (a line in m;
  # below a few samples per device fixed scratch bends it up); with reduced depth also one more
  # frozen block (a line in depth).
  d1 = depth if full_depth or depth - unfrozen <= 2 else unfrozen + 1
  m2 = 2 * micro
  wanted = [(d1, micro), (d1, m2)] + ([(d1 + 1, micro)] if d1 < depth else [])
  points = {}
  for d, m in wanted:
    log(f"compiling depth {d}, micro-batch {m} per device ...")
    points[(d, m)] = compile_memory(
        variant_config(config, depth=d if d != depth else None, per_device_batch=m * k,
                       devices=n), mesh)
  at = lambda d, m: points[(d, m)]["temp"]
  per_block = at(d1 + 1, micro) - at(d1, micro) if d1 < depth else 0
  per_sample = (at(d1, micro) - at(d1, m2)) / (micro - m2)
  out = points[(d1, micro)]
  return Estimate(config, n, resident_bytes(config, mesh),
                  temp_base=at(d1, micro) - per_sample * micro + per_block * (depth - d1),
                  temp_per_sample=per_sample, temp_per_frozen_block=per_block,
                  out_extra=max(0, out["output"] - out["alias"]),
                  compiled={f"depth{d}_micro{m}": v for (d, m), v in points.items()})


def plan(e: Estimate, memory_bytes: float, usable: float = 0.9) -> dict[str, Any]:
  """Whether `e`'s run fits `usable` x `memory_bytes` per device, the largest per-device batch
  that does, and what to change when it does not (FSDP, accumulation)."""
  config, r = e.config, e.resident
  k = config.optimizer.accumulate_steps
  per_device = e.per_device_batch
  budget = usable * memory_bytes
  temporaries = e.temporaries(per_device / k)
  total = e.peak(per_device)
  # Largest per-device batch (a multiple of k) with this accumulation.
  slope = r.batch_per_sample + e.temp_per_sample / k
  room = budget - r.total(0) - e.out_extra - e.temp_base
  largest = int(room // slope) // k * k if room > 0 and slope > 0 else 0
  advice = []
  if total > budget:
    if r.total(0) + e.out_extra + e.temp_base > budget:
      advice.append("the parameters and optimizer state alone exceed the memory: "
                    + ("set --config.mesh.fsdp=True" if not config.mesh.fsdp else
                       "more devices, or --config.model.backbone.frozen_dtype=bfloat16"))
    else:
      fitting = [a for a in range(k + 1, per_device + 1)
                 if per_device % a == 0 and e.peak(per_device, a) <= budget]
      if fitting:
        advice.append(f"set --config.optimizer.accumulate_steps={fitting[0]} (needs "
                      f"{e.peak(per_device, fitting[0]) / GIB:.3g} GiB per device)")
      else:
        advice.append("no accumulation of this per-device batch fits: more devices, a smaller "
                      "batch" + ("" if config.mesh.fsdp else ", or --config.mesh.fsdp=True"))
  return {
      "devices": e.devices, "memory_gib": memory_bytes / GIB, "usable": usable,
      "global_batch": config.data.batch_size, "per_device_batch": per_device,
      "accumulate_steps": k, "fsdp": bool(config.mesh.fsdp),
      "variant": config.model.backbone.variant, "image_size": config.data.out_img_size,
      "bytes": {"trainable_params": r.trainable, "frozen_params": r.frozen,
                "optimizer": r.optimizer, "ema": r.ema, "consts": r.consts,
                "batch": r.batch_per_sample * per_device, "gradients": r.trainable,
                "activations": max(0.0, temporaries - r.trainable), "temporaries": temporaries,
                "total": total},
      "compiled": e.compiled, "temp_per_sample": e.temp_per_sample,
      "temp_per_frozen_block": e.temp_per_frozen_block,
      "fits": total <= budget, "largest_per_device_batch": largest, "advice": advice,
  }


def table(r: dict[str, Any]) -> str:
  b = r["bytes"]
  rows = [("trainable parameters (f32)", b["trainable_params"]),
          ("frozen parameters", b["frozen_params"]), ("optimizer state", b["optimizer"]),
          ("EMA", b["ema"]), ("task constants (MANO)", b["consts"]), ("input batch", b["batch"]),
          ("gradients (f32, in the temporaries)", b["gradients"]),
          ("activations and other temporaries", b["activations"])]
  lines = [f"| per device ({r['devices']} devices, global batch {r['global_batch']}, "
           f"{r['per_device_batch']} per device, accumulate {r['accumulate_steps']}, "
           f"fsdp {r['fsdp']}) | GiB |", "|---|---:|"]
  lines += [f"| {name} | {v / GIB:.2f} |" for name, v in rows]
  lines.append(f"| **total** | **{b['total'] / GIB:.2f}** of {r['memory_gib']:g} "
               f"(usable {r['usable'] * r['memory_gib']:.3g}) |")
  verdict = "fits" if r["fits"] else "does NOT fit"
  lines.append(f"\n{verdict}; largest per-device batch that fits: "
               f"{r['largest_per_device_batch']}")
  lines += [f"advice: {a}" for a in r["advice"]]
  return "\n".join(lines)


# ------------------------------------------------------------------ measured


def _vm(field: str) -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def measure(config, mesh, steps: int = 3) -> dict[str, Any]:
  """Runs `steps` train steps of `config` on `mesh` (this machine's CPU devices) and returns the
  peak resident memory above the moment the step was compiled: arrays, temporaries and the
  allocator's overheads, all devices together (they share this process's memory)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from dd_jax import host, parallel, train_state  # pylint: disable=import-outside-toplevel
  abstract = train_state.build(config, mesh, abstract=True)
  compiled = abstract.train_step.lower(abstract.state, abstract.frozen,
                                       abstract_batch(config, mesh),
                                       abstract.task.consts).compile()
  host.release_freed_host_memory()
  before = _vm("VmRSS")
  setup = train_state.build(config, mesh)
  rng = np.random.default_rng(0)
  local = {k: (rng.integers(0, 256, s, np.uint8) if np.dtype(d) == np.uint8 else
               np.ones(s, d) if k == "valid" else np.zeros(s, d) if k != "img"
               else rng.standard_normal(s).astype(d))
           for k, (s, d) in batch_shapes(config).items()}
  local["base_img"] = local["img"]
  batch = parallel.global_batch(mesh, local)
  host.release_freed_host_memory()
  arrays = _vm("VmRSS") - before
  with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
    f.write("5")  # resets VmHWM to the current resident size
  state = setup.state
  for _ in range(steps):
    state, metrics = compiled(state, setup.frozen, batch, setup.task.consts)
  jax.block_until_ready((state, metrics))
  return {"peak_bytes": _vm("VmHWM") - before, "arrays_bytes": arrays,
          "devices": mesh.devices.size, "steps": steps,
          "loss_finite": bool(np.isfinite(np.asarray(metrics["loss"])))}


# ------------------------------------------------------------------ command line


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.backend == "cpu" or FLAGS.measure:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  from dd_jax import default_config, parallel  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  default_config.check(config)
  if config.data.augment_on_device is None and not FLAGS.measure:
    with config.unlocked():
      config.data.augment_on_device = True  # what an accelerator run does by default
  if len(jax.devices()) < FLAGS.devices:
    raise app.UsageError(f"--devices {FLAGS.devices}: this backend has {len(jax.devices())}")
  mesh = parallel.make_mesh(jax.devices()[:FLAGS.devices])
  if FLAGS.measure:
    result = measure(config, mesh, FLAGS.steps)
    print(f"measured peak above the compiled step: {result['peak_bytes'] / GIB:.3f} GiB "
          f"({result['devices']} CPU devices together; arrays {result['arrays_bytes'] / GIB:.3f})")
  else:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result = plan(estimate(config, mesh, FLAGS.full_depth, log), FLAGS.memory_gib * GIB,
                  FLAGS.usable)
    print(table(result))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
