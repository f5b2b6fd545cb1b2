"""Accelerator memory of the real train steps, read from XLA without running them.

`reward_step_memory` and `rl_step_memory` lower and compile the same jitted steps the stages run
(from shapes only: nothing is allocated), and report XLA's `memory_analysis()` plus the bytes of
every resident model copy and optimizer state. Full fine-tuning is the baseline layout: its own
copy of the weights per trained role, Adam states for each.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import ml_collections

from perl_jax import logprobs as logprobs_lib
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import quant
from perl_jax import reward as reward_lib
from perl_jax import rl
from perl_jax import sampling
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib

GiB = 1024 ** 3


def _bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _compiled_stats(step, state, frozen, batch, mesh=None) -> dict:
  """XLA's memory analysis of the step jitted as `fit` jits it (per device on a mesh)."""
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  if mesh is None:
    jitted = jax.jit(step, donate_argnums=(0,))
  else:
    jitted = train_lib.sharded_train_step(step, mesh, state, frozen)[0]
  return _memory_of(jitted.lower(state, frozen, batch, rng).compile())


def _memory_of(compiled) -> dict:
  """train.compiled_memory of a compiled computation, plus its largest buffers."""
  stats = train_lib.compiled_memory(compiled)
  stats["largest_buffers"] = largest_buffers(compiled.as_text())
  return stats


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
             "u32": 4, "f32": 4, "f64": 8}


def largest_buffers(hlo_text: str, top: int = 4) -> list[str]:
  """The largest array shapes the optimised HLO produces (a pointer to what dominates the
  temporaries: XLA's buffer assignment itself is not exposed by the compiled object)."""
  sizes, in_fusion = {}, False
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and not line.startswith(" "):  # a computation starts
      # Values inside a fusion are computed element by element, never stored whole.
      in_fusion = "fused" in line.split("(", 1)[0] or "wrapped" in line.split("(", 1)[0]
      continue
    if (in_fusion or "=" not in line or " parameter(" in line
        or line.lstrip().startswith(("ROOT tuple", "//"))):
      continue
    match = _SHAPE.search(line.split("=", 1)[1])
    if match:
      dims = [int(d) for d in match.group(2).split(",") if d]
      sizes[f"{match.group(1)}[{','.join(map(str, dims))}]"] = (
          math.prod(dims) * _ITEMSIZE[match.group(1)])
  ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
  return [f"{shape} {size / 2 ** 20:.0f} MiB" for shape, size in ranked]


