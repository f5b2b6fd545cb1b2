"""The tasks a pipeline runs (config.task): where its SFT pairs, RL prompts and judges come from.

Each task module provides
  TOKENIZER                   the shipped sentencepiece model (perl_jax/assets/)
  sft_pairs(config, workdir)  -> (train, held-out) lists of (prompt, response)
  rl_prompts(config, workdir) -> the RL training prompts
  eval_set(config, workdir, n=None)
                              -> (n or rl.num_eval_prompts held-out prompts, judge):
                                 judge(texts) -> {metric: [N] array}
                                 scores samples without the reward model (NaN = not applicable);
                                 a "gold_reward" metric also gets a win rate vs the anchor
  is_well_formed(text)        -> whether a sample has the task's form
Tasks with a gold judge (the prefs stage samples and labels preference pairs with it) also have
  gold_reward(text)           -> the gold score of one response
  train_prompts(n, seed), eval_prompts(n)
                              -> prompts for training and held-out pairs (disjoint)
"""
from __future__ import annotations

import importlib

TASKS = ("reviews", "taskmaster")


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown config.task {name!r}; known: {TASKS}")
  return importlib.import_module(f"perl_jax.tasks.{name}")


def has_gold_judge(name: str) -> bool:
  """Whether the task can label preference pairs itself (the prefs stage)."""
  task = get(name)
  return all(hasattr(task, f) for f in ("gold_reward", "train_prompts", "eval_prompts"))
