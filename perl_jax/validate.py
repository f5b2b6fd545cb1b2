"""Checks a whole run config before any work: types, ranges, divisibility, stage dependencies and
data presence. Every problem is one line naming the field and what it may be."""
from __future__ import annotations

import math
import os
import re

import jax
import ml_collections

from perl_jax import errors
from perl_jax import model as model_lib
from perl_jax import quant
from perl_jax import tasks

STAGE_ORDER = ("sft", "prefs", "reward", "rl", "report")
DTYPES = ("float32", "bfloat16", "float16")


class _Problems(list):

  def need(self, ok: bool, field: str, message: str) -> None:
    if not ok:
      self.append(f"{field}: {message}")

  def number(self, cfg, prefix: str, key: str, low=None, high=None, *, integer=False,
             low_open=False, high_open=False) -> None:
    """cfg[key] is a number in [low, high] (open ends where asked)."""
    value, field = cfg[key], f"{prefix}.{key}"
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
      self.append(f"{field}: must be {kind}, got {value!r}")
      return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or (not integer and not math.isfinite(value)):
      span = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
              f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
      self.append(f"{field}: must be {kind} in {span}, got {value!r}")

  def choice(self, value, field: str, allowed) -> None:
    self.need(value in allowed, field, f"must be one of {list(allowed)}, got {value!r}")


def _train(p: _Problems, tcfg, prefix: str, data_shards: int) -> None:
  for key in ("steps", "batch_size", "accum_steps", "log_every", "checkpoint_every",
              "keep_checkpoints"):
    p.number(tcfg, prefix, key, 1, integer=True)
  p.number(tcfg, prefix, "eval_every", 0, integer=True)
  p.number(tcfg, prefix, "stop_if_stuck", 0, integer=True)
  if isinstance(tcfg.stop_if_stuck, int) and 0 < tcfg.stop_if_stuck < 5:
    p.append(f"{prefix}.stop_if_stuck: 0 (off) or at least 5 (a fresh reward head scores every "
             f"row alike for the first steps), got {tcfg.stop_if_stuck}")
  if "updates_per_batch" in tcfg:
    p.number(tcfg, prefix, "updates_per_batch", 1, integer=True)
  batch, accum = tcfg.batch_size, tcfg.accum_steps
  if isinstance(batch, int) and isinstance(accum, int) and batch >= 1 and accum >= 1:
    p.need(batch % accum == 0, f"{prefix}.accum_steps",
           f"must divide {prefix}.batch_size ({batch}), got {accum}")
    p.need(batch % data_shards == 0, f"{prefix}.batch_size",
           f"must be a multiple of the mesh's data x fsdp devices ({data_shards}), got {batch}")


def _optim(p: _Problems, ocfg, prefix: str) -> None:
  p.number(ocfg, prefix, "lr", 0, low_open=True)
  p.number(ocfg, prefix, "full_lr", 0)
  p.choice(ocfg.schedule, f"{prefix}.schedule", ("cosine", "constant"))
  p.number(ocfg, prefix, "warmup_steps", 0, integer=True)
  p.number(ocfg, prefix, "final_lr_fraction", 0, 1)
  p.number(ocfg, prefix, "weight_decay", 0)
  p.number(ocfg, prefix, "b1", 0, 1, high_open=True)
  p.number(ocfg, prefix, "b2", 0, 1, high_open=True)
  p.number(ocfg, prefix, "clip_norm", 0, low_open=True)


