r"""kill -9 at random points of a stage, again and again, then resume: same results as no kill.

  python experiments/kill_resume.py --stages=sft,reward,rl --kills=5 --root=/tmp/kill_resume

Runs a small demo pipeline (sft -> prefs -> reward -> rl) once without interruption. Then, for each
stage in --stages, copies the finished earlier stages into a fresh workdir and runs only that stage
as `python -m perl_jax.main`, killing it with SIGKILL --kills times at random steps (sorted;
each kill up to 1.5 s after that step's log line, so in a step, an evaluation or a checkpoint
write; step 0: 2-8 s after start, in start-up or compilation), each run resuming the last; and finally lets it finish. It then compares with the
uninterrupted run: the stage's results (result.json), its metrics.jsonl lines, its
TensorBoard scalars and rl's curve.json, which must be equal (bit-exact where resume is; --atol
sets the tolerance) with no duplicate steps. Prints one line per kill and a verdict per stage; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from perl_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.sft.train.steps=24", "--config.sft.train.batch_size=16", "--config.sft.num_train=512",
    "--config.sft.num_eval=32", "--config.sft.num_samples=8", "--config.sft.train.log_every=2",
    "--config.sft.train.eval_every=8", "--config.sft.train.checkpoint_every=6",
    "--config.prefs.num_train_prompts=96", "--config.prefs.num_eval_prompts=32",
    "--config.reward.train.steps=24", "--config.reward.train.batch_size=16",
    "--config.reward.train.log_every=2", "--config.reward.train.eval_every=8",
    "--config.reward.train.checkpoint_every=6", "--config.reward.eval_batch_size=16",
    "--config.rl.train.steps=12", "--config.rl.prompts_per_step=4",
    "--config.rl.samples_per_prompt=2", "--config.rl.train.batch_size=8",
    "--config.rl.num_train_prompts=64", "--config.rl.num_eval_prompts=16",
    "--config.rl.train.log_every=2", "--config.rl.train.eval_every=6",
    "--config.rl.train.checkpoint_every=3", "--config.sampling.max_new_tokens=16",
]
UPSTREAM = {"sft": [], "reward": ["sft", "prefs"], "rl": ["sft", "prefs", "reward"]}
# Results that measure time, not what was trained.
TIMING = ("wall_time_s", "step_time_s", "step_time_split_s", "rollout_tokens_per_s",
          "rollout_time_s", "scoring_time_s")


def _command(workdir: str, stages: list[str]) -> list[str]:
  return [sys.executable, "-m", "perl_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--config.stages={tuple(stages)!r}", *SMALL]


def _env() -> dict:
  return dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")


def _run(workdir: str, stages: list[str]) -> list[str]:
  """Runs the stages to the end; returns the stdout lines."""
  proc = subprocess.run(_command(workdir, stages), cwd=ROOT, env=_env(), capture_output=True,
                        text=True)
  if proc.returncode:
    raise RuntimeError(f"{stages} in {workdir} failed:\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")
  return proc.stdout.splitlines()


def _kill_at(workdir: str, stage: str, at_step: int, delay: float) -> str:
  """Starts the stage and SIGKILLs it `delay` s after it logged step `at_step` or later (0:
  `delay` s after start, in start-up or compilation); returns where it was."""
  log = open(os.path.join(workdir, f"kill-{time.time():.3f}.log"), "w")
  proc = subprocess.Popen(_command(workdir, [stage]), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  last = "(before the stage printed anything)"
  deadline = time.time() + delay if at_step == 0 else None
  step_line = re.compile(rf"^\[{stage}\] step (\d+)/")
  reader = iter(proc.stdout.readline, "")
  while deadline is None:
    line = next(reader, None)
    if line is None:
      proc.wait()
      return "finished before the kill"
    log.write(line)
    if line.startswith(f"[{stage}]"):
      last = line.strip()[:90]
      logged = step_line.match(line)
      if logged and int(logged.group(1)) >= at_step:
        deadline = time.time() + delay
  time.sleep(max(0.0, deadline - time.time()))
  if proc.poll() is not None:
    return "finished before the kill"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  log.close()
  return f"{delay:.1f}s after: {last}"


def _stage_lines(workdir: str, stage: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  return [r for r in records if any(k.startswith(f"{stage}/") for k in r if k != "step")]


def _numbers(tree, prefix=""):
  """Flattened numeric leaves of a result (timings aside)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      if k not in TIMING:
        out.update(_numbers(v, f"{prefix}{k}."))
    return out
  if isinstance(tree, (int, float)) and not isinstance(tree, bool):
    return {prefix[:-1]: float(tree)}
  return {}