def analytic_bytes(cfg: model_lib.ModelConfig, sequences: int, seq_len: int, trainable: int,
                   total: int, passes: int = 1, logit_tokens: int = 0,
                   full_copies: int = 0, weights_bytes: int | None = None,
                   logit_columns: int | None = None) -> dict:
  """A count by hand of one train step's memory on an accelerator (bf16 matmuls native).

  weights: the backbone in param_dtype (plus `full_copies` trained copies under full tuning),
  or `weights_bytes` when given (a quantised backbone: its codes and scales);
  optimizer: f32 Adam moments (train.in_float32) and the gradient in the trainable leaves'
  dtype (f32 adapters; param_dtype under full tuning); saved: the layer
  inputs that scan + remat keeps for the backward pass, per differentiated forward (`passes`);
  layer: the working set of one layer recomputed and differentiated (f32 attention scores,
  probabilities and their gradient; the MLP's gate, up, activation and their gradients, for
  one block of model.mlp_chunk positions);
  logits: one chunk of f32 logits (`logit_columns` vocabulary rows of it at a time: the whole
  vocabulary, or one tile of model.logprob_vocab_tile plus that tile of the table in the
  compute dtype), its softmax and gradient (log-prob steps only).
  """
  act = jnp.dtype(cfg.dtype).itemsize
  param = jnp.dtype(cfg.param_dtype).itemsize
  tokens = sequences * seq_len
  grad = 4 if full_copies == 0 else param  # f32 adapters; full tuning: gradients as the weights
  out = {"weights": total * param if weights_bytes is None else weights_bytes,
         "optimizer": trainable * (8 + grad),
         "saved": passes * cfg.num_layers * tokens * cfg.d_model * act,
         "layer": (3 * sequences * cfg.num_heads * seq_len * seq_len * 4
                   + 6 * tokens // model_lib.mlp_blocks(cfg, seq_len) * cfg.mlp_dim * act),
         "logits": 0}
  if logit_tokens:
    columns = logit_columns or cfg.vocab_size
    table_tile = columns * cfg.d_model * act if columns < cfg.vocab_size else 0
    out["logits"] = 3 * logit_tokens * columns * 4 + table_tile
  out["total"] = sum(out.values())
  return out


def constant_adamw(lr: float) -> ml_collections.ConfigDict:
  """Optimizer settings (config.<stage>.optim's fields) of the measurements and benchmarks:
  AdamW(b1 0.9, b2 0.999, no weight decay) at a constant `lr` from step 0, clipped to global
  norm 1 (transformers' defaults, as the peer benchmarks run them)."""
  return ml_collections.ConfigDict(dict(lr=lr, full_lr=0.0, schedule="constant", warmup_steps=0,
                                        final_lr_fraction=1.0, weight_decay=0.0, b1=0.9,
                                        b2=0.999, clip_norm=1.0))


def _optimizer():
  return train_lib.make_optimizer(constant_adamw(1e-4), 1000)


def _state(trainable, optimizer):
  return {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable,
          "opt_state": jax.eval_shape(optimizer.init, trainable)}


def reward_step_memory(cfg: model_lib.ModelConfig, lora_rank: int, batch_pairs: int,
                       seq_len: int, targets=("attn/(q|k|v|o)$",), mesh=None) -> dict:
  """Memory of one reward-model train step (pairs: chosen + rejected in one pass)."""
  model = model_lib.build(cfg, lora_rank, lora_targets=targets)
  variables = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0),
                                                              score_head=True))
  trainable, frozen = lora_lib.split_variables(variables, lora_rank == 0)
  optimizer = _optimizer()
  state = _state(trainable, optimizer)
  batch = {"tokens": jax.ShapeDtypeStruct((batch_pairs, 2, seq_len), jnp.int32),
           "input_mask": jax.ShapeDtypeStruct((batch_pairs, 2, seq_len), bool),
           "label": jax.ShapeDtypeStruct((batch_pairs,), jnp.float32)}
  step = train_lib.make_train_step(reward_lib.reward_loss_fn(model, 0.0), optimizer, 1)
  stats = _compiled_stats(step, state, frozen, batch, mesh)
  stats.update(trainable_params=lora_lib.count_params(trainable),
               total_params=_logical_params(cfg, lora_rank, targets, score_head=True),
               weights_bytes=_bytes(variables), optimizer_bytes=_bytes(state["opt_state"]),
               adapter_bytes=_bytes(variables.get(lora_lib.ADAPTER, {})))
  stats["analytic"] = analytic_bytes(cfg, 2 * batch_pairs, seq_len, stats["trainable_params"],
                                     stats["total_params"] - (stats["trainable_params"]
                                                              if lora_rank else 0),
                                     full_copies=0 if lora_rank else 1,
                                     weights_bytes=_quantized_weights(cfg, variables))
  return stats


def sampling_memory(cfg: model_lib.ModelConfig, lora_rank: int, batch: int, prompt_len: int,
                    new_tokens: int, targets=("attn/(q|k|v|o)$",)) -> dict:
  """Memory of one rollout on one device: sampling.sample (prefill + KV-cache decode scan,
  temperature 1) with the policy's adapter over the frozen backbone."""
  model = model_lib.build(cfg, lora_rank, lora_targets=targets)
  variables = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))
  prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, prompt_len), bool)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return _memory_of(sampling.sample.lower(
      model, variables, prompts, mask, rng,
      sampling.SamplingConfig(max_new_tokens=new_tokens)).compile())


def _logical_params(cfg, lora_rank, targets, score_head=False) -> int:
  """Parameters of the model as floats (a quantised kernel counts its weights, not its codes)."""
  float_cfg = dataclasses.replace(cfg, weight_dtype="", embedding_dtype="")
  return model_lib.param_counts(model_lib.build(float_cfg, lora_rank, lora_targets=targets),
                                score_head)["total"]


def _quantized_weights(cfg, variables) -> int | None:
  """The stored backbone's bytes when its kernels are quantised (None: analytic_bytes counts)."""
  stored = quant.is_quantized(cfg.weight_dtype) or quant.is_quantized(cfg.embedding_dtype)
  return _bytes(variables["params"]) if stored else None


