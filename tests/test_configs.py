"""Every config in configs/ loads, is locked, and names only things that exist."""
import glob
import os

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main uses)

from perl_jax import model as model_lib
from perl_jax import rl
from perl_jax.data import preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))


def _load(path, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config(), module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_is_valid(path):
  config, module = _load(path)
  args = list(getattr(module, "DATASETS", {})) or [None]
  for arg in args:
    config = _load(path, arg)[0] if arg else config
    assert config.model.preset in model_lib.PRESETS
    assert config.reward.data.name in preferences.PREFERENCE_DATASETS
    rl.validate(config.rl)
    model_lib.build(model_lib.model_config(config.model.preset, vocab_size=256),
                    config.lora.rank, lora_targets=tuple(config.lora.targets))
    assert module.__doc__ and "python -m perl_jax.main" in module.__doc__  # the run command
