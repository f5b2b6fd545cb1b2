"""Supervised fine-tuning: next-token loss on responses given prompts.

For the demo this trains the tiny backbone from scratch on the task's corpus (full training),
giving the SFT "anchor" that the reward and RL stages adapt with LoRA; with model.checkpoint it
fine-tunes a released model: every weight (saved as sft/backbone, the later stages' backbone), or
with sft.adapter a LoRA adapter of config.lora's shape on the frozen released model (saved as
sft/adapter: the reward model keeps the released backbone, and RL starts its policy from the
adapter, which stays frozen as the anchor).
"""
from __future__ import annotations

import dataclasses

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import common
from perl_jax import evaluation
from perl_jax import lora as lora_lib
from perl_jax import roles
from perl_jax import tasks
from perl_jax import train as train_lib
from perl_jax.data import batching


def sft_loss(model):
  """Mean next-token NLL over response tokens (loss_mask marks them)."""

  def loss_fn(trainable, frozen, batch, rng):
    token_logprobs, _ = roles.token_logprobs(model, {**frozen, **trainable}, batch["tokens"],
                                             batch["input_mask"], deterministic=False, rng=rng)
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = -jnp.sum(token_logprobs * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return nll, {"tokens": jnp.sum(weights)}

  return loss_fn


def response_nll(model, variables, batch) -> dict:
  """Per row: the summed NLL of its response tokens and their count (held-out evaluation)."""
  token_logprobs, _ = roles.token_logprobs(model, variables, batch["tokens"], batch["input_mask"])
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return {"nll": -jnp.sum(token_logprobs * weights, axis=1), "tokens": jnp.sum(weights, axis=1)}


def adapter_path(workdir: str) -> str:
  """Where a LoRA SFT run (sft.adapter) saves its adapter."""
  return os.path.join(workdir, "sft", "adapter")


def run(config: ml_collections.ConfigDict, workdir: str, mesh, writer) -> dict:
  sft_cfg = config.sft
  tok = common.load_tokenizer(config)
  task = tasks.get(config.task)
  train_pairs, eval_pairs = task.sft_pairs(config, workdir)
  what = f"a LoRA rank-{config.lora.rank} adapter" if sft_cfg.adapter else "every weight"
  print(f"[sft] task {config.task}: {len(train_pairs)} train / {len(eval_pairs)} held-out "
        f"examples; training {what}", flush=True)
  train_arrays = batching.encode_sft(tok, train_pairs, config.data.max_len)
  eval_arrays = batching.encode_sft(tok, eval_pairs, config.data.max_len)
  if sft_cfg.adapter:  # LoRA on the frozen released model, stored as the later stages store it
    model = common.build_model(config, common.model_cfg(config, tok.vocab_size))
    trainable = {lora_lib.ADAPTER: roles.new_adapter(model, config.seed + 5, mesh)}
    frozen = {"params": roles.load_released(config, mesh)}
  else:
    # Full SFT trains every weight in param_dtype: model.weight_dtype applies to the frozen
    # backbone the later stages load from it.
    cfg = dataclasses.replace(common.model_cfg(config, tok.vocab_size), weight_dtype="",
                              embedding_dtype="")
    model = common.build_model(config, cfg, lora_rank=0)
    if config.model.checkpoint:  # fine-tune a released model
      initial = roles.load_released(config, mesh, float_model=True)
    else:  # the demo trains its tiny backbone from scratch
      initial = roles.new_backbone(model, config.seed, mesh)
    trainable, frozen = lora_lib.split_variables({"params": initial}, full_finetune=True)
  loss_fn = sft_loss(model)
  row_nll = jax.jit(lambda t, b: response_nll(model, {**frozen, **t}, b))

  def eval_fn(trainable):  # token-weighted over every held-out row
    rows = evaluation.per_row(lambda b: row_nll(trainable, b), eval_arrays,
                              sft_cfg.train.batch_size, mesh, "sft")
    nll = float(rows["nll"].sum() / max(rows["tokens"].sum(), 1.0))
    return {"nll": nll, "perplexity": float(np.exp(nll))}

  result = train_lib.fit(
      name="sft", workdir=os.path.join(workdir, "sft"), train_cfg=sft_cfg.train,
      optim_cfg=common.optim_for(sft_cfg.optim, not sft_cfg.adapter), seed=config.seed,
      mesh=mesh, loss_fn=loss_fn, trainable=trainable, frozen=frozen,
      batch_at=lambda s: batching.batch_at(train_arrays, s, sft_cfg.train.batch_size, config.seed),
      eval_fn=eval_fn, meta={"stage": "sft", "model": config.model.to_dict()}, writer=writer)
  tuned = result["state"]["trainable"]
  if sft_cfg.adapter:
    checkpoint_lib.save_tree(adapter_path(workdir), tuned[lora_lib.ADAPTER])
  else:
    checkpoint_lib.save_tree(os.path.join(workdir, "sft", "backbone"), tuned["params"])
  sample_prompts, judge = task.eval_set(config, workdir, sft_cfg.num_samples)
  samples = roles.sample_texts(model, {**frozen, **tuned}, tok, sample_prompts, config,
                               jax.random.key(config.seed + 1))
  texts = [text for _, text in samples]
  well_formed = float(np.mean([task.is_well_formed(text) for text in texts]))
  judged = {f"samples_{k}": float(np.nanmean(v)) for k, v in judge(texts).items()}
  eval_metrics = eval_fn(tuned)
  print(f"[sft] held-out perplexity {eval_metrics['perplexity']:.3f}; "
        f"{100 * well_formed:.0f}% of samples are well-formed; " +
        ", ".join(f"{k} {v:.3f}" for k, v in judged.items()), flush=True)
  for prompt, text in samples[:3]:
    print(f"[sft] sample: {prompt[-200:]} {text}", flush=True)
  return {"eval_nll": eval_metrics["nll"], "eval_perplexity": eval_metrics["perplexity"],
          "samples_well_formed": well_formed, **judged,
          "train_loss": result["final_metrics"].get("loss"),
          "steps": result["steps"], "step_time_s": result["step_time_s"],
          "samples": [f"{p[-200:]} {s}" for p, s in samples[:5]],
          **common.param_report(tuned, frozen)}
