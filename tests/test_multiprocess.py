"""The multi-host path, run for real: 2 processes x 4 CPU devices (gloo) form one 8-device mesh.

A killed process makes the other stop on its own, the launcher names it, and a rerun in 1 process
on another mesh resumes from the 2 processes' checkpoint: its reward and RL curves and results
equal those of an uninterrupted 2-process run.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import multiprocess
from test_released_checkpoint import _pairs, _released

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A released tiny Gemma 3 (HF layout) and preference pairs in the jsonl layout."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  directory = _released(tmp)[0]
  (tmp / "data").mkdir()
  _pairs(tmp / "data" / "train.jsonl", 64, 1)
  _pairs(tmp / "data" / "test.jsonl", 16, 2)
  return directory, str(tmp / "data")


def _args(inputs, workdir, stages=("reward", "rl"), **overrides):
  checkpoint, data = inputs
  flags = {"stages": repr(tuple(stages)), "model.checkpoint": checkpoint,
           "reward.data.manual_dir": data, "rl.num_train_prompts": 16,
           "reward.train.steps": 10, "reward.train.checkpoint_every": 3,
           "reward.train.eval_every": 5, "reward.train.log_every": 1,
           "rl.train.steps": 2, "rl.train.checkpoint_every": 2, "rl.train.eval_every": 2,
           "rl.train.log_every": 1}
  flags.update(overrides)
  return ["--config=configs/demo.py:small", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in flags.items())]


def _one_process(args, devices=8):
  env = multiprocess.process_env(devices)  # the same XLA flags as the 2-process runs
  return subprocess.Popen([sys.executable, "-m", "perl_jax.main", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_processes(args):
  return subprocess.Popen([sys.executable, "-m", "launch.multiprocess", "--processes=2",
                           "--devices_per_process=4", "--", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out = proc.communicate(timeout=timeout)[0]
  assert proc.returncode == 0, out[-4000:]
  return out


def _records(workdir, prefix=""):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if any(k.startswith(prefix) for k in r if k != "step")]


def _assert_same_records(a, b):
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_allclose(y[key], x[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} {x}")


def _assert_same_results(summary, other):
  for stage in ("reward", "rl"):
    for key, value in summary[stage].items():
      if isinstance(value, float) and "time" not in key and "per_s" not in key:
        np.testing.assert_allclose(other[stage][key], value, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{stage}/{key}")


def test_multiprocess_runs_equal_one_process_survive_a_kill_and_resume_on_another_mesh(
    inputs, tmp_path):
  """One test (its runs share one reference): 2 processes x 4 devices run the reward and RL
  stages; a second 2-process run loses process 1 mid-reward-stage, and 1 process on a 4 x 2
  mesh resumes it and runs RL: every logged step and result equals the 2-process run's."""
  two, killed = (str(tmp_path / name) for name in ("two", "killed"))
  # Killing process 1 mid-stage stops process 0 on its own, and the launcher names the lost one.
  launcher = _two_processes(["--heartbeat_timeout_s=10", *_args(inputs, killed, ("reward",))])
  pids = launcher.stdout.readline()  # "[launch] 2 processes, coordinator ..., pids P0 P1"
  assert "pids" in pids, pids
  checkpoints = os.path.join(killed, "reward", "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
    assert time.time() < deadline and launcher.poll() is None, launcher.stdout.read()[-3000:]
    time.sleep(0.05)
  os.kill(int(pids.split()[-1]), signal.SIGKILL)
  complete = _two_processes(_args(inputs, two))  # the reference, while process 0 waits out
  # the heartbeat timeout
  out = launcher.communicate(timeout=120)[0]
  assert launcher.returncode != 0, out[-3000:]
  assert "[launch] process 1 was killed by SIGKILL; waiting" in out, out[-3000:]
  stopped = re.search(r"process 0 (?:exited|was killed)[^\n]* on its own, ([\d.]+)s after "
                      r"process 1 failed", out)
  assert stopped and float(stopped.group(1)) < 60, out[-3000:]
  assert "FAILED: process 1 was killed by SIGKILL first. Rerun the same command" in out
  saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  assert saved and saved[-1] < 10, saved  # the kill landed mid-stage

  # The rerun resumes from the 2 processes' checkpoint in 1 process on a 4 x 2 (data x fsdp)
  # mesh, finishes the reward stage and runs RL.
  out_one = _finish(_one_process(_args(inputs, killed, **{"mesh.data": 4, "mesh.fsdp": 2})))
  out_two = _finish(complete)
  assert "[p0] perl_jax: 8 cpu device(s)" in out_two and "8 cpu device(s)" in out_one
  assert "[p1] [reward]" not in out_two  # process 0 reports; the others stay quiet
  assert f"[reward] resumed from checkpoint at step {saved[-1]}" in out_one, out_one[-3000:]
  assert "mesh {'data': 4, 'fsdp': 2" in out_one
  records = _records(two)
  assert {r["step"] for r in records} == set(range(1, 11))
  _assert_same_records(records, _records(killed))
  for name in ("summary.json", "rl/curve.json", "reward/best.json", "reward/result.json"):
    assert os.path.exists(os.path.join(two, name))
  _assert_same_results(json.load(open(os.path.join(two, "summary.json")))["stages"],
                       json.load(open(os.path.join(killed, "summary.json")))["stages"])


def test_multiprocess_launcher_names_the_failed_process_and_kills_a_hung_one(monkeypatch, tmp_path):
  """launch.multiprocess without JAX: process 1 fails, process 0 hangs; after grace_s the
  launcher kills it and returns process 1's exit code."""
  script = tmp_path / "child.py"
  script.write_text("import sys, time\nif sys.argv[1] == '1':\n  print('failing', flush=True)\n"
                    "  sys.exit(7)\ntime.sleep(600)\n")
  monkeypatch.setattr(multiprocess, "process_command",
                      lambda args, index, count, port, heartbeat: [sys.executable, str(script),
                                                                  str(index)])
  import io
  out = io.StringIO()
  t0 = time.time()
  assert multiprocess.run([], processes=2, grace_s=1.0, out=out) == 7
  assert time.time() - t0 < 30
  text = out.getvalue()
  assert "[p1] failing" in text
  assert "process 1 exited with code 7; waiting up to 1s" in text
  assert "process 0 still running 1s after process 1 failed: killing it" in text
  assert "FAILED: process 1 exited with code 7 first" in text
