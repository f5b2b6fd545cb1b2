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
    c.data.max_len, c.data.prompt_len, c.sampling.max_new_tokens = 40, 12, 24
    c.sft.num_train, c.sft.num_eval, c.sft.num_samples = 256, 16, 8
    c.prefs.num_train_prompts = c.prefs.num_eval_prompts = 64  # one sampling program
    c.reward.data.max_eval_rows, c.reward.eval_batch_size = 16, 8
    c.rl.num_train_prompts, c.rl.num_eval_prompts = 16, 8
    c.rl.prompts_per_step, c.rl.samples_per_prompt, c.rl.train.batch_size = 4, 2, 8
    for stage, steps, batch_size in ((c.sft, 30, 16), (c.reward, 2, 8), (c.rl, 2, 8)):
      stage.train.steps, stage.train.batch_size = steps, batch_size
      stage.train.log_every = stage.train.eval_every = stage.train.checkpoint_every = steps
      stage.optim.warmup_steps = 2
  return c
