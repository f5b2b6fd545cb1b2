"""Entry point: `python -m perl_jax.main --config=configs/NAME.py --workdir=DIR [--config.x=v]`.

Runs the stages listed in `config.stages` in order, each in its own subfolder of the workdir, and
writes DIR/summary.json with every stage's final metrics and the resolved config. Re-running the
same command resumes each stage from its last checkpoint; a stage that finished with the same
identity (perl_jax.identity) is skipped and keeps its results.

Errors a user can fix (perl_jax.errors: config, workdir, data) print one line and exit with code
2, a training run stopped on a NaN or a stuck loss with code 3; --verbose adds the traceback.
With --distributed, a process whose peer died exits with code 4 and a line naming the lost
process (or, if the coordination service notices first, JAX aborts it naming the task).
"""
from __future__ import annotations

import difflib
import json
import os
import sys
import time
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from perl_jax import common
from perl_jax import distributed
from perl_jax import errors
from perl_jax import identity
from perl_jax import sharding as sharding_lib
from perl_jax import prefs
from perl_jax import report
from perl_jax import reward
from perl_jax import rl
from perl_jax import sft
from perl_jax import train as train_lib
from perl_jax import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one of several processes (one per host of a TPU pod slice or "
    "GPU cluster, or local CPU processes: launch.multiprocess) that form one mesh. On a TPU VM "
    "or SLURM nothing else is needed; otherwise give the three flags below or their variables.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: HOST:PORT of process 0 (default: "
    "$JAX_COORDINATOR_ADDRESS, else detected from the cluster).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: how many processes (default: "
    "$PERL_JAX_NUM_PROCESSES, else detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed: this process's rank, 0 ... num_processes - 1 "
    "(default: $PERL_JAX_PROCESS_ID, else detected).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 30, "With --distributed: a process silent this long is declared "
    "dead and the others stop with an error naming it.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the full traceback of config, data and workdir errors too (they "
    "are otherwise one line).")

STAGES = {"sft": sft.run, "prefs": prefs.run, "reward": reward.run, "rl": rl.run, "report": report.run}


def run(config, workdir: str) -> dict:
  """Runs config.stages in `workdir`; raises errors.UserError subclasses for fixable problems."""
  jax.config.update("jax_threefry_partitionable", True)
  validate.check(config, workdir)  # before any work: every problem at once, one line each
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  print(f"perl_jax: {len(jax.devices())} {jax.devices()[0].platform} device(s), mesh "
        f"{dict(mesh.shape)}, stages {list(config.stages)}, workdir {workdir}", flush=True)
  writer = train_lib.Writer(workdir)
  summary_path = os.path.join(workdir, "summary.json")
  # Earlier runs in this workdir (e.g. of other stages) keep their results.
  previous = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  summary = {"config": config.to_dict(), "stages": previous.get("stages", {})}
  try:
    for stage in config.stages:
      t0 = time.perf_counter()
      result = _finished_result(config, workdir, stage)
      if result is None:
        result = STAGES[stage](config, workdir, mesh, writer)
        result["wall_time_s"] = time.perf_counter() - t0
        if stage in identity.FIELDS:
          common.write_json(os.path.join(workdir, stage, RESULT), result)
        print(f"[{stage}] done in {result['wall_time_s']:.1f}s", flush=True)
      summary["stages"][stage] = result
      summary.update({k: v for k, v in result.items() if not k.startswith("samples")})
      common.write_json(summary_path, summary)
      distributed.barrier(f"{stage} done")  # the next stage may read what process 0 wrote
  finally:
    writer.close()
  return summary


RESULT = "result.json"  # a finished stage's results, beside its identity.json


def _finished_result(config, workdir: str, stage: str) -> dict | None:
  """The saved results of `stage` if it finished in `workdir` with this identity, else None
  (after recording the identity, or refusing a different one: identity.check)."""
  if stage not in identity.FIELDS:  # report: cheap, always redone
    return None
  stage_dir = os.path.join(workdir, stage)
  result_path = os.path.join(stage_dir, RESULT)

  def check():  # process 0 records the identity (and drops stale results); the others then read
    status = identity.check(stage_dir, identity.of_stage(config, workdir, stage),
                            config.allow_config_change)
    if status == "changed" and os.path.exists(result_path) and distributed.is_primary():
      os.remove(result_path)  # the accepted change is trained on: the old results no longer hold
    return status

  status = distributed.primary_first(check, f"{stage} identity")
  if status != "same" or not os.path.exists(result_path):
    return None
  print(f"[{stage}] finished earlier in this workdir with the same config and data: keeping its "
        f"results (delete {stage_dir} to run it again)", flush=True)
  return json.load(open(result_path))


def _config_field_error(e: Exception, argv) -> str | None:
  """A one-line message for an override of a field the config lacks, else None."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  known = _known_fields(argv)
  for arg in argv[1:]:
    field = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else None
    if field and field not in known:
      close = difflib.get_close_matches(field, known, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      return f"--config.{field}: no such config field{hint}"
  return None


def _known_fields(argv) -> list[str]:
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not config_arg:
    return []
  path, _, arg = config_arg.partition(":")
  try:
    import importlib.util
    spec = importlib.util.spec_from_file_location("_config_for_hint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # only for a hint: the real error is reported either way
    return []
  return list(identity.config_fields(config))


def parse_flags(argv):
  """absl's flag parsing, with config override errors as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"perl_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = _config_field_error(e, argv) or f"{type(e).__name__}: {e}"
    print(f"perl_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_on_error(e: Exception) -> None:
  """Reports `e` and exits: a user error in one line (code 2, or 3 for a stopped training run),
  a lost peer process in one line naming it (code 4), anything else with its traceback (code 1).
  With several processes the exit is immediate: a clean shutdown would wait for the others at
  JAX's shutdown barrier for minutes, while they wait in a collective for this one."""
  several = _DISTRIBUTED.value and jax.process_count() > 1
  lost = (distributed.lost_process_message(e)
          if several and isinstance(e, jax.errors.JaxRuntimeError) else None)
  if isinstance(e, errors.UserError) and not _VERBOSE.value:
    lines, code = str(e).splitlines() or [type(e).__name__], (
        3 if isinstance(e, errors.TrainingStopped) else 2)
  elif lost:
    lines, code = [lost], 4
  elif not several:
    raise e
  else:
    traceback.print_exc()
    lines, code = [f"process {jax.process_index()}: {type(e).__name__} (traceback above)"], 1
  for line in lines:
    print(f"perl_jax: error: {line}", file=sys.stderr, flush=True)
  if several:
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _HEARTBEAT.value)
    if not distributed.is_primary() and not _VERBOSE.value:
      sys.stdout = open(os.devnull, "w")  # process 0 reports progress; errors still show
  try:
    config = _CONFIG.value
    config.to_dict()  # a config file that failed to load raises only when first used
  except Exception as e:  # a config file that is missing or fails to load
    if _VERBOSE.value:
      raise
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    print(f"perl_jax: error: --config: cannot load the config file: {reason}", file=sys.stderr)
    sys.exit(2)
  try:
    run(config, _WORKDIR.value)
  except Exception as e:
    _exit_on_error(e)
  print(f"summary written to {os.path.join(_WORKDIR.value, 'summary.json')}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
