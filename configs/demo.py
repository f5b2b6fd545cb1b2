r"""The embedded default: the PERL pipeline on the café-review task, on a laptop CPU.

  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo

Add --config.lora.rank=0 to run the same pipeline with full fine-tuning. The sweep below (LoRA vs
full fine-tuning, three seeds each) runs with
  python -m launch.local --config=configs/demo.py --workdir=/tmp/perl_demo_sweep

`configs/demo.py:small` runs every stage for CI and smoke tests, not results (about 30 s on 2 CPU
cores, mostly XLA compilation): 30 SFT steps (so some samples are in the task's grammar and the
held-out preference pairs are not all ties), 2 reward and 2 RL steps, batches of 8-16, 40-token
sequences, a few dozen prompts.
"""
from perl_jax import config_base

# The columns of a sweep's results table (summary.json keys).
METRICS = ("best_eval_accuracy", "reward_initial", "reward_final", "kl_final",
           "anchor_gold_reward", "gold_reward", "gold_win_rate_vs_anchor", "wall_time_s")


def get_config(arg=None):
  arg = config_base.parse_arg(arg, small=False)
  c = config_base.base_config()
  if arg.small:
    config_base.shrink_demo_task(c)
  return c


def sweep(add):
  for seed in (0, 1, 2):
    for rank in (8, 0):
      add(**{"seed": seed, "lora.rank": rank})
