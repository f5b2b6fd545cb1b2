"""A workdir you can trust: validation before work, stage identity, divergence, resume."""
import glob
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import config_base
from perl_jax import errors
from perl_jax import identity
from perl_jax import main as main_lib
from perl_jax import validate
from conftest import FAST_COMPILE_FLAGS
from test_train import _fit, _problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def _config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                            "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, message", [
    ({"reward.train.steps": -5}, "reward.train.steps: must be an integer in [1, inf), got -5"),
    ({"reward.train.batch_size": 0}, "reward.train.batch_size: must be an integer in [1, inf)"),
    ({"reward.train.accum_steps": 5}, "reward.train.accum_steps: must divide "
                                      "reward.train.batch_size (32), got 5"),
    ({"stages": ("reward",)}, "model.backbone: stage 'reward' needs a backbone"),
    ({"stages": ("rl",), "model.backbone": "random"}, "stage 'rl' needs the reward model"),
    ({"rl.prompts_per_step": 5}, "rl.train.batch_size: must equal rl.prompts_per_step"),
    ({"lora.dropout": 1.5}, "lora.dropout: must be a number in [0, 1), got 1.5"),
    ({"sampling.top_p": 0.0}, "sampling.top_p: must be a number in (0, 1]"),
    ({"mesh.data": 3}, "mesh: "),
    ({"task": "taskmaster", "data.manual_dir": "/nonexistent"}, "data.manual_dir: task "
                                                                "'taskmaster' reads"),
    ({"reward.optim.schedule": "linear"}, "reward.optim.schedule: must be one of"),
    ({"model.remat_policy": "everything"}, "model.remat_policy: must name a "
                                           "jax.checkpoint_policies policy"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(tmp_path, overrides, message):
  if "mesh.data" in overrides:
    with pytest.raises(errors.ConfigError, match="mesh: "):
      validate.problems(_config(**overrides), str(tmp_path))
    return
  found = validate.problems(_config(**overrides), str(tmp_path))
  assert any(message in line for line in found), found
  assert all("\n" not in line for line in found)


def test_the_demo_config_validates_and_problems_are_listed_together(tmp_path):
  assert validate.problems(_config(), str(tmp_path)) == []
  found = validate.problems(_config(**{"sft.train.steps": 0, "rl.kl_coef": 1.5}), str(tmp_path))
  assert len(found) == 2, found


def test_anthropic_hh_default_config_with_only_harmless_base_names_the_fix(tmp_path):
  config = _config(stages=("reward",), **{"model.backbone": "random",
                                         "reward.data.name": "anthropic_hh",
                                         "reward.data.manual_dir":
                                             os.path.join(SHARED, "hh-harmless-base")})
  config.reward.data.config = "all"
  found = validate.problems(config, str(tmp_path))
  assert any("reward.data.manual_dir" in line and "harmless-base" in line for line in found), found
  config.reward.data.config = "harmless-base"
  assert validate.problems(config, str(tmp_path)) == []


# ----------------------------------------------------------------------------- training loop


def _stuck_problem():
  loss_fn, batch_at, trainable, frozen = _problem()
  # A saturated model: the loss does not depend on the weights, so every gradient is zero.
  flat = lambda t, f, b, rng: (0.6931 + 0.0 * jnp.sum(t["w"]["scale"]), {})
  return flat, batch_at


def _fit_with(workdir, loss_fn, batch_at, steps=40, **train_overrides):
  from perl_jax import train as train_lib
  from perl_jax import sharding as sharding_lib
  from test_train import _cfgs
  train_cfg, optim_cfg = _cfgs(steps)
  train_cfg.update(train_overrides)
  _, _, trainable, frozen = _problem()
  return train_lib.fit(name="t", workdir=str(workdir), train_cfg=train_cfg, optim_cfg=optim_cfg,
                       seed=0, mesh=sharding_lib.make_mesh({"data": 1}, jax.devices()[:1]),
                       loss_fn=loss_fn, trainable=trainable, frozen=frozen, batch_at=batch_at,
                       **{k: v for k, v in train_overrides.items() if k == "collapsed"})


def test_stuck_training_stops_and_names_the_last_good_checkpoint(tmp_path):
  loss_fn, batch_at = _stuck_problem()
  with pytest.raises(errors.TrainingStopped, match=r"training stuck for 5 steps at step 6 .*"
                     r"last good checkpoint is step 3"):
    _fit_with(tmp_path, loss_fn, batch_at, stop_if_stuck=5)
  # Off: the same run trains to the end.
  assert _fit_with(tmp_path / "off", loss_fn, batch_at, steps=8, stop_if_stuck=0)["steps"] == 8


def test_a_collapsed_model_stops_even_with_gradients(tmp_path):
  loss_fn, batch_at, _, _ = _problem()
  from perl_jax import train as train_lib
  from perl_jax import sharding as sharding_lib
  from test_train import _cfgs
  train_cfg, optim_cfg = _cfgs(20)
  train_cfg.stop_if_stuck = 4
  _, _, trainable, frozen = _problem()
  with pytest.raises(errors.TrainingStopped, match="collapsed"):
    train_lib.fit(name="t", workdir=str(tmp_path), train_cfg=train_cfg, optim_cfg=optim_cfg,
                  seed=0, mesh=sharding_lib.make_mesh({"data": 1}, jax.devices()[:1]),
                  loss_fn=loss_fn, trainable=trainable, frozen=frozen, batch_at=batch_at,
                  collapsed=lambda metrics: True)


def test_nan_before_the_first_checkpoint_says_none_was_saved(tmp_path):
  _, batch_at, _, _ = _problem()

  def poisoned(step):
    batch = batch_at(step)
    batch["scale"] = np.full((8,), np.nan, np.float32)
    return batch

  with pytest.raises(errors.TrainingStopped, match="no checkpoint was saved yet"):
    _fit(tmp_path, poisoned)


def test_eval_every_zero_evaluates_once_at_the_end(tmp_path):
  _, batch_at, _, _ = _problem()
  calls = []
  result = _fit(tmp_path, batch_at, eval_fn=lambda t: calls.append(1) or {"x": 1.0})
  assert len(calls) == 1 and result["history"][-1]["eval_x"] == 1.0


def _tb_scalars(tb_dir: str) -> dict:
  from perl_jax import train as train_lib
  return train_lib.read_tensorboard(tb_dir)


def _jsonl(path) -> list[dict]:
  return [json.loads(line) for line in open(path)]


def test_resume_drops_lines_after_the_checkpoint_and_rebuilds_tensorboard(tmp_path):
  _, batch_at, _, _ = _problem()
  _fit(tmp_path / "a", batch_at, steps=8)

  def crashing(step):
    if step == 5:  # steps 1-5 logged, the last checkpoint at step 3
      raise KeyboardInterrupt("simulated kill")
    return batch_at(step)

  with pytest.raises(KeyboardInterrupt):
    _fit(tmp_path / "b", crashing, steps=8)
  resumed = _fit(tmp_path / "b", batch_at, steps=8)
  assert resumed["resumed_from"] == 3
  straight, again = _jsonl(tmp_path / "a" / "metrics.jsonl"), _jsonl(tmp_path / "b" /
                                                                    "metrics.jsonl")
  assert [r["step"] for r in again] == [r["step"] for r in straight]  # no duplicate steps
  for a, b in zip(straight, again):
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], atol=1e-6)
  tb_a, tb_b = _tb_scalars(str(tmp_path / "a" / "tb")), _tb_scalars(str(tmp_path / "b" / "tb"))
  assert sorted(tb_a) == sorted(tb_b) and tb_a
  np.testing.assert_allclose([tb_a[k] for k in sorted(tb_a)], [tb_b[k] for k in sorted(tb_b)],
                             atol=1e-6)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  _, batch_at, _, _ = _problem()
  straight = _fit(tmp_path / "a", batch_at, steps=9)
  _fit(tmp_path / "b", batch_at, steps=6)  # checkpoints at 3 and 6
  for path in glob.glob(str(tmp_path / "b" / "checkpoints" / "6" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, "r+b") as f:  # cut every file in half, as a kill mid-write can
        f.truncate(os.path.getsize(path) // 2)
  resumed = _fit(tmp_path / "b", batch_at, steps=9)
  assert "checkpoint step 6" in capsys.readouterr().out
  assert resumed["resumed_from"] == 3
  np.testing.assert_allclose(np.asarray(resumed["state"]["trainable"]["w"]["scale"]),
                             np.asarray(straight["state"]["trainable"]["w"]["scale"]), atol=1e-6)
  assert os.listdir(str(tmp_path / "b" / "checkpoints") + ".corrupt")


def test_checkpoints_of_another_identity_are_refused(tmp_path):
  _, batch_at, _, _ = _problem()
  record = lambda sha, accepted=(): open(tmp_path / "identity.json", "w").write(
      json.dumps({"sha256": sha, "accepted": list(accepted)}))
  record("run-a")
  _fit(tmp_path, batch_at, steps=3)
  record("run-b")
  with pytest.raises(errors.WorkdirMismatch, match="another config or data"):
    _fit(tmp_path, batch_at, steps=6)
  record("run-b", accepted=["run-a"])  # what allow_config_change records
  assert _fit(tmp_path, batch_at, steps=6)["resumed_from"] == 3


# ----------------------------------------------------------------------------- stage identity


def _write_prefs(directory, n_train=48, n_test=16, seed=0):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  words = ["tasty", "great", "bland", "awful", "fresh", "stale", "lovely", "soggy"]
  for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
    with open(os.path.join(directory, name), "w") as f:
      for _ in range(n):
        good, bad = rng.choice(words[::2]), rng.choice(words[1::2])
        f.write(json.dumps({"prompt": "Review of the tea:", "chosen": f"so {good}",
                            "rejected": f"so {bad}"}) + "\n")


def _reward_config(manual_dir, **overrides):
  base = {"model.backbone": "random", "reward.data.manual_dir": str(manual_dir),
          "reward.train.steps": 4, "reward.train.batch_size": 8, "reward.eval_batch_size": 8,
          "reward.train.log_every": 1, "reward.train.eval_every": 2,
          "reward.train.checkpoint_every": 2, "data.max_len": 24}
  base.update(overrides)
  return _config(stages=("reward",), **base)


def test_changed_config_is_refused_and_an_override_continues_it(tmp_path):
  _write_prefs(tmp_path / "prefs_data")
  workdir = str(tmp_path / "run")
  first = main_lib.run(_reward_config(tmp_path / "prefs_data"), workdir)
  assert first["stages"]["reward"]["steps"] == 4
  with pytest.raises(errors.WorkdirMismatch, match=r"reward.optim.lr: 0.003 -> 1000.0.*"
                     r"allow_config_change"):
    main_lib.run(_reward_config(tmp_path / "prefs_data", **{"reward.optim.lr": 1e3}), workdir)
  # Cadence-only changes pass, and the finished stage is skipped with its results kept.
  again = main_lib.run(_reward_config(tmp_path / "prefs_data", **{"reward.train.log_every": 2}),
                       workdir)
  assert again["stages"]["reward"] == first["stages"]["reward"]
  # Training longer needs the override; it continues from the last checkpoint.
  longer = _reward_config(tmp_path / "prefs_data", **{"reward.train.steps": 6})
  with pytest.raises(errors.WorkdirMismatch, match=r"reward.train.steps: 4 -> 6"):
    main_lib.run(longer, workdir)
  longer.allow_config_change = True
  result = main_lib.run(longer, workdir)["stages"]["reward"]
  assert result["steps"] == 6
  history = json.load(open(os.path.join(workdir, "reward", identity.FILE)))["history"]
  assert any("reward.train.steps: 4 -> 6" in change for change in history[-1]["changed"])


def test_an_edited_data_file_is_refused_then_prepared_afresh(tmp_path):
  data = tmp_path / "prefs_data"
  _write_prefs(data, n_train=48)
  workdir = str(tmp_path / "run")
  first = main_lib.run(_reward_config(data), workdir)["stages"]["reward"]
  assert first["pairs_used"] == 48
  moved = tmp_path / "moved_data"  # the same files elsewhere: the same data, nothing to redo
  shutil.copytree(data, moved)
  assert main_lib.run(_reward_config(moved), workdir)["stages"]["reward"] == first
  _write_prefs(data, n_train=24, seed=1)  # the file is edited: fewer rows
  with pytest.raises(errors.WorkdirMismatch, match=r"data reward: files changed: .*train.jsonl"):
    main_lib.run(_reward_config(data), workdir)
  shutil.rmtree(os.path.join(workdir, "reward"))  # a fresh reward stage, same TFDS data_dir
  assert main_lib.run(_reward_config(data), workdir)["stages"]["reward"]["pairs_used"] == 24


def test_a_huge_learning_rate_stops_with_the_divergence_message(tmp_path):
  _write_prefs(tmp_path / "prefs_data")
  config = _reward_config(tmp_path / "prefs_data", **{
      "reward.optim.lr": 1e6, "reward.train.steps": 40, "reward.train.eval_every": 40,
      "reward.train.checkpoint_every": 40})
  with pytest.raises(errors.TrainingStopped, match="stuck for 10 steps"):
    main_lib.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "reward" / "best")  # never a collapsed model


_KILLABLE = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_train import _fit, _problem
batch_at = _problem()[1]
def slow(step):
  time.sleep(0.01)  # long enough that kills land between, during and after checkpoints
  return batch_at(step)
_fit(sys.argv[1], slow, steps=60)
"""


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
  """The train loop under real SIGKILLs (5 at random moments: start-up, steps, checkpoint
  writes); the whole stages are killed the same way by experiments/kill_resume.py."""
  import signal
  import subprocess
  import sys
  script = tmp_path / "killable.py"
  script.write_text(_KILLABLE)
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS, JAX_PLATFORMS="cpu")
  run = lambda workdir: subprocess.Popen([sys.executable, str(script), str(workdir),
                                          os.path.dirname(__file__)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  t0 = time.time()
  assert run(tmp_path / "straight").wait(timeout=300) == 0
  duration = time.time() - t0
  rng = np.random.default_rng(0)
  for _ in range(5):
    proc = run(tmp_path / "killed")
    try:
      proc.wait(timeout=float(rng.uniform(0.4, 1.0)) * duration)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  assert run(tmp_path / "killed").wait(timeout=300) == 0
  straight = _jsonl(tmp_path / "straight" / "metrics.jsonl")
  killed = _jsonl(tmp_path / "killed" / "metrics.jsonl")
  assert [r["step"] for r in killed] == [r["step"] for r in straight]
  for a, b in zip(straight, killed):
    assert a == b  # bit-exact: same batches, same random numbers, same float results
  assert _tb_scalars(str(tmp_path / "killed" / "tb")) == _tb_scalars(str(tmp_path / "straight" /
                                                                        "tb"))


def test_a_checkpoint_of_another_shape_is_refused_and_nothing_is_moved(tmp_path):
  _, batch_at, _, _ = _problem()
  _fit(tmp_path, batch_at, steps=6)  # checkpoints at 3 and 6, leaves of shape (4,)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"))
  wrong = {"step": jnp.zeros((), jnp.int32), "trainable": {"w": {"scale": jnp.zeros(5)}}}
  with pytest.raises(errors.WorkdirMismatch, match="nothing was moved"):
    ckpt.restore(wrong)
  assert sorted(ckpt.manager.all_steps()) == [3, 6]
  assert not os.path.exists(str(tmp_path / "checkpoints") + ".corrupt")
