r"""The paper's RL settings (PERL, Sidahmed et al. 2024), on the demo task so it runs anywhere.

  python -m perl_jax.main --config=configs/paper/rl.py --workdir=/tmp/perl_paper_rl

REINFORCE with a LoRA value baseline (the value adapter has the policy's rank), objective
(1 - beta) * reward - beta * KL(policy || anchor) with beta = 0.05, sampling temperature 0.7,
128 episodes per batch, policy learning rate in [1e-5, 1e-4] (1e-4 here: LoRA). The paper's RL
results: LoRA matches full RL with 73-80% of its accelerator memory, 1.05-1.3x faster.

`configs/paper/rl.py:small` runs every stage for CI and smoke tests, not results (about 30 s on 2
CPU cores, mostly XLA compilation): the same algorithm, beta and temperature, 2 RL steps of 2
prompts x 4 samples, 30 SFT steps (so some samples are in the task's grammar and the held-out
pairs are not all ties), 2 reward steps, 40-token sequences, a few dozen prompts.
"""
from perl_jax import config_base


def get_config(arg=None):
  arg = config_base.parse_arg(arg, small=False)
  c = config_base.base_config()
  c.rl.algorithm = "reinforce"
  c.rl.kl_coef = 0.05
  c.rl.kl_mode = "reward"
  c.rl.temperature = 0.7
  c.rl.prompts_per_step, c.rl.samples_per_prompt = 32, 4
  c.rl.train.batch_size = 128  # episodes per batch
  c.rl.optim.lr, c.rl.optim.full_lr = 1e-4, 1e-5  # LoRA, full RL (lora.rank=0)
  c.rl.train.steps = 300
  if arg.small:
    config_base.shrink_demo_task(c)
    c.rl.prompts_per_step, c.rl.samples_per_prompt = 2, 4  # the paper's 4 samples per prompt
  return c
