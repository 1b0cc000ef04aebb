"""Run folders: one run per folder (a lock naming its holder, taken over from a dead process),
checkpoint folders that cannot be written, config values refused at start-up, metrics.jsonl
without duplicates after a resume."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import pytest

from dd_jax import checkpointing, default_config, experiment, logs, parallel, run_lock

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(predicate, what, timeout=300):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def _holder(workdir):
  try:
    with open(os.path.join(workdir, run_lock.LOCK_NAME), encoding="utf-8") as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def test_a_second_trainer_on_the_folder_refuses_and_the_first_finishes_untouched(
    tiny_dataset, tmp_path):
  workdir = str(tmp_path / "run")
  args = [f"--config=tests/tiny_config.py:pose,{tiny_dataset}", "--config.max_epochs=1",
          "--config.test=False", f"--workdir={workdir}"]
  resume = str(tmp_path / "go_on")
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", DD_JAX_PAUSE_AFTER_STEP="1",
             DD_JAX_PAUSE_UNTIL=resume)
  log_path = tmp_path / "first.log"
  log_file = open(log_path, "w", encoding="utf-8")  # a file: a full pipe would block it
  first = subprocess.Popen([sys.executable, "-m", "dd_jax.train", *args], cwd=ROOT, env=env,
                           stderr=log_file, stdout=log_file)
  try:
    # It holds the folder (and will wait after its first step until `resume` exists).
    _wait_for(lambda: _holder(workdir).get("pid") == first.pid or first.poll() is not None,
              "the first run's lock")
    assert first.poll() is None, log_path.read_text()[-3000:]
    second = tiny.run_train(args, check=False)
    assert second.returncode != 0
    print(second.stderr[-1500:])
    assert (f"RunFolderLockedError: {workdir} is in use by another run: pid {first.pid} on "
            f"{os.uname().nodename}") in second.stderr
    assert "dd_jax/train.py" in second.stderr.split("is in use by another run")[1]  # its command
  finally:
    open(resume, "w").close()
    first.wait(timeout=900)
    log_file.close()
  assert first.returncode == 0, log_path.read_text()[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == sorted(set(train_steps))  # every step once: nobody else wrote here
  assert len([r for r in records if "val/loss" in r]) == 1
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == max(train_steps)
  assert _holder(workdir) == {}  # released


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom dd_jax import run_lock\n"
       "with run_lock.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)",
       workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_lock.RunFolderLockedError,
                       match=re.escape(f"{workdir} is in use by another run: pid {holder.pid} ")):
      with run_lock.hold(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert _holder(workdir)["pid"] == holder.pid  # SIGKILL left its name in the file
  logging.getLogger("dd_jax").addHandler(caplog.handler)
  try:
    with run_lock.hold(workdir):
      assert _holder(workdir)["pid"] == os.getpid()
      with pytest.raises(run_lock.RunFolderLockedError, match=f"pid {os.getpid()} "):
        with run_lock.hold(workdir):  # this process itself, a second time
          pass
  finally:
    logging.getLogger("dd_jax").removeHandler(caplog.handler)
  assert (f"{workdir}: taking over the lock of a run that is no longer running (pid "
          f"{holder.pid} on") in caplog.text


def _no_checkpoint_folder(workdir):
  """A real obstacle to writing workdir/checkpoints/ that root cannot bypass: a file there."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "checkpoints"), "w", encoding="utf-8") as f:
    f.write("not a folder")
  return os.path.join(workdir, "checkpoints")


def _read_only_checkpoint_folder(workdir):
  if os.geteuid() == 0:
    pytest.skip("root writes into read-only folders")
  folder = os.path.join(workdir, "checkpoints")
  os.makedirs(folder)
  os.chmod(folder, 0o555)
  return folder