def _model(p: _Problems, config) -> None:
  m = config.model
  if not m.checkpoint:
    p.choice(m.preset, "model.preset", sorted(model_lib.PRESETS))
  p.choice(m.dtype, "model.dtype", DTYPES)
  p.choice(m.param_dtype, "model.param_dtype", DTYPES)
  p.choice(m.weight_dtype, "model.weight_dtype", ("",) + tuple(DTYPES) + quant.FORMATS)
  p.choice(m.embedding_dtype, "model.embedding_dtype", ("",) + tuple(DTYPES) + ("int8", "nf4"))
  frozen_stages = set(config.stages) & {"prefs", "reward", "rl"}
  for field in ("weight_dtype", "embedding_dtype"):
    if quant.is_quantized(m[field]) and frozen_stages:
      p.need(isinstance(config.lora.rank, int) and config.lora.rank > 0, f"model.{field}",
             f"{m[field]} stores a frozen backbone: it needs LoRA (lora.rank > 0), not full "
             f"fine-tuning (lora.rank=0)")
  policies = [k for k in dir(jax.checkpoint_policies) if not k.startswith("_")]
  p.need(m.remat_policy in policies, "model.remat_policy",
         f"must name a jax.checkpoint_policies policy such as 'nothing_saveable' or "
         f"'dots_saveable', got {m.remat_policy!r}")
  p.number(m, "model", "logprob_chunk_tokens", 0, integer=True)
  p.number(m, "model", "logprob_vocab_tile", 0, integer=True)
  p.number(m, "model", "attention_chunk", 0, integer=True)
  p.number(m, "model", "mlp_chunk", 0, integer=True)
  if m.backbone not in ("", "random"):
    p.need(os.path.isdir(os.path.join(os.path.expanduser(m.backbone), "sft", "backbone")),
           "model.backbone",
           f"must be '', 'random' or the workdir of a finished sft run; "
           f"{os.path.join(m.backbone, 'sft', 'backbone')} does not exist")
  looks_like_path = os.sep in m.checkpoint or m.checkpoint.endswith(".gguf")
  if m.checkpoint and looks_like_path:
    p.need(os.path.exists(os.path.expanduser(m.checkpoint)), "model.checkpoint",
           f"{m.checkpoint} does not exist")
  if config.tokenizer.path:
    p.need(os.path.isfile(os.path.expanduser(config.tokenizer.path)), "tokenizer.path",
           f"{config.tokenizer.path} is not a file")


def _lora(p: _Problems, lc) -> None:
  p.number(lc, "lora", "rank", 0, integer=True)
  p.number(lc, "lora", "alpha", 0)
  p.number(lc, "lora", "dropout", 0, 1, high_open=True)
  p.choice(lc.dtype, "lora.dtype", DTYPES)
  if isinstance(lc.rank, int) and lc.rank > 0:
    p.need(len(lc.targets) > 0, "lora.targets", "must name at least one projection regex "
           "when lora.rank > 0 (e.g. 'attn/(q|k|v|o)$')")
  for target in lc.targets:
    try:
      re.compile(target)
    except re.error as e:
      p.append(f"lora.targets: {target!r} is not a regular expression ({e})")


def _data_and_sampling(p: _Problems, config) -> None:
  d, s = config.data, config.sampling
  p.number(d, "data", "max_len", 2, integer=True)
  p.number(d, "data", "prompt_len", 1, integer=True)
  p.number(s, "sampling", "max_new_tokens", 1, integer=True)
  p.number(s, "sampling", "temperature", 0)
  p.number(s, "sampling", "top_k", 0, integer=True)
  p.number(s, "sampling", "top_p", 0, 1, low_open=True)
  if config.task == "taskmaster":
    p.need(bool(d.manual_dir) and os.path.isdir(d.manual_dir), "data.manual_dir",
           "task 'taskmaster' reads the published TM-4-2024 folder (data/ and reward/); "
           f"{d.manual_dir!r} is not a directory")


def _has_backbone(config, workdir: str, before: list[str]) -> bool:
  m = config.model
  return (m.backbone != "" or bool(m.checkpoint) or "sft" in before
          or os.path.isdir(os.path.join(workdir, "sft", "backbone")))


