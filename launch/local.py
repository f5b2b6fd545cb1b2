r"""Runs a config's sweep on this machine, one workdir per trial, then writes a results table.

  python -m launch.local --config=configs/demo.py --workdir=/tmp/demo_sweep [--parallel=2]

Each trial is `python -m perl_jax.main --config=... --workdir=WORKDIR/<trial> --config.x=v ...`,
its output in WORKDIR/<trial>/log.txt. Re-running resumes every unfinished trial from its
checkpoints (finished stages are not repeated). WORKDIR/results.md and results.csv hold one row per
trial with the config's METRICS (summary.json keys). --dry_run prints the commands only.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

from launch import sweep as sweep_lib

FLAGS = flags.FLAGS


def run_sweep(spec: str, workdir: str, parallel: int = 1, log=print,
              common: dict | None = None) -> list[dict]:
  """Runs every trial (at most `parallel` at once); returns one result row per trial.

  `common`: overrides every trial gets ({path: value}, e.g. from --set).
  """
  if parallel < 1:
    raise ValueError(f"--parallel must be >= 1, got {parallel}")
  trials = sweep_lib.trials(spec, common)
  os.makedirs(workdir, exist_ok=True)
  pending, running, rows = list(trials), {}, {}
  log(f"[sweep] {len(trials)} trial(s) of {spec} in {workdir}, {parallel} at a time")
  while pending or running:
    while pending and len(running) < parallel:
      trial = pending.pop(0)
      trial_dir = os.path.join(workdir, trial.name)
      os.makedirs(trial_dir, exist_ok=True)
      command = sweep_lib.main_command(spec, trial, workdir, python=sys.executable)
      log_file = open(os.path.join(trial_dir, "log.txt"), "a")
      env = dict(os.environ, PYTHONUNBUFFERED="1")
      process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
      running[trial.name] = (trial, process, log_file, time.perf_counter())
      log(f"[sweep] started {trial.name}: {shlex.join(command)}")
    time.sleep(0.5)
    for name, (trial, process, log_file, start) in list(running.items()):
      if process.poll() is None:
        continue
      log_file.close()
      del running[name]
      rows[name] = _result_row(trial, os.path.join(workdir, name), process.returncode,
                               sweep_lib.metric_names(spec))
      log(f"[sweep] {len(rows)}/{len(trials)} {name} "
          f"{'done' if process.returncode == 0 else f'FAILED (exit {process.returncode})'} "
          f"in {time.perf_counter() - start:.0f}s")
  ordered = [rows[t.name] for t in trials]
  write_results(workdir, ordered)
  return ordered


def _result_row(trial, trial_dir: str, returncode: int, metrics: tuple[str, ...]) -> dict:
  row = {"trial": trial.name, "status": "ok" if returncode == 0 else f"failed ({returncode})"}
  summary_path = os.path.join(trial_dir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  for key in metrics:
    value = summary.get(key)
    if value is None:  # a key of an earlier stage: the first stage that has it
      value = next((s[key] for s in summary.get("stages", {}).values() if key in s), None)
    row[key] = value
  return row


def write_results(workdir: str, rows: list[dict]) -> None:
  columns = list(rows[0]) if rows else []
  columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def define_flags():
  """The command line; defined only when run as a script (importable without it)."""
  flags.DEFINE_string("config", None, "config file, optionally with :arg", required=True)
  flags.DEFINE_string("workdir", None, "sweep folder (one subfolder per trial)",
                    required=True)
  flags.DEFINE_integer("parallel", 1, "trials run at the same time")
  flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
  flags.DEFINE_multi_string("set", [], "PATH=VALUE given to every trial as --config.PATH=VALUE, "
                            "e.g. --set=data.manual_dir=/data/TM-4-2024")


def main(argv):
  del argv
  if FLAGS.dry_run:
    for trial in sweep_lib.trials(FLAGS.config, sweep_lib.parse_settings(FLAGS.set)):
      print(shlex.join(sweep_lib.main_command(FLAGS.config, trial, FLAGS.workdir)))
    return
  rows = run_sweep(FLAGS.config, FLAGS.workdir, FLAGS.parallel,
                   common=sweep_lib.parse_settings(FLAGS.set))
  print(open(os.path.join(FLAGS.workdir, "results.md")).read())
  if any(r["status"] != "ok" for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
