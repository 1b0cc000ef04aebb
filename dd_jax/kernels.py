"""What this CPU offers and which XLA:CPU kernels a compiled program's dots use.

`cpu_facts()` reads the CPU model and the ISA extensions that decide XLA:CPU's and PyTorch's
kernels (AVX2, AVX-512, AMX) and any ISA cap set in the environment; `dot_kernels(hlo_text)`
counts the dots of a compiled program by the library that runs them (YNNPACK, XNNPACK, oneDNN,
or XLA's own Eigen/LLVM dots) and their share of the FLOPs. The benchmark records both.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

# Environment variables that cap the ISA a library uses (XLA's flag is inside XLA_FLAGS).
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                     "DNNL_MAX_CPU_ISA")


def parse_cpuinfo(text: str) -> dict[str, Any]:
  """Model name, vendor, family / model numbers and ISA flags of the first CPU in /proc/cpuinfo
  text (x86 'flags' or ARM 'Features'); missing fields are None."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break  # the first processor's block is enough
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  number = lambda key: int(fields[key], 0) if fields.get(key, "").strip().isdigit() else None
  return {"cpu": fields.get("model name") or fields.get("Processor") or "unknown",
          "vendor": fields.get("vendor_id"), "family": number("cpu family"),
          "model": number("model"), "flags": flags}


def _flags_from_numpy() -> set[str]:
  """/proc/cpuinfo-style flag names of the extensions numpy detected at run time (fallback for
  systems without /proc/cpuinfo)."""
  try:
    from numpy._core._multiarray_umath import __cpu_features__  # pylint: disable=import-outside-toplevel
  except ImportError:
    return set()
  names = {"AVX2": "avx2", "AVX512F": "avx512f", "AMX_TILE": "amx_tile"}
  return {flag for key, flag in names.items() if __cpu_features__.get(key)}


def isa_caps(environ=None) -> dict[str, str]:
  """The ISA caps in effect: xla_cpu_max_isa from XLA_FLAGS and the torch / MKL / oneDNN
  variables, name -> value, only those set."""
  environ = os.environ if environ is None else environ
  caps = {}
  match = re.search(r"--xla_cpu_max_isa=(\S+)", environ.get("XLA_FLAGS", ""))
  if match:
    caps["xla_cpu_max_isa"] = match.group(1)
  caps.update({name: environ[name] for name in ISA_CAP_VARIABLES if environ.get(name)})
  return caps


def cpu_facts(cpuinfo_path: str = "/proc/cpuinfo", environ=None) -> dict[str, Any]:
  """CPU model, family/model numbers, AVX2 / AVX-512 / AMX yes or no and the ISA caps in effect.

  'flags_from' says where the flags came from: /proc/cpuinfo, or numpy's run-time detection when
  that file cannot be read.
  """
  try:
    with open(cpuinfo_path, encoding="utf-8") as f:
      info = parse_cpuinfo(f.read())
    source = cpuinfo_path
  except OSError:
    import platform  # pylint: disable=import-outside-toplevel
    info = {"cpu": platform.processor() or "unknown", "vendor": None, "family": None,
            "model": None, "flags": set()}
    source = "unreadable"
  flags = info.pop("flags")
  if not flags:
    flags, source = _flags_from_numpy(), "numpy"
  return dict(info, avx2="avx2" in flags, avx512="avx512f" in flags, amx="amx_tile" in flags,
              flags_from=source, isa_caps=isa_caps(environ))


def describe_cpu(facts: dict[str, Any]) -> str:
  """'AMD EPYC (family 26, model 2): AVX2 yes, AVX-512 yes, AMX no; ISA caps: none'."""
  yes = lambda b: "yes" if b else "no"
  numbers = (f" (family {facts['family']}, model {facts['model']})"
             if facts.get("family") is not None else "")
  caps = ", ".join(f"{k}={v}" for k, v in facts["isa_caps"].items()) or "none"
  return (f"{facts['cpu']}{numbers}: AVX2 {yes(facts['avx2'])}, AVX-512 {yes(facts['avx512'])}, "
          f"AMX {yes(facts['amx'])}; ISA caps: {caps}")