def _reward_data(p: _Problems, config, workdir: str, before: list[str]) -> None:
  rd = config.reward.data
  field = "reward.data.manual_dir"
  if rd.name == "jsonl_preferences" and not rd.manual_dir:
    p.need("prefs" in before or os.path.isfile(os.path.join(workdir, "prefs", "train.jsonl")),
           field, "empty means WORKDIR/prefs, written by the 'prefs' stage, which neither runs "
           "before 'reward' nor ran in this workdir: add 'prefs' to config.stages or point "
           "reward.data.manual_dir at preference files")
    return
  # Imported here: TFDS is slow to import and only runs that read preference data need it.
  from perl_jax.data import loader
  if rd.name not in loader.PREFERENCE_DATASETS:
    p.choice(rd.name, "reward.data.name", loader.PREFERENCE_DATASETS)
    return
  if not rd.manual_dir or not os.path.isdir(os.path.expanduser(rd.manual_dir)):
    p.append(f"{field}: dataset {rd.name!r} reads its published files from a directory; "
             f"{rd.manual_dir!r} is not one")
    return
  try:
    loader.check_manual_files(rd.name, os.path.expanduser(rd.manual_dir), rd.config or None)
  except ValueError as e:
    p.append(f"{field}: {e}")


def _stages(p: _Problems, config, workdir: str) -> None:
  stages = list(config.stages)
  unknown = [s for s in stages if s not in STAGE_ORDER]
  if unknown:
    p.append(f"stages: unknown {unknown}; known (in order): {list(STAGE_ORDER)}")
    return
  p.need(len(set(stages)) == len(stages) and stages == sorted(stages, key=STAGE_ORDER.index),
         "stages", f"must be distinct and in the order {list(STAGE_ORDER)}, got {stages}")
  for i, stage in enumerate(stages):
    before = stages[:i]
    if stage in ("prefs", "reward", "rl"):
      p.need(_has_backbone(config, workdir, before), "model.backbone",
             f"stage {stage!r} needs a backbone: add 'sft' before it in config.stages, set "
             f"model.checkpoint to a released model, model.backbone to a finished sft run's "
             f"workdir, or 'random'")
    if stage == "prefs":
      p.need(config.task in tasks.TASKS and tasks.has_gold_judge(config.task), "task",
             f"the prefs stage labels pairs with the task's gold judge; task "
             f"{config.task!r} has none: drop 'prefs' and point reward.data at preference data")
    if stage == "rl":
      p.need("reward" in before or os.path.isfile(os.path.join(workdir, "reward",
                                                              "result.json")),
             "stages", "stage 'rl' needs the reward model of a finished 'reward' stage: add "
             "'reward' before 'rl' (or finish it first in this workdir)")
    if stage == "reward":
      _reward_data(p, config, workdir, before)
      p.need(config.reward.data.max_len == 0 or config.reward.data.max_len >= 2,
             "reward.data.max_len",
             f"{config.reward.data.max_len} tokens: 0 (data.max_len) or at least 2")
      p.need(config.reward.pack_row_len >= 0, "reward.pack_row_len",
             f"{config.reward.pack_row_len} tokens: 0 (K x data.max_len) or a row length")
      p.need(config.reward.pack_chunk_rows >= 1, "reward.pack_chunk_rows",
             f"{config.reward.pack_chunk_rows}: at least 1 row at a time")


def _rl(p: _Problems, rc, data_shards: int) -> None:
  p.choice(rc.algorithm, "rl.algorithm", ("reinforce", "rloo", "ppo"))
  p.choice(rc.kl_mode, "rl.kl_mode", ("reward", "loss"))
  p.number(rc, "rl", "kl_coef", 0, 1, high_open=True)
  for key in ("prompts_per_step", "samples_per_prompt", "num_eval_prompts"):
    p.number(rc, "rl", key, 1, integer=True)
  p.number(rc, "rl", "num_train_prompts", 0, integer=True)
  p.number(rc, "rl", "temperature", 0)
  for key in ("value_coef", "missing_eos_penalty"):
    p.number(rc, "rl", key, 0)
  for key in ("ppo_clip", "value_clip"):
    p.number(rc, "rl", key, 0, low_open=True)
  for key in ("gamma", "gae_lambda"):
    p.number(rc, "rl", key, 0, 1)
  if rc.algorithm == "rloo" and isinstance(rc.samples_per_prompt, int):
    p.need(rc.samples_per_prompt >= 2, "rl.samples_per_prompt",
           f"rl.algorithm='rloo' needs >= 2, got {rc.samples_per_prompt}")
  if isinstance(rc.prompts_per_step, int) and isinstance(rc.samples_per_prompt, int):
    episodes = rc.prompts_per_step * rc.samples_per_prompt
    p.need(rc.train.batch_size == episodes, "rl.train.batch_size",
           f"must equal rl.prompts_per_step * rl.samples_per_prompt ({episodes}), "
           f"got {rc.train.batch_size}")
    p.need(episodes % data_shards == 0, "rl.prompts_per_step",
           f"episodes per step ({episodes}) must be a multiple of the mesh's data x fsdp "
           f"devices ({data_shards})")
  if rc.sft_adapter:
    p.need(os.path.exists(rc.sft_adapter), "rl.sft_adapter", f"{rc.sft_adapter} does not exist")


