"""What a run shows: console progress, metrics.jsonl, PNG pictures, and TensorBoard events or a
Weights & Biases run.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Protocol

import cv2
import jax
import ml_collections
import numpy as np

# dd_jax's own console messages; absl (Orbax, JAX) stays at WARNING so progress is readable.
log = logging.getLogger("dd_jax")


def setup_console(level: int = logging.INFO) -> None:
  """Short timestamped lines on stderr for dd_jax, warnings only from absl users."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
  log.setLevel(level)


class Logger(Protocol):
  """Where MetricWriter sends scalars, pictures and text besides metrics.jsonl and PNG files."""

  def scalars(self, step: int, values: dict[str, float]) -> None: ...
  def image(self, step: int, name: str, rgb: np.ndarray) -> None: ...
  def text(self, name: str, text: str) -> None: ...
  def close(self) -> None: ...


class TensorBoardLogger:
  """TensorBoard event files under workdir/tensorboard (the default)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)

  def image(self, step: int, name: str, rgb: np.ndarray) -> None:
    self._tb.add_image(name, rgb, step, dataformats="HWC")

  def text(self, name: str, text: str) -> None:
    self._tb.add_text(name, text)

  def close(self) -> None:
    self._tb.close()


class MetricWriter:
  """Scalars to metrics.jsonl, images to PNG files, and both to the configured logger
  (config.logger: TensorBoard, or Weights & Biases through dd_jax.wandb_logger)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if config.logger == "tensorboard":
      self._logger: Logger = TensorBoardLogger(workdir)
    elif config.logger == "wandb":
      from dd_jax import wandb_logger  # pylint: disable=g-import-not-at-top
      self._logger = wandb_logger.WandbLogger(workdir, config)
    else:
      raise ValueError(f"config.logger must be 'tensorboard' or 'wandb', got {config.logger!r}")
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    self._logger.scalars(int(step), values)

  def forget_after(self, step: int) -> None:
    """Drops metrics.jsonl's records of steps after `step`: a run resumed from that step writes
    them again, and a step must not have two records."""
    if not self.enabled:
      return
    self._jsonl.close()
    path = os.path.join(self.workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
      log.info("metrics.jsonl: %d record(s) after step %d dropped (this run redoes them)",
               len(lines) - len(kept), step)
    self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def image(self, step: int, name: str, rgb: np.ndarray) -> str | None:
    """An (H, W, 3) uint8 RGB picture to workdir/pictures/NAME_stepN.png and to the logger."""
    if not self.enabled:
      return None
    folder = os.path.join(self.workdir, "pictures")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name.replace('/', '_')}_step{step}.png")
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    self._logger.image(int(step), name, rgb)
    return path

  def text(self, name: str, text: str) -> None:
    if self.enabled:
      self._logger.text(name, text)

  def close(self) -> None:
    if self.enabled:
      self._logger.close()
      self._jsonl.close()


def _record_step(line: str) -> float:
  """The step of a metrics.jsonl line; +inf (dropped) for a line that is not a whole record,
  e.g. the torn last line of a killed run."""
  try:
    return float(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")


class Progress:
  """Console lines with loss, steps/s and the ETA of the current epoch."""

  def __init__(self, total_steps: int, epoch: int, max_epochs: int):
    self.total = total_steps
    self.epoch = epoch
    self.max_epochs = max_epochs
    self.start = time.perf_counter()
    self.done = 0

  def update(self, steps_done: int, values: dict[str, float]) -> float:
    self.done = steps_done
    elapsed = time.perf_counter() - self.start
    rate = steps_done / max(elapsed, 1e-9)
    eta = (self.total - steps_done) / max(rate, 1e-9)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
    log.info("epoch %d/%d  step %d/%d  %s  %.2f steps/s  ETA %s", self.epoch + 1,
                 self.max_epochs, steps_done, self.total, shown, rate, _duration(eta))
    return rate


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
