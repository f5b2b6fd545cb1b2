r"""Runs a config's sweep with XManager: one Vertex AI job per trial.

  pip install xmanager   # optional extra, never a core dependency (it pins protobuf < 7)
  xmanager launch launch/xm_launch.py -- --config=configs/paper/reward.py:shp \
      --workdir=gs://BUCKET/perl/shp_rm --accelerator=tpu_v3 --accelerator_count=8

Each trial is `python -m perl_jax.main --distributed --config=... --workdir=WORKDIR/<trial>` with
its overrides as flags, in a container built from this repository.
"""
from __future__ import annotations

import os

from absl import app, flags

from launch import sweep as sweep_lib

FLAGS = flags.FLAGS


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_args(spec: str, workdir: str) -> list[tuple[str, list[str]]]:
  """(trial name, perl_jax.main flags) for every trial; what each XManager job receives."""
  return [(trial.name, sweep_lib.main_command(spec, trial, workdir, distributed=True)[3:])
          for trial in sweep_lib.trials(spec)]


def launch(spec: str, workdir: str, accelerator: str, count: int, base_image: str) -> None:
  from xmanager import xm  # the optional extra; imported only when launching
  from xmanager import xm_local
  with xm_local.create_experiment(experiment_title=f"perl_jax {spec}") as experiment:
    executable_spec = xm.PythonContainer(
        path=REPO_ROOT, base_image=base_image, entrypoint=xm.ModuleName("perl_jax.main"),
        docker_instructions=[f"COPY {os.path.basename(REPO_ROOT)}/ perl_jax",
                    "WORKDIR perl_jax", "RUN python3 -m pip install -e ."])
    [executable] = experiment.package([
        xm.Packageable(executable_spec=executable_spec, executor_spec=xm_local.Vertex.Spec())])
    requirements = xm.JobRequirements(**{accelerator: count})
    for name, args in job_args(spec, workdir):
      experiment.add(xm.Job(executable=executable, executor=xm_local.Vertex(requirements),
                            args=args, name=name))


def define_flags():
  """The command line; defined only when run as a script (importable without it)."""
  flags.DEFINE_string("config", None, "config file, optionally with :arg", required=True)
  flags.DEFINE_string("workdir", None, "sweep folder, e.g. gs://bucket/perl/run",
                    required=True)
  flags.DEFINE_string("accelerator", "tpu_v3",
                    "an xm.JobRequirements resource: tpu_v3, tpu_v4, A100, H100...")
  flags.DEFINE_integer("accelerator_count", 8, "accelerators per trial")
  flags.DEFINE_string("base_image", "python:3.11", "container base image")


def main(argv):
  del argv
  launch(FLAGS.config, FLAGS.workdir, FLAGS.accelerator, FLAGS.accelerator_count,
         FLAGS.base_image)


if __name__ == "__main__":
  define_flags()
  app.run(main)
