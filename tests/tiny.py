"""Tiny end-to-end settings shared by the trainer, evaluation and multi-process tests, and the
helpers that run `python -m dd_jax.train` and read a run folder back."""

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

from dd_jax import default_config
from dd_jax.synthetic import dataset as synthetic

# 3 participants x 2 trials x 4 frames: train = participant 1 (8 frames), val = 2, test = 3.
DATASET = dict(participants=3, trials=2, frames=4, image_size=256, seed=0)


def dataset(root: str) -> str:
  path = os.path.join(str(root), "egodorsal_tiny")
  synthetic.ensure_synthetic_dataset(path, **DATASET)
  return path


def config(task: str, data_dir: str, **overrides):
  """A seconds-long run: ViT with 2 blocks of width 32 at 32x32 pixels."""
  c = default_config.pose_config("demo") if task == "pose" else default_config.force_config("demo")
  c.data.data_dir = data_dir
  c.data.synthetic.enabled = False
  c.data.out_img_size = 32
  c.data.batch_size = 4
  c.data.eval_batch_size = 8
  c.model.backbone.custom.update(dict(dim=32, depth=2, num_heads=2, ffn_hidden=64))
  c.model.backbone.n_unfrozen_blocks = 1
  c.model.change.out_dim = 16
  c.model.head.hidden = 32
  c.max_epochs = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.num_val_pictures = 1
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pose_data_config(data_dir, **overrides):
  """configs/pose.py's data settings for `data_dir`, at small batches and image size."""
  spec = importlib.util.spec_from_file_location("pose_config", os.path.join(ROOT, "configs", "pose.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config().data
  data.data_dir = str(data_dir)
  data.update(dict(batch_size=4, eval_batch_size=3, num_workers=0, out_img_size=32))
  data.update(overrides)
  return data


SIGKILL_AT_STEP = "DD_JAX_SIGKILL_AT_STEP"
# With DD_JAX_PAUSE_AFTER_STEP=N the process waits after train step N until the file named by
# DD_JAX_PAUSE_UNTIL exists (a run held mid-training while a test starts another one).
PAUSE_AFTER_STEP, PAUSE_UNTIL = "DD_JAX_PAUSE_AFTER_STEP", "DD_JAX_PAUSE_UNTIL"


def kill_after_step_from_environment():
  """Fault injection for the resume and dying-process tests, in the training subprocess: with
  DD_JAX_SIGKILL_AT_STEP=N the process SIGKILLs itself once train step N is done (logged and
  checkpointed as configured), at the trainer's next move: the next train step or the epoch's
  validation, once its saves in flight are finished (so that a resume test resumes, rather than
  starting afresh when a loaded machine had not finished the save). The library has no such
  hook; this wraps its compiled step, eval loader and checkpoint saving."""
  kill_at = int(os.environ.get(SIGKILL_AT_STEP, "0"))
  pause_at = int(os.environ.get(PAUSE_AFTER_STEP, "0"))
  from dd_jax import checkpointing, train_state  # pylint: disable=import-outside-toplevel
  from dd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if ((not kill_at and not pause_at)
      or getattr(train_state.compile_step, "kills_at", None) == (kill_at, pause_at)):
    return
  done = {"step": 0, "manager": None}

  def kill_when_done():
    if kill_at and done["step"] == kill_at:
      if done["manager"] is not None:
        done["manager"].wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)
    if pause_at and done["step"] == pause_at:
      deadline = time.monotonic() + 600
      while not os.path.exists(os.environ[PAUSE_UNTIL]) and time.monotonic() < deadline:
        time.sleep(0.1)

  save = checkpointing.save

  def save_and_remember(manager, *args, **kwargs):
    done["manager"] = manager
    save(manager, *args, **kwargs)

  compile_step, make_eval_loader = train_state.compile_step, pipeline.make_eval_loader

  def compile_step_that_kills(step, *args):
    compiled = compile_step(step, *args)

    def run(state, *rest):
      kill_when_done()
      state, metrics = compiled(state, *rest)
      done["step"] = int(state["step"])
      return state, metrics
    return run

  def make_eval_loader_that_kills(*args, **kwargs):
    kill_when_done()
    return make_eval_loader(*args, **kwargs)

  compile_step_that_kills.kills_at = (kill_at, pause_at)
  train_state.compile_step = compile_step_that_kills
  pipeline.make_eval_loader = make_eval_loader_that_kills
  checkpointing.save = save_and_remember


def run_train(args, env_extra=None, check=True):
  """`python -m dd_jax.train ARGS` on one CPU device; raises with its stderr when it fails."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", **(env_extra or {}))
  result = subprocess.run([sys.executable, "-m", "dd_jax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"run failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


def train_losses(workdir, key="train/loss"):
  """step -> the last logged `key` of that step (a resumed run re-logs some steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        out[row["step"]] = row[key]
  return out


def val_losses(workdir):
  return train_losses(workdir, "val/loss")


def read_test_metrics(workdir):
  """(path, metrics) of the run's one test_metrics_epoch{N}.json (the best epoch's)."""
  (path,) = glob.glob(os.path.join(workdir, "test_metrics_epoch*.json"))
  with open(path, encoding="utf-8") as f:
    return path, json.load(f)


def free_port() -> int:
  """A free local TCP port for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(script: str, *args: str, processes: int = 2, devices: int = 2) -> list[str]:
  """Runs `python -c script ARGS PORT INDEX` as `processes` local jax.distributed processes of
  `devices` CPU devices each (the repository and tests/ importable); returns their outputs once
  all succeeded."""
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
         "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
  port = str(free_port())
  running = [subprocess.Popen([sys.executable, "-c", script, *args, port, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
  outputs = [p.communicate(timeout=300)[0] for p in running]
  for p, out in zip(running, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs
