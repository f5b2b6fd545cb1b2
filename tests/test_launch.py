"""Sweeps are data in the config files; the launchers iterate them."""
import csv
import glob
import json
import os

import pytest

from launch import local
from launch import sweep as sweep_lib
from launch import tpu_vm
from launch import xm_launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEPT = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
         if "def sweep(" in open(p).read()]

TINY_SWEEP = """
from perl_jax import config_base

METRICS = ("report", "wall_time_s")


def get_config():
  c = config_base.base_config()
  c.stages = ("report",)  # the cheapest stage: trials here test the launcher, not training
  return c


def sweep(add):
  for steps in (2, 3):
    add(**{"sft.train.steps": steps, "seed": 1})
"""


def test_every_sweep_in_configs_names_real_fields():
  assert SWEPT, "configs/demo.py and configs/paper/reward.py define sweeps"
  for path in SWEPT:
    trials = sweep_lib.trials(path)
    assert len(trials) > 1 and len({t.name for t in trials}) == len(trials)


def test_a_sweep_naming_an_unknown_field_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text(TINY_SWEEP.replace('"sft.train.steps"', '"sft.train.stepz"'))
  with pytest.raises(ValueError, match="no config field 'sft.train.stepz'"):
    sweep_lib.trials(str(path))


def test_settings_reach_every_trial_but_not_its_name(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_SWEEP)
  trials = sweep_lib.trials(str(path), sweep_lib.parse_settings(["data.manual_dir=/data/tm"]))
  assert [t.name for t in trials] == ["steps=2,seed=1", "steps=3,seed=1"]
  assert all("--config.data.manual_dir=/data/tm" in t.flags() for t in trials)
  with pytest.raises(ValueError, match="no config field 'data.manual_dri'"):
    sweep_lib.trials(str(path), {"data.manual_dri": "/data/tm"})
  with pytest.raises(ValueError, match="PATH=VALUE"):
    sweep_lib.parse_settings(["data.manual_dir"])


def test_product_is_every_combination():
  grid = sweep_lib.product(**{"lora.rank": [4, 8], "seed": [0, 1, 2]})
  assert len(grid) == 6 and {"lora.rank": 8, "seed": 2} in grid


def test_local_runner_runs_every_trial_and_tabulates(tmp_path):
  config = tmp_path / "tiny_sweep.py"
  config.write_text(TINY_SWEEP)
  rows = local.run_sweep(str(config), str(tmp_path / "sweep"), parallel=2, log=lambda _: None)
  assert [r["status"] for r in rows] == ["ok", "ok"]
  assert [r["trial"] for r in rows] == ["steps=2,seed=1", "steps=3,seed=1"]
  for row, steps in zip(rows, (2, 3)):  # each run got its own overrides and workdir
    summary = json.load(open(tmp_path / "sweep" / row["trial"] / "summary.json"))
    assert summary["config"]["seed"] == 1
    assert summary["config"]["sft"]["train"]["steps"] == steps
    assert row["report"] == str(tmp_path / "sweep" / row["trial"] / "report.md")
    assert row["wall_time_s"] > 0
  table = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
  assert [t["trial"] for t in table] == ["steps=2,seed=1", "steps=3,seed=1"]
  assert "| trial | status | report | wall_time_s |" in open(
      tmp_path / "sweep" / "results.md").read()


def test_tpu_vm_runs_each_trial_on_every_worker():
  commands = tpu_vm.gcloud_commands(os.path.join(ROOT, "configs/paper/reward.py") + ":shp",
                                    "gs://bucket/run", "my-tpu", "us-central2-b", "perl_jax")
  assert len(commands) == 9  # 4 ranks x 2 learning rates + full tuning
  first = commands[0]
  assert first[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in first
  remote = first[-1]
  assert "perl_jax.main --distributed" in remote and "--config.lora.rank=1" in remote
  assert "--workdir=gs://bucket/run/rank=1" in remote


def test_xmanager_jobs_get_one_workdir_and_flag_set_each():
  jobs = xm_launch.job_args(os.path.join(ROOT, "configs/demo.py"), "gs://bucket/demo")
  assert len(jobs) == 6
  name, args = jobs[1]
  assert name == "seed=0,rank=0"
  assert args[0] == "--distributed" and "--config.lora.rank=0" in args
  assert "--workdir=gs://bucket/demo/seed=0,rank=0" in args
