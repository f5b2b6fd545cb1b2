"""Every config in configs/ loads, is locked, names only things that exist, and runs end to end in
its small mode (big_vision's `runlocal`: `configs/NAME.py:small`, one run per dataset of a config
with DATASETS), with each stage's results present and finite. The glob picks up a new config file;
one without a small mode fails."""
import glob
import importlib.util
import json
import math
import os
import re

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags  # noqa: F401  (the loader main uses)

from perl_jax import main
from perl_jax import model as model_lib
from perl_jax import rl
from perl_jax import train as train_lib
from perl_jax import validate
from perl_jax.data import loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
# The published data in this repository's CI (../shared/data/README.md), by reward.data.name.
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
PUBLISHED = {"anthropic_hh": "hh-harmless-base", "taskmaster": "taskmaster-coffee"}


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config(), module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_is_valid(path):
  config, module = _load(path)
  args = _variants(module) or [None]
  for arg in args:
    config = _load(path, arg)[0] if arg else config
    assert config.model.preset in model_lib.PRESETS
    assert config.reward.data.name in loader.PREFERENCE_DATASETS
    rl.validate(config.rl)
    model_lib.build(model_lib.model_config(config.model.preset, vocab_size=256),
                    config.lora.rank, lora_targets=tuple(config.lora.targets))
    assert module.__doc__ and "python -m perl_jax.main" in module.__doc__  # the run command


def test_gemma3_270m_every_task_and_device_validates(tmp_path):
  """Every `:task=` on both devices passes the checks a run starts with (CI runs one of them)."""
  path = os.path.join(ROOT, "configs", "paper", "gemma3_270m.py")
  module = _load(path)[1]
  for task in module.TASKS:
    for device in ("cpu", "gpu"):
      config = module.get_config(f"task={task},device={device}")
      # Any published-layout directory will do: only the checks of the config are wanted here.
      config.data.manual_dir = config.reward.data.manual_dir = str(tmp_path)
      found = [p for p in validate.problems(config, str(tmp_path / "run"))
               if not p.startswith("reward.data.manual_dir")]
      assert not found, (task, device, found)


# ------------------------------------------------------------------------------ small modes

def _variants(module):
  """The `:arg`s a config runs under: its VARIANTS, else its DATASETS' names, else none."""
  return list(getattr(module, "VARIANTS", ())) or list(getattr(module, "DATASETS", {}))


def _small_args(path):
  """The `:arg` of each small run: "small", or "VARIANT,small" for each of a config's variants."""
  return [f"{v},small" for v in _variants(_load(path)[1])] or ["small"]


def _without_stages(config):
  values = config.to_dict()
  return values.pop("stages"), values


def _covered_by(path, arg, candidates):
  """The small run in `candidates` that runs the same config with more stages, or None."""
  stages, rest = _without_stages(_load(path, arg)[0])
  for other in candidates:
    if other != (path, arg):
      other_stages, other_rest = _without_stages(_load(*other)[0])
      if other_rest == rest and set(stages) < set(other_stages):
        return other
  return None


ALL_SMALL = [(path, arg) for path in CONFIGS for arg in _small_args(path)]
# A config whose small mode is another's with fewer stages (configs/reward.py and configs/rl.py
# are configs/demo.py's first stages) is checked to be exactly that, not run a second time.
COVERED = {run: _covered_by(*run, ALL_SMALL) for run in ALL_SMALL}
# The demo's small mode is the README's main command shrunk; tests/test_pipeline.py runs that
# command (configs/demo.py, every stage, shrunk by overrides) end to end, so the small mode is
# checked (test_small_mode_runs_as_the_pipeline_test), not run a second time.
DEMO_SMALL = (os.path.join(ROOT, "configs", "demo.py"), "small")
# configs/paper/rl.py:small is the same run as the demo's small mode but for RL batch sizes and
# learning rates (the same stages, task, model, algorithm, beta and temperature): checked to be
# that, and covered by the pipeline test, not run a third time (about a minute of CI).
PIPELINE_LIKE = [DEMO_SMALL, (os.path.join(ROOT, "configs", "paper", "rl.py"), "small")]
SMALL = [run for run in ALL_SMALL if COVERED[run] is None and run not in PIPELINE_LIKE]
SUBSETS = [run for run in ALL_SMALL if COVERED[run] is not None]


@pytest.mark.parametrize("path, arg", SUBSETS,
                         ids=[f"{os.path.relpath(p, ROOT)}:{a}" for p, a in SUBSETS])
