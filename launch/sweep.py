"""Sweeps as data: a config file's `sweep(add)` lists its trials; launchers only iterate them.

A config file may define, beside `get_config`,

    def sweep(add):
      for rank in (4, 8, 16, 0):
        add(**{"lora.rank": rank})

and optionally `METRICS`, the summary.json keys a results table shows. Each `add(**overrides)` is
one trial: dotted config paths mapped to values, passed to `perl_jax.main` as
`--config.PATH=VALUE`. A file without `sweep` is one trial. `product` builds grids, like
big_vision's `hyper.product`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import sys
from typing import Any

DEFAULT_METRICS = ("eval_accuracy", "best_eval_accuracy", "reward_initial", "reward_final",
                   "kl_final", "gold_win_rate_vs_anchor", "step_time_s", "wall_time_s")


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str  # also the trial's workdir below the sweep's
  overrides: tuple[tuple[str, Any], ...]

  def flags(self) -> list[str]:
    return [f"--config.{path}={format_value(value)}" for path, value in self.overrides]


def format_value(value: Any) -> str:
  """A value as ml_collections' config flags parse it back."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def product(**axes) -> list[dict]:
  """Every combination of the value lists: product(**{"lora.rank": [4, 8], "seed": [0, 1]})."""
  names = list(axes)
  return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def load_config_file(spec: str):
  """(module, arg) for `configs/x.py` or `configs/x.py:arg`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(
      "perl_config_" + re.sub(r"\W", "_", os.path.abspath(path)), path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[module_spec.name] = module
  module_spec.loader.exec_module(module)
  return module, arg or None


def _trial_name(overrides: dict) -> str:
  if not overrides:
    return "default"
  parts = [f"{path.split('.')[-1]}={format_value(value)}" for path, value in overrides.items()]
  return re.sub(r"[^A-Za-z0-9_.=,-]", "", ",".join(parts))


def parse_settings(settings: list[str]) -> dict:
  """["data.manual_dir=/data/tm", ...] (a launcher's --set) as {path: value text}."""
  out = {}
  for setting in settings:
    path, sep, value = setting.partition("=")
    if not sep or not path:
      raise ValueError(f"--set wants PATH=VALUE (a config path, e.g. data.manual_dir=/data), "
                       f"got {setting!r}")
    out[path] = value
  return out


def trials(spec: str, common: dict | None = None) -> list[Trial]:
  """The trials of config file `spec`, each checked against the config it overrides.

  `common` overrides (e.g. where the data is) go to every trial but not into its name.
  """
  module, arg = load_config_file(spec)
  config = module.get_config(arg) if arg else module.get_config()
  collected: list[dict] = []
  if hasattr(module, "sweep"):
    module.sweep(lambda **overrides: collected.append(overrides))
    if not collected:
      raise ValueError(f"{spec}: sweep(add) added no trial")
  else:
    collected = [{}]
  out = []
  for i, overrides in enumerate(collected):
    for path, value in overrides.items():
      _check_override(config, path, value, f"{spec}: trial {i} ({overrides})")
    for path, value in (common or {}).items():
      _check_override(config, path, value, f"{spec}: --set {path}={value}")
    out.append(Trial(_trial_name(overrides), tuple(overrides.items())
                     + tuple((common or {}).items())))
  names = [t.name for t in out]
  if len(set(names)) != len(names):
    raise ValueError(f"{spec}: sweep adds the same trial twice: {names}")
  return out


def _check_override(config, path: str, value, where: str) -> None:
  node, parts = config, path.split(".")
  for depth, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise ValueError(f"{where}: no config field {path!r} (no {'.'.join(parts[:depth + 1])!r})")
    node = node[part]
  if isinstance(node, bool) != isinstance(value, bool):
    raise ValueError(f"{where}: {path} is a {type(node).__name__}, got {value!r}")


def metric_names(spec: str) -> tuple[str, ...]:
  module, _ = load_config_file(spec)
  return tuple(getattr(module, "METRICS", DEFAULT_METRICS))


def main_command(spec: str, trial: Trial, workdir: str, python: str = "python3",
                 distributed: bool = False) -> list[str]:
  """The perl_jax.main command line of one trial, in `workdir/<trial.name>`."""
  return ([python, "-m", "perl_jax.main"] + (["--distributed"] if distributed else [])
          + [f"--config={spec}", f"--workdir={workdir.rstrip('/')}/{trial.name}"] + trial.flags())
