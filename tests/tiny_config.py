"""Config file for subprocess runs in tests: `--config tests/tiny_config.py:TASK,DATA_DIR`.

It also arms tiny.kill_after_step_from_environment in that subprocess (DD_JAX_SIGKILL_AT_STEP).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg):
  task, data_dir = arg.split(",", 1)
  tiny.kill_after_step_from_environment()
  return tiny.config(task, data_dir)
