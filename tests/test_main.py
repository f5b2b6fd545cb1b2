"""The command line: bad flags fail clearly, in one line, before any work. (A run writing its
summary, and a rerun keeping the finished stages, is tests/test_pipeline.py.)"""
import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SFT = ["--config.stages=('sft',)", "--config.sft.train.steps=4",
             "--config.sft.train.batch_size=8", "--config.sft.num_train=64", "--config.sft.num_eval=16", "--config.sft.num_samples=4",
             "--config.sft.train.log_every=2", "--config.sampling.max_new_tokens=8"]


def _main(workdir, *flags):
  # One CPU device, as a user has (with the suite's compile-speed flag).
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "perl_jax.main", "--config=configs/demo.py",
                         f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flag, message", [
    ("--config.lora.rnak=4", "--config.lora.rnak: no such config field; did you mean lora.rank"),
    ("--config.stages=('sft','dance')", "stages: unknown ['dance']"),
    ("--config.model.preset=gemma-3b", "model.preset: must be one of"),
    ("--config.sft.train.batch_size=0", "sft.train.batch_size: must be an integer in [1, inf)"),
])
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, flag, message):
  proc = _main(tmp_path, *SMALL_SFT, flag)  # last: overrides SMALL_SFT
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [f"perl_jax: error: {proc.stderr.split(': error: ')[1].strip()}"]
  assert message in proc.stderr
  assert not os.path.exists(tmp_path / "sft")  # refused before any work