def test_small_mode_is_a_stage_prefix_of_a_run_one(path, arg):
  other = COVERED[(path, arg)]
  stages, other_stages = _load(path, arg)[0].stages, _load(*other)[0].stages
  assert tuple(other_stages[:len(stages)]) == tuple(stages), (stages, other_stages)
  assert other in SMALL + PIPELINE_LIKE


@pytest.mark.parametrize("path, arg", PIPELINE_LIKE,
                         ids=[f"{os.path.relpath(p, ROOT)}:{a}" for p, a in PIPELINE_LIKE])
def test_small_mode_runs_as_the_pipeline_test(path, arg):
  """configs/demo.py:small (and configs/paper/rl.py:small) differ from the config
  tests/test_pipeline.py runs only in sizes and cadence: the same stages, task, model, data and
  algorithms."""
  spec = importlib.util.spec_from_file_location("pipeline", os.path.join(ROOT, "tests",
                                                                         "test_pipeline.py"))
  pipeline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pipeline)
  small, shortened = _load(path, arg)[0], _load(DEMO_SMALL[0])[0]
  _check_small_bounds(small, f"{os.path.relpath(path, ROOT)}:{arg}")
  for key, value in pipeline.SHORTENED.items():
    _get(shortened, key)  # the override names a field that exists
  sizes = re.compile(r"(steps|batch_size|num_\w+|_every|max_new_tokens|max_len|prompt_len|"
                     r"prompts_per_step|samples_per_prompt|warmup_steps|bt_scale|lr|"
                     r"max_eval_rows|eval_batch_size)$")
  flat = lambda c: {k: v for k, v in _flatten(c.to_dict()).items() if not sizes.search(k)}
  assert flat(small) == flat(shortened)


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _check_small_bounds(small, name):
  """A bound that a config ignoring the small arg fails (instead of running for hours)."""
  for stage in set(small.stages) & {"sft", "reward", "rl"}:
    tcfg = small[stage].train
    assert tcfg.steps <= 30 and tcfg.batch_size <= 16, f"{name}: {stage}.train too big"
  assert small.data.max_len <= 128, f"{name}: data.max_len too big"


@pytest.fixture(scope="module")
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module's runs: the demo-task configs compile the same
  programs (same shapes), so only the first run compiles them. Restored afterwards."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # the next compilation opens the cache in the new dir
  yield
  for key, value in before.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def _published(name):
  folder = os.path.join(SHARED_DATA, PUBLISHED[name])
  if not os.path.isdir(folder):
    # ../shared/data is provided beside the repo in CI and here; a clone without it cannot
    # run the configs that read published data (the synthetic-data configs still run).
    pytest.skip(f"published {name} data absent ({folder})")
  return folder


def _taskmaster_slice(folder):
  """The first 300 released dialogs (70/20/10% split by hash: enough SFT, RL and test turns) and
  every reward example, in the published layout: preparing all 3,710 dialogs takes seconds."""
  source = _published("taskmaster")
  os.makedirs(folder / "data")
  dialogs = json.load(open(os.path.join(source, "data", "data_00.json")))[:300]
  (folder / "data" / "data_00.json").write_text(json.dumps(dialogs, indent=4))
  os.symlink(os.path.join(source, "reward"), folder / "reward")
  return str(folder)


