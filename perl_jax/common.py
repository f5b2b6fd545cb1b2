"""What every stage sets up the same way: tokenizer, model, backbone and a summary file."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib
from perl_jax import tasks
from perl_jax import tokenizer as tokenizer_lib

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def load_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  """config.tokenizer.path, else the tokenizer of config.model.checkpoint, else the task's; with
  config.tokenizer.chat_template."""
  template = config.tokenizer.chat_template
  if not config.tokenizer.path and config.model.checkpoint:
    tokenizer = _describe_checkpoint(config.model.checkpoint)[1]
    if tokenizer is None:
      raise ValueError(f"checkpoint {config.model.checkpoint} ships no sentencepiece tokenizer: "
                       f"set config.tokenizer.path")
    return tokenizer_lib.Tokenizer(tokenizer.path, tokenizer.pad_id, tokenizer.bos_id,
                                   tokenizer.eos_id, template) if template else tokenizer
  if not config.tokenizer.path and config.task not in tasks.TASKS:
    raise ValueError(f"config.tokenizer.path is empty and config.task {config.task!r} ships no "
                     f"tokenizer (tasks that do: {tasks.TASKS}): set --config.tokenizer.path")
  path = config.tokenizer.path or os.path.join(ASSETS, tasks.get(config.task).TOKENIZER)
  return tokenizer_lib.Tokenizer(path, chat_template=template)


@functools.lru_cache(maxsize=4)
def _describe_checkpoint(path: str):
  from perl_jax import checkpoints  # imported here: only runs from released checkpoints need it
  return checkpoints.describe(path)


def model_cfg(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The architecture: config.model.checkpoint's when set, else config.model.preset's."""
  m = config.model
  overrides = dict(dtype=m.dtype, param_dtype=m.param_dtype, weight_dtype=m.weight_dtype,
                   embedding_dtype=m.embedding_dtype, logprob_vocab_tile=m.logprob_vocab_tile,
                   remat=m.remat,
                   remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                   logprob_chunk_tokens=m.logprob_chunk_tokens,
                   attention_chunk=m.attention_chunk, mlp_chunk=m.mlp_chunk)
  if config.model.checkpoint:
    cfg = _describe_checkpoint(config.model.checkpoint)[0]
    if cfg.vocab_size < vocab_size:
      raise ValueError(f"tokenizer has {vocab_size} pieces but checkpoint "
                       f"{config.model.checkpoint} embeds only {cfg.vocab_size}")
    return dataclasses.replace(cfg, **overrides)
  return model_lib.model_config(config.model.preset, vocab_size=vocab_size, **overrides)


def build_model(config: ml_collections.ConfigDict, cfg: model_lib.ModelConfig,
                lora_rank: int | None = None) -> model_lib.Transformer:
  """The model with adapters as config.lora asks (lora_rank overrides config.lora.rank)."""
  lc = config.lora
  rank = lc.rank if lora_rank is None else lora_rank
  return model_lib.build(cfg, rank, lc.alpha or None, tuple(lc.targets), lc.dropout, lc.dtype)


def place(tree: Any, mesh) -> Any:
  """Puts a params / variables tree onto `mesh` by the parameter sharding rules."""
  return sharding_lib.put(tree, sharding_lib.tree_shardings(tree, mesh))


def optim_for(optim_cfg: ml_collections.ConfigDict,
              full_finetune: bool) -> ml_collections.ConfigDict:
  """A stage's optimizer settings: full fine-tuning trains at optim.full_lr (when set)."""
  if not full_finetune or not optim_cfg.full_lr:
    return optim_cfg
  resolved = optim_cfg.copy_and_resolve_references()
  resolved.lr = optim_cfg.full_lr
  return resolved


def param_report(trainable: Any, frozen: Any) -> dict:
  trained = lora_lib.count_params(trainable)
  total = trained + lora_lib.count_params(frozen)
  return {"trainable_params": trained, "total_params": total,
          "trainable_percent": 100.0 * trained / total}


def write_json(path: str, payload: dict | list) -> None:
  """`payload` as indented JSON with sorted keys (numpy values as lists), written atomically:
  a reader never sees half a file. The one JSON writer of perl_jax (summaries, checkpoint
  configs, HF and PEFT exports). Only process 0 writes: the others return (perl_jax.distributed)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def default(x):
    if isinstance(x, (np.generic, np.ndarray)):
      return x.tolist()
    return str(x)

  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, default=default, sort_keys=True)
  os.replace(path + ".tmp", path)
