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

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib
from perl_jax import tasks
from perl_jax import tokenizer as tokenizer_lib

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def load_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  """config.tokenizer.path, else the tokenizer of config.model.checkpoint, else the task's."""
  if not config.tokenizer.path and config.model.checkpoint:
    tokenizer = _describe_checkpoint(config.model.checkpoint)[1]
    if tokenizer is None:
      raise ValueError(f"checkpoint {config.model.checkpoint} ships no sentencepiece tokenizer: "
                       f"set config.tokenizer.path")
    return tokenizer
  if not config.tokenizer.path and config.task not in tasks.TASKS:
    raise ValueError(f"config.tokenizer.path is empty and config.task {config.task!r} ships no "
                     f"tokenizer (tasks that do: {tasks.TASKS}): set --config.tokenizer.path")
  path = config.tokenizer.path or os.path.join(ASSETS, tasks.get(config.task).TOKENIZER)
  return tokenizer_lib.Tokenizer(path)


@functools.lru_cache(maxsize=4)
def _describe_checkpoint(path: str):
  from perl_jax import checkpoints  # imported here: only runs from released checkpoints need it
  return checkpoints.describe(path)


def model_cfg(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The architecture: config.model.checkpoint's when set, else config.model.preset's."""
  overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   remat=config.model.remat)
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
  return jax.device_put(tree, sharding_lib.tree_shardings(tree, mesh))


def init_backbone(model: model_lib.Transformer, seed: int, mesh) -> dict:
  return place(model_lib.init_variables(model, jax.random.key(seed))["params"], mesh)


def load_backbone(sft_dir: str, model: model_lib.Transformer, mesh) -> dict:
  """The backbone a finished SFT stage saved in `sft_dir/backbone`, placed onto `mesh`."""
  abstract = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))["params"]
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, sharding_lib.tree_shardings(abstract, mesh))
  return checkpoint_lib.load_tree(os.path.join(sft_dir, "backbone"), abstract)


def backbone_for(config: ml_collections.ConfigDict, workdir: str,
                 model: model_lib.Transformer, mesh) -> dict:
  """The frozen backbone as config.model.backbone says (see config_base), on `mesh`."""
  source = config.model.backbone
  if source == "random":
    return init_backbone(model, config.seed, mesh)
  sft_dir = os.path.join(source or workdir, "sft")
  if not source and config.model.checkpoint and not os.path.isdir(
      os.path.join(sft_dir, "backbone")):
    return load_released(config, mesh)
  if not os.path.isdir(os.path.join(sft_dir, "backbone")):
    raise FileNotFoundError(
        f"no SFT backbone in {sft_dir}: run the 'sft' stage first (add it to config.stages), "
        f"point config.model.backbone at a finished run's workdir, or use 'random'")
  return load_backbone(sft_dir, model, mesh)


def optim_for(optim_cfg: ml_collections.ConfigDict,
              full_finetune: bool) -> ml_collections.ConfigDict:
  """A stage's optimizer settings: full fine-tuning trains at optim.full_lr (when set)."""
  if not full_finetune or not optim_cfg.full_lr:
    return optim_cfg
  resolved = optim_cfg.copy_and_resolve_references()
  resolved.lr = optim_cfg.full_lr
  return resolved


def load_released(config: ml_collections.ConfigDict, mesh) -> dict:
  """The params of config.model.checkpoint, streamed onto `mesh` as model.param_dtype."""
  from perl_jax import checkpoints
  return checkpoints.load_checkpoint(config.model.checkpoint, mesh, config.model.param_dtype)[1]


def param_report(trainable: Any, frozen: Any) -> dict:
  trained = lora_lib.count_params(trainable)
  total = trained + lora_lib.count_params(frozen)
  return {"trainable_params": trained, "total_params": total,
          "trainable_percent": 100.0 * trained / total}


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def default(x):
    if isinstance(x, (np.generic, np.ndarray)):
      return x.tolist()
    return str(x)

  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, default=default, sort_keys=True)
  os.replace(path + ".tmp", path)
