r"""PERL RL on the demo task (no flags needed): LoRA policy vs the LoRA reward model.

  python -m perl_jax.main --config=configs/rl.py --workdir=/tmp/perl_rl

Runs (or, in an existing workdir, resumes) the SFT, preference and reward stages first, so the
reward model is found or trained. --config.rl.algorithm=rloo|ppo picks the algorithm.

`configs/rl.py:small` runs the four stages for CI and smoke tests, not results (about 30 s on 2
CPU cores, mostly XLA compilation): 30 SFT steps (so some samples are in the task's grammar and the
held-out pairs are not all ties), 2 reward and 2 RL steps, batches of 8-16, 40-token sequences, a
few dozen prompts.
"""
from perl_jax import config_base


def get_config(arg=None):
  arg = config_base.parse_arg(arg, small=False)
  c = config_base.base_config()
  c.stages = ("sft", "prefs", "reward", "rl")
  if arg.small:
    config_base.shrink_demo_task(c)
  return c