def _write_lines(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def _synthetic(name, folder):
  """A few rows in the published layout of a dataset that ../shared/data does not hold."""
  def text(i, kind):
    return f"answer {i} that is {kind}: " + " ".join(["word"] * (i % 5 + 1))
  if name == "tldr_comparisons":
    rows = [{"info": {"id": f"t3_{i}", "post": f"Post number {i} about my cat.", "title": "Cat",
                      "subreddit": "cats"},
             "summaries": [{"text": " " + text(i, "good")}, {"text": " " + text(i, "bad")}],
             "choice": i % 2, "split": "train" if i < 24 else "valid1"} for i in range(32)]
    _write_lines(f"{folder}/comparisons/batch3.json", rows)
  elif name == "shp":
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
      _write_lines(f"{folder}/askscience/{split}.json", [
          {"post_id": f"{split}{i}", "history": f"Question {i}: why is the sky blue?",
           "human_ref_A": text(i, "good"), "human_ref_B": text(i, "bad"), "labels": i % 2}
          for i in range(n)])
  else:
    raise AssertionError(f"no published or synthetic data for reward.data.name={name!r}: add "
                         f"it to PUBLISHED or _synthetic in {__file__}")
  return str(folder)


def _with_data(config, tmp_path):
  """The data-path overrides a small config cannot know: the published files (or a slice)."""
  if config.task == "taskmaster" and not config.data.manual_dir:
    config.data.manual_dir = _taskmaster_slice(tmp_path / "taskmaster")
  rd = config.reward.data
  if "reward" in config.stages and rd.name != "jsonl_preferences" and not rd.manual_dir:
    if rd.name in PUBLISHED:
      rd.manual_dir = _published(rd.name)
    else:
      rd.manual_dir = _synthetic(rd.name, tmp_path / rd.name)


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def _finite(stage, result, *keys):
  for key in keys:
    value = result.get(key)
    assert isinstance(value, (int, float)) and math.isfinite(value), f"[{stage}] {key} = {value!r}"


def _check_stage(stage, result, config, workdir):
  """A stage's results are there and make sense, not just that it ran."""
  if stage in ("sft", "reward", "rl"):
    assert result["steps"] == config[stage].train.steps, (stage, result["steps"])
  if stage == "sft":
    _finite(stage, result, "train_loss", "eval_nll", "eval_perplexity")
    assert 0 <= result["samples_well_formed"] <= 1
  elif stage == "prefs":
    assert result["train_pairs"] > 0 and result["eval_pairs"] > 0, result
  elif stage == "reward":
    _finite(stage, result, "train_loss", "eval_loss", "eval_accuracy")
    if config.reward.data.name == "taskmaster":  # 0/1 labels: BCE and balanced accuracy
      assert result["data_kind"] == "pointwise" and 0 <= result["eval_balanced_accuracy"] <= 1
      assert result["best_selected_by"] == "auc"  # the kept model ranks best, not the majority
    else:
      assert result["best_selected_by"] == "accuracy"
    assert 0 <= result["eval_accuracy"] <= 1 and 0 < result["trainable_percent"] <= 100
  elif stage == "rl":
    _finite(stage, result, "reward_initial", "reward_final", "kl_final", "step_time_s")
    assert 0 <= result["win_rate_vs_anchor"] <= 1
    if config.task == "taskmaster":  # the task's judge, beside the reward model
      for key in ("act_match", "call_exact_match", "well_formed"):
        assert 0 <= result[key] <= 1 and 0 <= result[f"anchor_{key}"] <= 1, (key, result)
  elif stage == "report":
    report = open(os.path.join(workdir, "report.md")).read()
    assert report
    if config.task == "taskmaster":
      assert "act match (task judge), anchor -> policy" in report
  else:
    raise AssertionError(f"no check for stage {stage!r}: add one to _check_stage")


@pytest.mark.parametrize("path, arg", SMALL,
                         ids=[f"{os.path.relpath(p, ROOT)}:{a}" for p, a in SMALL])
def test_small_mode_runs_end_to_end(path, arg, tmp_path, compilation_cache_dir, monkeypatch):
  name = os.path.relpath(path, ROOT)
  full, module = _load(path, arg.replace("small", "").strip(",") or None)
  try:
    small = _load(path, arg)[0]
  except (TypeError, ValueError) as e:
    pytest.fail(f"{name} has no small mode: its get_config(arg) must accept {arg!r} "
                f"(config_base.parse_arg(arg, small=False)) and shrink the run for CI ({e})")
  assert re.search(r"[:,]small\b", module.__doc__), f"{name}: document the small arg"
  # The same run, shrunk: the same stages, task, data and algorithm.
  for key in ("stages", "task", "reward.data.name", "reward.data.config", "rl.algorithm",
              "rl.kl_mode", "lora.targets"):
    assert _get(small, key) == _get(full, key), f"{name}:{arg} changes {key}"
  assert (small.lora.rank > 0) == (full.lora.rank > 0)
  _check_small_bounds(small, f"{name}:{arg}")  # ... and small
  _with_data(small, tmp_path)
  small.lock()  # as the command line loads it
  workdir = str(tmp_path / "workdir")
  rl_evaluations = []  # held-out RL evaluations run (each samples every eval prompt)
  make_evaluator = rl.make_evaluator

  def counting_evaluator(*args, **kwargs):
    evaluate = make_evaluator(*args, **kwargs)
    return lambda trainable: rl_evaluations.append(1) or evaluate(trainable)
  monkeypatch.setattr(rl, "make_evaluator", counting_evaluator)
  summary = main.run(small, workdir)
  if "rl" in small.stages:  # the one before training, then fit's; the last one is reused
    logged_evals = [h for h in train_lib.read_history(workdir, "rl") if "eval_reward" in h]
    assert len(rl_evaluations) == 1 + len(logged_evals), rl_evaluations
  assert set(summary["stages"]) == set(small.stages)
  for stage in small.stages:
    _check_stage(stage, summary["stages"][stage], small, workdir)
  assert json.load(open(os.path.join(workdir, "summary.json")))["stages"].keys() == set(
      small.stages)