@pytest.mark.parametrize("obstacle", [_no_checkpoint_folder, _read_only_checkpoint_folder])
def test_an_unwritable_checkpoint_folder_fails_at_start_up_naming_it(tiny_dataset, tmp_path,
                                                                     obstacle):
  workdir = str(tmp_path / "run")
  folder = obstacle(workdir)
  before = sorted(os.listdir(folder)) if os.path.isdir(folder) else open(folder).read()
  config = tiny.config("pose", tiny_dataset, max_epochs=1, test=False)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=re.escape(f"{folder}: checkpoints cannot be written there")):
    experiment.train_and_evaluate(config, workdir, parallel.make_mesh(jax.devices()[:1]))
  assert (sorted(os.listdir(folder)) if os.path.isdir(folder) else open(folder).read()) == before
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # stopped before training
  assert _holder(workdir) == {}  # and let go of the folder


def test_impossible_settings_are_all_refused_at_start_up(tiny_dataset, tmp_path):
  config = tiny.config("pose", tiny_dataset)
  config.optimizer.lr = -0.01
  config.data.batch_size = 0
  config.data.val_participants = (1,)
  config.model.head.pool = "max"
  config.model.backbone.variant = "dinov3_vitx16"
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError) as e:
    experiment.train_and_evaluate(config, workdir, parallel.make_mesh(jax.devices()[:1]))
  message = str(e.value)
  print(message)
  assert message.startswith("config: 5 problem(s):")
  for problem in ("optimizer.lr must be > 0, got -0.01", "data.batch_size must be > 0, got 0",
                  "data.val_participants is used only with data.leave_one_out=True",
                  "model.head.pool must be 'avg' or 'attn', got 'max'",
                  "model.backbone.variant must be one of"):
    assert problem in message
  assert not os.path.exists(workdir)  # nothing was started
  for task in ("pose", "force"):  # every shipped config passes
    for preset in (None, "demo", "vits16"):
      default_config.check(default_config.pose_config(preset) if task == "pose"
                           else default_config.force_config(preset))


def test_unknown_and_ill_typed_keys_are_refused_by_the_command_line(tiny_dataset, tmp_path):
  base = [f"--config=tests/tiny_config.py:pose,{tiny_dataset}", f"--workdir={tmp_path / 'r'}"]
  for flag, words in (("--config.optimizer.lrr=0.1", ("lrr", "lr")),
                      ("--config.optimizer.lr=fast", ("lr", "fast"))):
    result = tiny.run_train(base + [flag], check=False)
    assert result.returncode != 0 and all(w in result.stderr for w in words), result.stderr[-800:]
  assert not os.path.exists(tmp_path / "r")


def test_forget_after_keeps_one_record_per_step(tmp_path):
  writer = logs.MetricWriter(str(tmp_path), default_config.base_config("pose"))
  for step in (1, 2, 3):
    writer.scalars(step, {"train/loss": step})
  writer._jsonl.write('{"step": 4, "train/lo')  # the torn last line of a killed run
  writer._jsonl.flush()
  writer.forget_after(2)
  writer.scalars(3, {"train/loss": 30.0})
  writer.close()
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [
        {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0},
        {"step": 3, "train/loss": 30.0}]


def test_a_resumed_run_records_each_step_once(tiny_dataset, tmp_path):
  workdir = str(tmp_path / "run")
  mesh = parallel.make_mesh(jax.devices()[:1])
  experiment.train_and_evaluate(tiny.config("pose", tiny_dataset, max_epochs=1, test=False),
                                workdir, mesh)
  steps = sorted(tiny.train_losses(workdir))
  # What a run killed after logging one more step (before saving it) leaves behind.
  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": steps[-1] + 1, "train/loss": 123.0}) + '\n{"step": ')
  experiment.train_and_evaluate(tiny.config("pose", tiny_dataset, max_epochs=2, test=False),
                                workdir, mesh)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  logged = [r["step"] for r in records if "train/loss" in r]
  assert logged == sorted(set(logged)) and len(logged) == 2 * len(steps)
  assert 123.0 not in [r["train/loss"] for r in records if "train/loss" in r]
  assert len([r for r in records if "val/loss" in r]) == 2
