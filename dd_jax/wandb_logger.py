"""Weights & Biases as the run's logger (config.logger="wandb"; an optional dependency).

Scalars, the validation panels and confusion matrices (as images), and the config go to a W&B
run kept under workdir/wandb. A resumed run continues the same W&B run. Without network access
or W&B credentials the run is offline (`wandb sync workdir/wandb/offline-run-*` uploads it later).
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
from urllib.parse import urlparse

import ml_collections
import numpy as np

from dd_jax.logs import log

RUN_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run logs into the same W&B run
STEP_KEY = "trainer/step"  # the x-axis of every chart: W&B's own step must only increase


def choose_mode(configured: str) -> str:
  """config.wandb.mode, else WANDB_MODE, else online when credentials and the server are there."""
  if configured:
    return configured
  if os.environ.get("WANDB_MODE"):
    return os.environ["WANDB_MODE"]
  host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
  try:
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or bool(netrc.netrc().authenticators(host))
  except (OSError, netrc.NetrcParseError):
    logged_in = False
  if not logged_in:
    return "offline"
  try:
    socket.create_connection((host, 443), timeout=3).close()
    return "online"
  except OSError:
    return "offline"


class WandbLogger:
  """The logs.Logger interface over a W&B run."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("config.logger='wandb' needs the wandb package: pip install wandb "
                        "(or use the default --config.logger=tensorboard)") from None
    self._wandb = wandb
    id_file = os.path.join(workdir, RUN_ID_FILE)
    if os.path.exists(id_file):
      with open(id_file, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
      with open(id_file, "w", encoding="utf-8") as f:
        f.write(run_id)
    mode = choose_mode(config.wandb.mode)
    self._run = wandb.init(
        project=config.wandb.project, entity=config.wandb.entity or None,
        group=config.wandb.group or None, name=os.path.basename(workdir.rstrip("/")),
        id=run_id, resume="allow", dir=workdir, mode=mode,
        config=config.to_dict(), settings=wandb.Settings(console="off", quiet=True))
    self._run.define_metric(STEP_KEY)
    self._run.define_metric("*", step_metric=STEP_KEY)
    log.info("W&B run %s (%s) in %s", run_id, mode, os.path.join(workdir, "wandb"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._run.log({STEP_KEY: step, **values})

  def image(self, step: int, name: str, rgb: np.ndarray) -> None:
    self._run.log({STEP_KEY: step, name: self._wandb.Image(rgb)})

  def text(self, name: str, text: str) -> None:
    self._run.summary[name] = text

  def close(self) -> None:
    self._run.finish()
