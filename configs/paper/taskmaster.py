r"""Taskmaster-4 Coffee end to end on the data released with PERL, sized for a CPU.

  python -m perl_jax.main --config=configs/paper/taskmaster.py --workdir=/tmp/perl_taskmaster \
      --config.data.manual_dir=PATH/TO/TM-4-2024

PATH/TO/TM-4-2024 holds data/data_*.json (dialogs) and reward/reward_*.json (reward examples)
of github.com/google-research-datasets/Taskmaster (CC BY 4.0); in this repository's CI,
../shared/data/taskmaster-coffee. Stages (see perl_jax/tasks/taskmaster.py):
  sft     a 1.08M-parameter model from scratch on the agent turns of 70% of the dialogs;
  reward  LoRA binary classifier (BCE) on the reward examples (held-out: balanced accuracy too);
  rl      PERL REINFORCE with a LoRA value baseline on contexts of another 20% of the dialogs,
          evaluated on the 10% test dialogs against the published next turns.
The paper trains a PaLM 2 S reward classifier on these examples; measured results at this CPU size
are in README.md and experiments/README.md.

`configs/paper/taskmaster.py:small` runs every stage for CI and smoke tests, not results (about
20 s on 2 CPU cores, mostly XLA compilation): 2 steps per stage, batches of 8, 96-token sequences
(64-token contexts, 16 new tokens), 256 SFT demonstrations, a few held-out rows and prompts. It
reads the same published files (--config.data.manual_dir).
"""
from perl_jax import config_base


def get_config(arg=None):
  arg = config_base.parse_arg(arg, small=False)
  c = config_base.base_config()
  c.task = "taskmaster"
  c.stages = ("sft", "reward", "rl", "report")
  c.model.preset = "demo"  # its vocabulary is replaced by the shipped 1024-piece tokenizer's
  c.data.max_len = 256
  c.data.prompt_len = 192
  c.sampling.max_new_tokens = 80  # 99% of the published agent turns fit
  c.sampling.temperature = 0.0  # SFT samples: greedy
  c.sft.num_train = 0  # every training demonstration (15,203)
  c.sft.num_eval = 512
  c.sft.num_samples = 128
  c.sft.train.steps = 500
  c.sft.train.eval_every = 250
  c.sft.train.checkpoint_every = 100
  c.sft.optim.lr = 3e-3
  c.reward.data.name = "taskmaster"
  c.reward.data.manual_dir = c.data.get_ref("manual_dir")
  c.reward.train.steps = 200
  c.reward.train.eval_every = 50
  c.reward.train.checkpoint_every = 50
  c.rl.num_train_prompts = 0  # every context of the RL dialogs (4,488)
  c.rl.num_eval_prompts = 128
  c.rl.train.steps = 60
  c.rl.train.eval_every = 20
  c.rl.train.checkpoint_every = 20
  if arg.small:
    c.data.max_len, c.data.prompt_len, c.sampling.max_new_tokens = 96, 64, 16
    c.sft.num_train, c.sft.num_eval, c.sft.num_samples = 256, 16, 8
    c.reward.data.max_eval_rows, c.reward.eval_batch_size = 16, 8
    c.rl.num_train_prompts, c.rl.num_eval_prompts = 16, 8
    config_base.shrink_stages(c, steps=2, batch_size=8)
  return c


METRICS = ("eval_perplexity", "eval_balanced_accuracy", "best_eval_accuracy", "act_match",
           "call_exact_match", "kl_final")


def sweep(add):
  """LoRA ranks vs full tuning for the reward and RL stages on one SFT run:
  python -m launch.local --config=configs/paper/taskmaster.py --workdir=DIR \\
      --set=data.manual_dir=TM-4-2024 --set=model.backbone=SFT_WORKDIR \\
      --set="stages=('reward', 'rl', 'report')"
  """
  for rank in (1, 8, 32, 0):
    add(**{"lora.rank": rank, "lora.alpha": float(max(rank, 1)) * 2})