def data_shards(config) -> int:
  """Devices a batch is split over (data x fsdp); raises ConfigError for an impossible mesh."""
  from perl_jax import sharding  # the mesh rules live there
  try:
    mesh = sharding.make_mesh(config.mesh.to_dict())
  except ValueError as e:
    raise errors.ConfigError(f"mesh: {e}") from None
  return mesh.shape["data"] * mesh.shape["fsdp"]


def problems(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Every problem with `config` for a run in `workdir`, one line each (empty: fine)."""
  p = _Problems()
  shards = data_shards(config)
  p.number(config, "config", "seed", 0, integer=True)
  if config.task or config.stages:
    p.need(config.task in tasks.TASKS or config.task == "", "task",
           f"must be one of {list(tasks.TASKS)} or '', got {config.task!r}")
  _stages(p, config, workdir)
  _model(p, config)
  _lora(p, config.lora)
  _data_and_sampling(p, config)
  stages = set(config.stages)
  for stage in ("sft", "reward", "rl"):
    if stage in stages:
      _train(p, config[stage].train, f"{stage}.train", shards)
      _optim(p, config[stage].optim, f"{stage}.optim")
  if "sft" in stages:
    low = 1 if config.task == "reviews" else 0  # reviews generates its examples: 0 is none
    for key in ("num_train", "num_eval"):
      p.number(config.sft, "sft", key, low, integer=True)
    p.number(config.sft, "sft", "num_samples", 1, integer=True)
    if config.sft.adapter:
      p.need(bool(config.model.checkpoint), "sft.adapter",
             "a LoRA SFT adapts a released model: set model.checkpoint (or sft.adapter=False "
             "to train every weight)")
      p.need(config.lora.rank > 0, "sft.adapter",
             "the SFT adapter has config.lora's shape: needs lora.rank > 0")
      p.need(config.model.backbone == "", "sft.adapter",
             f"the adapter's backbone is model.checkpoint; model.backbone must be '', got "
             f"{config.model.backbone!r}")
  if "prefs" in stages:
    for key in ("num_train_prompts", "num_eval_prompts"):
      p.number(config.prefs, "prefs", key, 1, integer=True)
    p.number(config.prefs, "prefs", "bt_scale", 0, low_open=True)
  if "reward" in stages:
    p.number(config.reward, "reward", "margin", 0)
    p.number(config.reward, "reward", "eval_batch_size", 1, integer=True)
    p.number(config.reward.data, "reward.data", "max_eval_rows", 1, integer=True)
    if isinstance(config.reward.eval_batch_size, int) and config.reward.eval_batch_size >= 1:
      p.need(config.reward.eval_batch_size % shards == 0, "reward.eval_batch_size",
             f"must be a multiple of the mesh's data x fsdp devices ({shards})")
  if "rl" in stages:
    _rl(p, config.rl, shards)
  return list(p)


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises errors.ConfigError listing every problem (one line each)."""
  found = problems(config, workdir)
  if found:
    raise errors.ConfigError("\n".join(found))
