r"""Reward modelling with LoRA on the demo task's preference pairs (no flags needed).

  python -m perl_jax.main --config=configs/reward.py --workdir=/tmp/perl_reward

Trains the SFT backbone, samples and gold-labels preference pairs, then trains a LoRA reward model
(adapter + head). --config.lora.rank=0 fine-tunes every weight instead (the paper's baseline).
Other data: --config.reward.data.name=anthropic_hh --config.reward.data.manual_dir=DIR
(with --config.tokenizer.path and --config.model.backbone for a matching model).

`configs/reward.py:small` runs the three stages for CI and smoke tests, not results (about 20 s on
2 CPU cores, mostly XLA compilation): 30 SFT steps (so some samples are in the task's grammar and
the held-out pairs are not all ties), 2 reward steps, batches of 8-16, 40-token sequences, a few
dozen prompts.
"""
from perl_jax import config_base


def get_config(arg=None):
  arg = config_base.parse_arg(arg, small=False)
  c = config_base.base_config()
  c.stages = ("sft", "prefs", "reward")
  if arg.small:
    config_base.shrink_demo_task(c)
  return c
