"""Entry point: `python -m perl_jax.main --config=configs/NAME.py --workdir=DIR [--config.x=v]`.

Runs the stages listed in `config.stages` in order, each in its own subfolder of the workdir, and
writes DIR/summary.json with every stage's final metrics and the resolved config. Re-running the
same command resumes each stage from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from perl_jax import common
from perl_jax import sharding as sharding_lib
from perl_jax import prefs
from perl_jax import report
from perl_jax import reward
from perl_jax import rl
from perl_jax import sft
from perl_jax import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host of a "
    "multi-host TPU pod slice or GPU cluster (coordinator and ranks from the environment).")

STAGES = {"sft": sft.run, "prefs": prefs.run, "reward": reward.run, "rl": rl.run, "report": report.run}


def run(config, workdir: str) -> dict:
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown} in config.stages; known: {sorted(STAGES)}")
  os.makedirs(workdir, exist_ok=True)
  jax.config.update("jax_threefry_partitionable", True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  print(f"perl_jax: {len(jax.devices())} {jax.devices()[0].platform} device(s), mesh "
        f"{dict(mesh.shape)}, stages {list(config.stages)}, workdir {workdir}", flush=True)
  writer = train_lib.Writer(workdir)
  summary_path = os.path.join(workdir, "summary.json")
  # Earlier runs in this workdir (e.g. of other stages) keep their results.
  previous = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  summary = {"config": config.to_dict(), "stages": previous.get("stages", {})}
  for stage in config.stages:
    t0 = time.perf_counter()
    result = STAGES[stage](config, workdir, mesh, writer)
    result["wall_time_s"] = time.perf_counter() - t0
    summary["stages"][stage] = result
    summary.update({k: v for k, v in result.items() if not k.startswith("samples")})
    common.write_json(summary_path, summary)
    print(f"[{stage}] done in {result['wall_time_s']:.1f}s", flush=True)
  writer.close()
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  run(_CONFIG.value, _WORKDIR.value)
  print(f"summary written to {os.path.join(_WORKDIR.value, 'summary.json')}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
