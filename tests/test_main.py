"""The command line: configs load, runs write their summary, bad flags fail clearly."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SFT = ["--config.stages=('sft',)", "--config.sft.train.steps=4",
             "--config.sft.train.batch_size=8", "--config.sft.num_train=64", "--config.sft.num_eval=16", "--config.sft.num_samples=4",
             "--config.sft.train.log_every=2", "--config.sampling.max_new_tokens=8"]


def _main(workdir, *flags):
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")  # one CPU device, as a user has
  return subprocess.run([sys.executable, "-m", "perl_jax.main", "--config=configs/demo.py",
                         f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_demo_sft_stage_runs_and_writes_summary(tmp_path):
  proc = _main(tmp_path, *SMALL_SFT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[sft] step 4/4" in proc.stdout
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["steps"] == 4
  assert summary["config"]["sft"]["train"]["steps"] == 4  # the resolved config is recorded
  assert summary["trainable_params"] == summary["total_params"] > 0
  assert os.listdir(tmp_path / "tb")
  # Running again resumes from the final checkpoint instead of training again.
  again = _main(tmp_path, *SMALL_SFT)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from checkpoint at step 4" in again.stdout


@pytest.mark.parametrize("flag, message", [
    ("--config.lora.rnak=4", "rnak"),
    ("--config.stages=('sft','dance')", "unknown stages ['dance']"),
    ("--config.model.preset=gemma-3b", "unknown model preset 'gemma-3b'"),
])
def test_bad_config_is_a_clear_error(tmp_path, flag, message):
  proc = _main(tmp_path, flag, *SMALL_SFT)
  assert proc.returncode != 0
  assert message in proc.stderr