# ---------------------------------------------------------------------------------------------
# Dots of a compiled program, by the library that runs them
# ---------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)")
_LIBRARY_FUSION = re.compile(r'"kind"\s*:\s*"__(\w+?)_fusion"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def dot_kernels(hlo_text: str) -> dict[str, dict[str, float]]:
  """{library: {"dots": count, "gflop": GFLOP}} for the dots and convolutions of a compiled HLO
  module's text (`jax.jit(f).lower(...).compile().as_text()`).

  Libraries: 'ynnpack' / 'xnnpack' / 'onednn' for dots inside a fusion of that library's kind
  (backend_config {"kind": "__ynn_fusion"} ...), 'onednn' also for oneDNN custom calls, 'xla'
  for the rest (XLA:CPU's own dot thunks: Eigen, or LLVM-emitted for small ones).
  """
  shapes: dict[str, list[int]] = {}
  library_of_computation: dict[str, str] = {}
  dots = []  # (computation, opcode, output dims, operand names, attributes, custom call target)
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("{")[0]:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    name, _, dims, opcode, rest = instruction.groups()
    shapes[name] = _dims(dims)
    library = _LIBRARY_FUSION.search(rest)
    if opcode == "fusion" and library:
      for called in _CALLS.findall(rest):
        library_of_computation[called] = library.group(1)
    target = _TARGET.search(rest)
    if opcode in ("dot", "convolution") or (opcode == "custom-call" and target and (
        "onednn" in target.group(1).lower() or "matmul" in target.group(1).lower())):
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      dots.append((computation, opcode, shapes[name], operands, rest,
                   target.group(1) if target else None))
  names = {"ynn": "ynnpack", "xnn": "xnnpack", "onednn": "onednn"}
  out: dict[str, dict[str, float]] = {}
  for computation, opcode, out_dims, operands, attributes, target in dots:
    if target is not None:
      library = "onednn"
    else:
      library = names.get(library_of_computation.get(computation, ""), "xla")
    flops = 2.0 * _product(out_dims)
    if opcode == "dot" and operands:
      match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes)
      lhs = shapes.get(operands[0], [])
      if match and lhs:
        flops *= _product([lhs[i] for i in _dims(match.group(1)) if i < len(lhs)])
    elif opcode == "convolution" and len(operands) > 1:
      kernel = shapes.get(operands[1], [])
      labels = re.search(r"dim_labels=\w+_(\w+)->", attributes)
      if kernel and labels and "o" in labels.group(1):  # kernel spatial x input features
        flops *= _product(kernel) / kernel[labels.group(1).index("o")]
    entry = out.setdefault(library, {"dots": 0, "gflop": 0.0})
    entry["dots"] += 1
    entry["gflop"] += flops / 1e9
  return out


def _product(xs) -> float:
  result = 1.0
  for x in xs:
    result *= x
  return result


def describe_dot_kernels(kernels: dict[str, dict[str, float]]) -> str:
  """'ynnpack 40 dots (71% of dot FLOPs), xla 21 (29%)'."""
  total = sum(k["gflop"] for k in kernels.values()) or 1.0
  parts = sorted(kernels.items(), key=lambda kv: -kv[1]["gflop"])
  return ", ".join(f"{name} {k['dots']} dots ({100 * k['gflop'] / total:.0f}% of dot FLOPs)"
                   for name, k in parts) or "no dots"


# ---------------------------------------------------------------------------------------------
# The DINOv3 implementation for this machine: the one switch (docs/benchmarks.md, "Per ISA")
# ---------------------------------------------------------------------------------------------

# "custom_vjp": the ViT block's backward passes written out (LayerNorm, attention, GELU-MLP) to
# keep the least and recompute the rest; "autodiff": attention and the GELU-MLP left to JAX's
# autodiff, which keeps the (T, T) attention weights and gelu(h) instead of recomputing them.
DINOV3_IMPLS = ("custom_vjp", "autodiff")
IMPL_ENV = "DD_JAX_DINOV3_IMPL"  # forces one for every model in the process (tests, benchmarks)


def auto_impl(backend: str, facts: dict[str, Any]) -> str:
  """What "auto" means for a backend ('cpu', 'gpu', 'tpu') and CPU facts (cpu_facts()).

  Every case gets "custom_vjp" today: in interleaved A/B runs of the block's forward+backward
  (tools/ab_block.py, docs/benchmarks.md "Per ISA") it was as fast as or ~10% faster than
  "autodiff" both natively on AVX-512 and with XLA, ATen, MKL and oneDNN capped to AVX2, and it
  keeps less memory. This is the one place to change should a quiet AVX2 machine show otherwise.
  """
  del backend, facts
  return "custom_vjp"


@functools.cache
def _auto_impl() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return auto_impl(jax.default_backend(), cpu_facts())


def resolve_dinov3_impl(requested: str | None = "auto") -> str:
  """The implementation to build: `requested` ("auto", None or one of DINOV3_IMPLS), unless the
  environment variable DD_JAX_DINOV3_IMPL forces one; "auto" picks by backend and CPU flags
  (resolved once per process)."""
  forced_impl = os.environ.get(IMPL_ENV, "").strip()
  choice = forced_impl or requested or "auto"
  if choice == "auto":
    return _auto_impl()
  if choice not in DINOV3_IMPLS:
    source = f"environment variable {IMPL_ENV}" if forced_impl else "model.backbone.impl"
    raise ValueError(f"{source}={choice!r}: expected 'auto' or one of {DINOV3_IMPLS}")
  return choice
