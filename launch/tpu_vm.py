r"""Runs a config's sweep on a Cloud TPU VM pod slice: one `gcloud ... --worker=all` per trial.

  python -m launch.tpu_vm --config=configs/paper/reward.py:hh_harmless --tpu=my-v5e-32 \
      --zone=us-west4-a --workdir=gs://BUCKET/perl/hh_rm [--execute]

Prints the commands (or, with --execute, runs them one after another). Every host runs the same
`python -m perl_jax.main --distributed ...`; jax.distributed.initialize() finds the coordinator
from the TPU environment and each host feeds its own rows of every batch. The repository must
already be on every worker at --repo_dir (e.g. `gcloud compute tpus tpu-vm scp --recurse`).
"""
from __future__ import annotations

import shlex
import subprocess

from absl import app, flags

from launch import sweep as sweep_lib

FLAGS = flags.FLAGS


def gcloud_commands(spec: str, workdir: str, tpu: str, zone: str, repo_dir: str,
                    project: str = "") -> list[list[str]]:
  commands = []
  for trial in sweep_lib.trials(spec):
    remote = (f"cd {shlex.quote(repo_dir)} && pip install -q -e . && " + shlex.join(
        sweep_lib.main_command(spec, trial, workdir, python="python3", distributed=True)))
    command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
               "--worker=all", f"--command={remote}"]
    if project:
      command.insert(6, f"--project={project}")
    commands.append(command)
  return commands


def define_flags():
  """The command line; defined only when run as a script (importable without it)."""
  flags.DEFINE_string("config", None, "config file, optionally with :arg", required=True)
  flags.DEFINE_string("workdir", None, "sweep folder, e.g. gs://bucket/perl/run",
                    required=True)
  flags.DEFINE_string("tpu", None, "TPU VM name", required=True)
  flags.DEFINE_string("zone", None, "TPU VM zone", required=True)
  flags.DEFINE_string("project", "", "GCP project (default: gcloud's)")
  flags.DEFINE_string("repo_dir", "perl_jax", "the repository on every worker")
  flags.DEFINE_bool("execute", False, "run the commands instead of printing them")


def main(argv):
  del argv
  commands = gcloud_commands(FLAGS.config, FLAGS.workdir, FLAGS.tpu, FLAGS.zone,
                             FLAGS.repo_dir, FLAGS.project)
  for i, command in enumerate(commands):
    print(shlex.join(command), flush=True)
    if FLAGS.execute:
      print(f"[tpu_vm] trial {i + 1}/{len(commands)}", flush=True)
      subprocess.run(command, check=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
