r"""The paper's reward-model settings (PERL, Sidahmed et al. 2024, Sec. 4 / App. A), per dataset.

  python -m perl_jax.main --config=configs/paper/reward.py:hh_harmless --workdir=DIR \
      --config.reward.data.manual_dir=/data/hh-rlhf --config.model.backbone=SFT_WORKDIR \
      --config.tokenizer.path=tokenizer.model

The sweep (LoRA ranks 1-16 at the paper's LoRA learning rates, and full tuning at 1e-5):
  python -m launch.tpu_vm --config=configs/paper/reward.py:hh_harmless --tpu=NAME --zone=ZONE \
      --workdir=gs://BUCKET/perl/hh_rm

Datasets (the `:arg`): hh_harmless (Anthropic HH harmless-base), tldr (OpenAI summarize-from-feedback
comparisons), shp (Stanford Human Preferences), taskmaster (Taskmaster Coffee reward examples,
pointwise 0/1 labels trained with binary cross-entropy).

The paper's settings: batch 128, 5,000 steps, best-validation checkpoint, learning rate 1e-4 to 2e-4
for LoRA (ranks 1 to 16) and 1e-5 for full tuning (--config.lora.rank=0 trains at
config.reward.optim.full_lr).
The paper tunes PaLM 2 S; this config uses the gemma-2b architecture, whose weights
`config.model.backbone` must provide. Their published LoRA vs full accuracies (PaLM 2 S): harmless
78.7 vs 76.6, SHP 82.2 vs 83.2, TL;DR 79.7 vs 78.7.

`configs/paper/reward.py:hh_harmless,small` (any dataset) runs the stage for CI and smoke tests,
not results (about 10 s on 2 CPU cores): a random `demo`-preset backbone in place of gemma-2b
(nothing to download), the shipped Taskmaster tokenizer, float32 (bfloat16 doubles the CPU
compile time), 64-token sequences, 2 steps of 16 pairs (2 micro-batches), 16 held-out rows; remat
and LoRA as above. The data still comes from --config.reward.data.manual_dir.
"""
import os

from perl_jax import config_base

DATASETS = {
    "hh_harmless": dict(name="anthropic_hh", config="harmless-base", train_split="train",
                        eval_split="test"),
    "tldr": dict(name="tldr_comparisons", config="", train_split="train",
                 eval_split="validation"),
    "shp": dict(name="shp", config="", train_split="train", eval_split="validation"),
    "taskmaster": dict(name="taskmaster", config="", train_split="train", eval_split="test"),
}


def get_config(arg=None):
  arg = config_base.parse_arg(arg, dataset="hh_harmless", small=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {arg.dataset!r}; use one of {sorted(DATASETS)}")
  c = config_base.base_config()
  # No task: the data is config.reward.data, and config.tokenizer.path must name the backbone's
  # tokenizer (a task's shipped tokenizer would not match gemma-2b's embeddings).
  c.task = ""
  c.stages = ("reward",)
  c.model.preset = "gemma-2b"
  c.model.dtype = c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.data.max_len = 1024
  c.lora.rank, c.lora.alpha = 4, 4.0  # the paper sweeps ranks 1-16
  for key, value in DATASETS[arg.dataset].items():
    c.reward.data[key] = value
  c.reward.train.steps = 5000
  c.reward.train.batch_size = 128
  c.reward.train.accum_steps = 8  # 16 pairs per micro-batch; raise on larger accelerators
  c.reward.train.eval_every = 250
  c.reward.train.checkpoint_every = 250
  c.reward.train.log_every = 50
  c.reward.optim.lr, c.reward.optim.full_lr = 1e-4, 1e-5
  c.reward.optim.warmup_steps = 100
  if arg.small:
    c.model.preset, c.model.backbone = "demo", "random"
    c.model.dtype = c.model.param_dtype = "float32"
    c.tokenizer.path = os.path.join(os.path.dirname(config_base.__file__), "assets",
                                    "taskmaster_sp1024.model")
    c.data.max_len = 64
    c.reward.train.steps, c.reward.train.batch_size, c.reward.train.accum_steps = 2, 16, 2
    c.reward.train.log_every = c.reward.train.eval_every = c.reward.train.checkpoint_every = 2
    c.reward.optim.warmup_steps = 1
    c.reward.data.max_eval_rows, c.reward.eval_batch_size = 16, 8
  return c


METRICS = ("eval_accuracy", "best_eval_accuracy", "eval_loss", "trainable_percent", "step_time_s")


def sweep(add):
  for rank in (1, 4, 8, 16):
    for lr in (1e-4, 2e-4):
      add(**{"lora.rank": rank, "lora.alpha": float(rank), "reward.optim.lr": lr})
  add(**{"lora.rank": 0})  # at reward.optim.full_lr