def rl_step_memory(cfg: model_lib.ModelConfig, lora_rank: int, episodes: int, prompt_len: int,
                   new_tokens: int, algorithm: str = "reinforce",
                   targets=("attn/(q|k|v|o)$",), mesh=None) -> dict:
  """Memory of one RL update (policy + value) plus the resident reward model and anchor.

  LoRA (PERL): one backbone shared by anchor, policy, value and reward model; adapters, heads and
  their Adam states on top. Full (RLHF): anchor weights, a reward model copy, and trained policy
  and value copies with Adam states.
  """
  model = model_lib.build(cfg, lora_rank, lora_targets=targets)
  full = lora_rank == 0
  backbone = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))["params"]
  trainable, frozen = jax.eval_shape(
      lambda b: rl.init_roles(model, b, full, 0, with_value=algorithm != "rloo", mesh=mesh),
      backbone)
  optimizer = _optimizer()
  state = _state(trainable, optimizer)
  n = new_tokens
  seq = prompt_len + n
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = {"tokens": jax.ShapeDtypeStruct((episodes, seq), jnp.int32),
           "input_mask": jax.ShapeDtypeStruct((episodes, seq), bool),
           "completion_mask": jax.ShapeDtypeStruct((episodes, n), bool),
           "returns": f32(episodes), "advantages": f32(episodes) if algorithm != "ppo"
           else f32(episodes, n), "rm_scores": f32(episodes), "policy_logprobs": f32(episodes, n),
           "anchor_logprobs": f32(episodes, n), "kl": f32(episodes), "length": f32(episodes)}
  if algorithm == "ppo":
    batch.update(values=f32(episodes, n), token_returns=f32(episodes, n))
  rcfg = ml_collections.ConfigDict(dict(algorithm=algorithm, kl_coef=0.05, kl_mode="reward",
                                        ppo_clip=0.2, value_clip=0.2, value_coef=0.5))
  step = train_lib.make_train_step(rl.rl_loss_fn(model, rcfg, prompt_len), optimizer, 1)
  stats = _compiled_stats(step, state, frozen, batch, mesh)
  # The reward model stays resident during the update: under LoRA only its adapter and head
  # (the backbone is the shared one already counted in `frozen`); under full RLHF a whole copy.
  rm_model = model_lib.build(cfg, lora_rank, lora_targets=targets)
  rm_vars = jax.eval_shape(lambda: model_lib.init_variables(rm_model, jax.random.key(0),
                                                            score_head=True))
  rm_resident = _bytes(rm_vars) if full else _bytes(rm_vars[lora_lib.ADAPTER])
  if mesh is not None:  # per device: the resident reward model is sharded by the same rules
    resident = rm_vars if full else rm_vars[lora_lib.ADAPTER]
    rm_resident = sum(
        leaf.size * jnp.dtype(leaf.dtype).itemsize // math.prod(
            mesh.shape[a] for a in jax.tree_util.tree_leaves(tuple(sh.spec)) if a)
        for leaf, sh in zip(jax.tree_util.tree_leaves(resident),
                            jax.tree_util.tree_leaves(sharding_lib.tree_shardings(resident, mesh))))
  stats.update(reward_model_bytes=rm_resident, total_bytes=stats["peak_bytes"] + rm_resident,
               trainable_params=lora_lib.count_params(trainable),
               weights_bytes=_bytes(frozen) + (_bytes(trainable) if full else 0),
               optimizer_bytes=_bytes(state["opt_state"]),
               adapter_bytes=0 if full else _bytes(trainable))
  backbone_params = _logical_params(cfg, 0, targets)
  passes = 2 if algorithm != "rloo" else 1  # policy log-probs, value scores
  # Full RLHF: anchor + trained policy and value copies + the reward model copy.
  stats["analytic"] = analytic_bytes(
      cfg, episodes, seq, stats["trainable_params"],
      backbone_params * (4 if full else 1), passes,
      logit_tokens=logprobs_lib.chunk_tokens_for(cfg.vocab_size, cfg.logprob_chunk_tokens),
      full_copies=2 if full else 0, weights_bytes=_quantized_weights(cfg, {"params": backbone}),
      logit_columns=model_lib.vocab_tile(cfg))
  return stats
