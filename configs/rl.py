r"""PERL RL on the demo task (no flags needed): LoRA policy vs the LoRA reward model.

  python -m perl_jax.main --config=configs/rl.py --workdir=/tmp/perl_rl

Runs (or, in an existing workdir, resumes) the SFT, preference and reward stages first, so the
reward model is found or trained. --config.rl.algorithm=rloo|ppo picks the algorithm.
"""
from perl_jax import config_base


def get_config():
  config = config_base.base_config()
  config.stages = ("sft", "prefs", "reward", "rl")
  return config