def compare(reference: str, resumed: str, stage: str, atol: float) -> list[str]:
  """Differences between the stage in two workdirs (empty: identical within atol)."""
  problems = []
  ref_result = json.load(open(os.path.join(reference, stage, "result.json")))
  new_result = json.load(open(os.path.join(resumed, stage, "result.json")))
  a, b = _numbers(ref_result), _numbers(new_result)
  a.pop("train_step_memory", None)
  for key in sorted(set(a) | set(b)):
    if key.startswith("train_step_memory") or key == "train_step_compilations":
      continue
    if key not in a or key not in b or not (abs(a[key] - b[key]) <= atol or (
        math.isnan(a[key]) and math.isnan(b[key]))):
      problems.append(f"result {key}: {a.get(key)} vs {b.get(key)}")
  curve = os.path.join(stage, "curve.json")  # rl's reward/KL curve, drawn by the report
  if os.path.exists(os.path.join(reference, curve)) and json.load(
      open(os.path.join(reference, curve))) != json.load(open(os.path.join(resumed, curve))):
    problems.append("curve.json differs")
  ref_lines, new_lines = _stage_lines(reference, stage), _stage_lines(resumed, stage)
  steps = [r["step"] for r in new_lines]
  if len(steps) != len(set(tuple(sorted(r)) + (r["step"],) for r in new_lines)):
    problems.append(f"metrics.jsonl has duplicate steps: {steps}")
  if [r["step"] for r in ref_lines] != steps:
    problems.append(f"metrics.jsonl steps differ: {[r['step'] for r in ref_lines]} vs {steps}")
  for r, n in zip(ref_lines, new_lines):
    if set(r) != set(n) or any(abs(r[k] - n[k]) > atol for k in r):
      problems.append(f"metrics.jsonl step {r['step']} differs")
      break
  tb_a = {k: v for k, v in train_lib.read_tensorboard(os.path.join(reference, "tb")).items()
          if k[0].startswith(f"{stage}/")}
  tb_b = {k: v for k, v in train_lib.read_tensorboard(os.path.join(resumed, "tb")).items()
          if k[0].startswith(f"{stage}/")}
  if sorted(tb_a) != sorted(tb_b):
    problems.append(f"TensorBoard has {len(tb_b)} {stage} points, the reference {len(tb_a)}")
  elif any(abs(tb_a[k] - tb_b[k]) > atol for k in tb_a):
    problems.append("TensorBoard values differ")
  return problems


def kill_and_resume(reference: str, workdir: str, stage: str, kills: int, steps: int,
                    rng: np.random.Generator, atol: float) -> list[str]:
  """`kills` SIGKILLs of the stage at random steps (sorted, so each resumed run reaches the
  next; step 0 = in start-up or compilation), each up to 1.5 s after that step's log line (in
  the next steps, an evaluation or a checkpoint write), then a run to the end; returns the
  differences from `reference`."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  for upstream in UPSTREAM[stage]:
    shutil.copytree(os.path.join(reference, upstream), os.path.join(workdir, upstream))
  for i, at_step in enumerate(sorted(rng.integers(0, steps, kills))):
    delay = float(rng.uniform(2.0, 8.0) if at_step == 0 else rng.uniform(0.0, 1.5))
    where = _kill_at(workdir, stage, int(at_step), delay)
    print(f"  [{stage}] kill {i + 1}/{kills} at step >= {at_step} + {where}", flush=True)
  _run(workdir, [stage])
  return compare(reference, workdir, stage, atol)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default="sft,reward,rl")
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--root", default="/tmp/perl_jax_kill_resume")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--atol", type=float, default=0.0)
  args = parser.parse_args(argv)
  stages = args.stages.split(",")
  reference = os.path.join(args.root, "reference")
  shutil.rmtree(reference, ignore_errors=True)
  steps = {}
  for stage in ("sft", "prefs", "reward", "rl"):
    t0 = time.perf_counter()
    logged = [int(m.group(1)) for line in _run(reference, [stage])
              for m in [re.match(rf"^\[{stage}\] step (\d+)/", line)] if m]
    steps[stage] = max(logged, default=0)
    print(f"reference {stage}: {time.perf_counter() - t0:.1f}s, {steps[stage]} steps",
          flush=True)
    if stage == max(stages, key=("sft", "prefs", "reward", "rl").index):
      break
  rng = np.random.default_rng(args.seed)
  failed = False
  for stage in stages:
    problems = kill_and_resume(reference, os.path.join(args.root, stage), stage, args.kills,
                               steps[stage], rng, args.atol)
    verdict = "identical to the uninterrupted run" if not problems else "; ".join(problems[:5])
    print(f"{stage}: {args.kills} kills, then resumed: {verdict}", flush=True)
    failed |= bool(problems)
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
