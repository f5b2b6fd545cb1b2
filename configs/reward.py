r"""Reward modelling with LoRA on the demo task's preference pairs (no flags needed).

  python -m perl_jax.main --config=configs/reward.py --workdir=/tmp/perl_reward

Trains the SFT backbone, samples and gold-labels preference pairs, then trains a LoRA reward model
(adapter + head). --config.lora.rank=0 fine-tunes every weight instead (the paper's baseline).
Other data: --config.reward.data.name=anthropic_hh --config.reward.data.manual_dir=DIR
(with --config.tokenizer.path and --config.model.backbone for a matching model).
"""
from perl_jax import config_base


def get_config():
  config = config_base.base_config()
  config.stages = ("sft", "prefs", "reward")
  return config
