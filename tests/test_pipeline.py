"""The demo pipeline, shortened: the README's main command runs every stage, they connect, the
reward model learns the gold preference, and RL moves the reward up; run again, it keeps every
finished stage."""
import json
import os
import subprocess
import sys

from conftest import FAST_COMPILE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORTENED = {  # configs/demo.py with smaller data and fewer steps
    "sft.num_train": 2048, "sft.num_eval": 64, "sft.num_samples": 8,
    "sft.train.steps": 200, "sft.train.batch_size": 16, "sft.train.eval_every": 0,
    "sft.train.log_every": 50,
    "prefs.num_train_prompts": 512, "prefs.num_eval_prompts": 128, "prefs.bt_scale": 0.1,
    "reward.train.steps": 50, "reward.train.batch_size": 32, "reward.train.eval_every": 25,
    "reward.train.checkpoint_every": 25, "reward.optim.warmup_steps": 10,
    "rl.prompts_per_step": 8, "rl.samples_per_prompt": 2, "rl.train.batch_size": 16,
    "rl.train.steps": 20, "rl.train.eval_every": 0, "rl.train.checkpoint_every": 20,
    "rl.train.log_every": 5, "rl.optim.lr": 3e-3, "rl.optim.warmup_steps": 2,
    "rl.num_eval_prompts": 32, "sampling.max_new_tokens": 32,
}


def _main(workdir, flags):
  # One CPU device, as a user has (with the suite's compile-speed flag).
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "-m", "perl_jax.main", "--config=configs/demo.py",
                         f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_shortened_demo_pipeline(tmp_path):
  flags = [f"--config.{k}={v}" for k, v in SHORTENED.items()]
  out = _main(tmp_path, flags)
  for stage in ("sft", "prefs", "reward", "rl", "report"):
    assert f"[{stage}] done in" in out
  assert "compiled train step, per device" in out
  assert "[sft] step 200/200" in out
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["config"]["sft"]["train"]["steps"] == 200  # the resolved config is recorded
  stages = summary["stages"]
  assert stages["sft"]["steps"] == 200
  assert stages["sft"]["trainable_params"] == stages["sft"]["total_params"] > 0  # full SFT
  assert stages["sft"]["samples_well_formed"] > 0.5  # the anchor already writes reviews
  assert stages["prefs"]["train_pairs"] > 400
  # Against the exact gold order on held-out pairs (chance is 0.5; the full demo reaches ~0.78).
  assert stages["reward"]["best_eval_accuracy"] > 0.58
  assert 0 < stages["reward"]["trainable_percent"] < 10
  rl = stages["rl"]
  assert rl["reward_final"] > rl["reward_initial"] + 0.1  # RL raises the reward model's score
  assert 0 <= rl["kl_final"] < 5
  assert rl["step_time_split_s"]["rollout"] > 0
  assert os.path.exists(tmp_path / "rl_curves.png") and os.path.exists(tmp_path / "report.md")
  assert os.listdir(tmp_path / "tb")

  # Run again, the same command skips every finished stage and keeps its results (the report
  # is written afresh from them).
  again = _main(tmp_path, flags)
  trained = ("sft", "prefs", "reward", "rl")
  for stage in trained:
    assert f"[{stage}] finished earlier in this workdir" in again, again[-3000:]
  kept = json.load(open(tmp_path / "summary.json"))["stages"]
  assert {s: kept[s] for s in trained} == {s: stages[s] for s in trained}
