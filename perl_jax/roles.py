"""One frozen backbone, every role: anchor, policy, reward model and value model.

A role is the backbone plus an adapter set (the `adapter` collection: LoRA factors and, for reward
and value models, the score head); the anchor is the backbone with no adapter. This module creates
those pieces already sharded (nothing full-size is built on one device first) and gives every
stage the same entry points:

    token_logprobs(model, variables, tokens, input_mask, start)   log p of tokens[:, start:]
    sequence_scores(model, variables, tokens, input_mask)         score head at the last token
    packed_scores(model, variables, packed)                       the same, packed (packing.py)
    token_values(model, variables, tokens, input_mask, start)     score head before each token
    sample_texts(model, variables, tok, prompts, config, rng)     jitted KV-cache sampling

Log-probs never build [B, T, V] logits (perl_jax.logprobs computes them in sequence chunks).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import common
from perl_jax import lora as lora_lib
from perl_jax import logprobs as logprobs_lib
from perl_jax import model as model_lib
from perl_jax import packing
from perl_jax import quant
from perl_jax import sampling
from perl_jax import sharding as sharding_lib
from perl_jax.data import batching

# ----------------------------------------------------------------------------- creation


def abstract_variables(model: model_lib.Transformer, score_head: bool = False) -> dict:
  """Shapes and dtypes of {"params", "adapter"} (nothing is allocated)."""
  return jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0),
                                                         score_head=score_head))


def _create(model, seed: int, mesh, collection: str, score_head: bool):
  """One collection of a fresh init, created by a jit whose outputs are already sharded; XLA
  drops the rest of the init, so a fresh adapter never costs a random backbone."""
  init = lambda rng: model_lib.init_variables(model, rng, score_head=score_head).get(
      collection, {})
  rng = jax.random.key(seed)
  if mesh is None:
    return jax.jit(init)(rng)
  shardings = sharding_lib.tree_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


def new_adapter(model: model_lib.Transformer, seed: int, mesh, score_head: bool = False) -> dict:
  """A fresh adapter collection (LoRA A random, B zero; a zero score head) on `mesh`."""
  return _create(model, seed, mesh, lora_lib.ADAPTER, score_head)


def new_backbone(model: model_lib.Transformer, seed: int, mesh) -> dict:
  """A randomly initialised backbone, created sharded on `mesh`."""
  return _create(model, seed, mesh, "params", False)


def float_twin(model: model_lib.Transformer) -> model_lib.Transformer:
  """`model` with its projection kernels in param_dtype (what SFT trains and saves)."""
  cfg = dataclasses.replace(model.cfg, weight_dtype="", embedding_dtype="")
  return model_lib.Transformer(cfg, model.lora, model.lora_targets)


def store_backbone(params: dict, model: model_lib.Transformer, mesh) -> dict:
  """A float backbone with its projection kernels stored as model.cfg.weight_dtype (int8 / nf4
  quantised, perl_jax.quant), on device and on the kernels' shardings."""
  return quant.store_on_mesh(params, model.cfg.weight_dtype, mesh, model.cfg.embedding_dtype)


def load_backbone(sft_dir: str, model: model_lib.Transformer, mesh) -> dict:
  """The backbone a finished SFT stage saved in `sft_dir/backbone`, restored onto `mesh` (and
  stored as model.cfg.weight_dtype)."""
  params = checkpoint_lib.load_tree(
      os.path.join(sft_dir, "backbone"),
      sharded_abstract(abstract_variables(float_twin(model))["params"], mesh))
  return store_backbone(params, model, mesh)


def sharded_abstract(abstract, mesh):
  """ShapeDtypeStructs carrying the parameter shardings on `mesh` (restore targets)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract, sharding_lib.tree_shardings(abstract, mesh))


def load_released(config: ml_collections.ConfigDict, mesh, float_model: bool = False) -> dict:
  """The params of config.model.checkpoint, streamed onto `mesh` as model.param_dtype with the
  projection kernels as model.weight_dtype (quantised as they are read) and the output
  embedding as model.embedding_dtype, in the model's layout (stacked when model.scan_layers).
  float_model: everything in param_dtype instead (the model SFT trains)."""
  from perl_jax import checkpoints
  weight_dtype = "" if float_model else config.model.weight_dtype
  cfg, params, _ = checkpoints.load_checkpoint(config.model.checkpoint, mesh,
                                               config.model.param_dtype, weight_dtype)
  if not float_model:
    params = quant.store_on_mesh(params, "", mesh, config.model.embedding_dtype)
  if not config.model.scan_layers:
    return params
  abstract = jax.eval_shape(lambda p: model_lib.stack_layers(p, cfg.num_layers), params)
  shardings = sharding_lib.tree_shardings(abstract, mesh)
  # Donation cannot help (the stacked buffers have other shapes): the per-layer arrays are
  # freed when this returns, so a load peaks at about twice the weights.
  return jax.jit(lambda p: model_lib.stack_layers(p, cfg.num_layers),
                 out_shardings=shardings)(params)


def backbone_for(config: ml_collections.ConfigDict, workdir: str,
                 model: model_lib.Transformer, mesh) -> dict:
  """The frozen backbone as config.model.backbone says (see config_base), on `mesh`."""
  source = config.model.backbone
  if source == "random":
    return new_backbone(model, config.seed, mesh)
  sft_dir = os.path.join(source or workdir, "sft")
  if not source and config.model.checkpoint and not os.path.isdir(
      os.path.join(sft_dir, "backbone")):
    return load_released(config, mesh)
  if not os.path.isdir(os.path.join(sft_dir, "backbone")):
    raise FileNotFoundError(
        f"no SFT backbone in {sft_dir}: run the 'sft' stage first (add it to config.stages), "
        f"point config.model.backbone at a finished run's workdir, or use 'random'")
  return load_backbone(sft_dir, model, mesh)


# ----------------------------------------------------------------------------- entry points


def _forward(model, variables, tokens, input_mask, scores=False, deterministic=True, rng=None,
             rows=None):
  return model.apply(variables, tokens, model_lib.positions_from_mask(input_mask),
                     model_lib.causal_mask(input_mask), logits=False, scores=scores,
                     deterministic=deterministic,
                     rngs=None if rng is None else {"dropout": rng}, rows=rows)


def token_logprobs(model: model_lib.Transformer, variables, tokens, input_mask, start: int = 1,
                   with_entropy: bool = False, deterministic: bool = True, rng=None):
  """log p(tokens[:, t] | tokens[:, :t]) for t >= start: [B, T - start] f32, and the entropy of
  each of those steps' distributions (else None). start = prompt length for completions."""
  hidden = _forward(model, variables, tokens, input_mask, deterministic=deterministic,
                    rng=rng)["hidden"]
  return logprobs_lib.token_logprobs(model.cfg, variables["params"], hidden[:, start - 1:-1],
                                     tokens[:, start:], model.cfg.logprob_chunk_tokens,
                                     with_entropy)


def sequence_scores(model: model_lib.Transformer, variables, tokens, input_mask,
                    deterministic: bool = True, rng=None):
  """The score head read at each sequence's last real token. tokens: [..., L] -> [...]."""
  lead, length = tokens.shape[:-1], tokens.shape[-1]
  flat_tokens, flat_mask = tokens.reshape(-1, length), input_mask.reshape(-1, length)
  # Only the last real token's score is read: the last layer runs there alone.
  out = _forward(model, variables, flat_tokens, flat_mask, scores=True,
                 deterministic=deterministic, rng=rng, rows=model_lib.last_token_index(flat_mask))
  return out["scores"][:, 0].reshape(lead)


def packed_scores(model: model_lib.Transformer, variables, packed: dict,
                  deterministic: bool = True, rng=None):
  """The score head at every sequence's last token in a packed batch (perl_jax.packing):
  [R, M, K], equal to `sequence_scores` of the same sequences unpacked."""
  out = model.apply(variables, packed["tokens"], packed["positions"],
                    packing.attention_mask(packed["segment"], packed["branch"]), logits=False,
                    scores=True, deterministic=deterministic,
                    rngs=None if rng is None else {"dropout": rng})
  index = packed["score_index"]
  return jnp.take_along_axis(out["scores"], index.reshape(index.shape[0], -1),
                             axis=1).reshape(index.shape)


def token_values(model: model_lib.Transformer, variables, tokens, input_mask, start: int,
                 deterministic: bool = True, rng=None):
  """The score head before each token from `start` on (value of the state that emits it):
  [B, T - start], read at positions start - 1 .. T - 2."""
  out = _forward(model, variables, tokens, input_mask, scores=True,
                 deterministic=deterministic, rng=rng)
  return out["scores"][:, start - 1:-1]


# ----------------------------------------------------------------------------- sampling


def encode_prompts(tok, prompts, length: int):
  """Left-padded BOS + prompt ids [N, length]; longer prompts lose their middle."""
  return batching.pad_rows([batching.truncate_prompt(tok.encode_prompt(p), length)
                            for p in prompts], length, tok.pad_id, left=True)


def sampling_config(config: ml_collections.ConfigDict, tok,
                    temperature: float | None = None) -> sampling.SamplingConfig:
  """config.sampling's settings (temperature overridable) with the tokenizer's EOS and pad."""
  s = config.sampling
  return sampling.SamplingConfig(s.max_new_tokens, s.temperature if temperature is None
                                 else temperature, s.top_k, s.top_p, tok.eos_id, tok.pad_id)


def sample_texts(model: model_lib.Transformer, variables, tok, prompts, config, rng,
                 temperature: float | None = None) -> list[tuple[str, str]]:
  """(prompt, completion text) pairs sampled with config.sampling (jitted, KV cache)."""
  tokens, mask = encode_prompts(tok, prompts, config.data.prompt_len)
  out = jax.device_get(sampling.sample(model, variables, jnp.asarray(tokens), jnp.asarray(mask),
                                       rng, sampling_config(config, tok, temperature)))
  return [(p, tok.decode(c)) for p, c in zip(prompts, out["completion"])]


# ----------------------------------------------------------------------------- reward model


def reward_model_variables(config: ml_collections.ConfigDict, workdir: str,
                           model: model_lib.Transformer, mesh) -> dict:
  """{"params": the frozen backbone, "adapter": fresh LoRA (if any) + zero score head}."""
  return {"params": backbone_for(config, workdir, model, mesh),
          lora_lib.ADAPTER: new_adapter(model, config.seed + 7, mesh, score_head=True)}


def load_reward_model(config: ml_collections.ConfigDict, workdir: str, tok, mesh):
  """(model, variables) of the best reward model the `reward` stage saved in `workdir`."""
  model = common.build_model(config, common.model_cfg(config, tok.vocab_size))
  full_finetune = config.lora.rank == 0
  abstract = abstract_variables(model, score_head=True)
  if full_finetune:  # the saved tree holds every weight: no backbone to load first
    trainable = sharded_abstract(abstract, mesh)
    return model, checkpoint_lib.load_tree(os.path.join(workdir, "reward", "best"), trainable)
  backbone = backbone_for(config, workdir, model, mesh)
  adapter = checkpoint_lib.load_tree(
      os.path.join(workdir, "reward", "best"),
      {lora_lib.ADAPTER: sharded_abstract(abstract[lora_lib.ADAPTER], mesh)})
  # orbax restores a saved tree of another rank in its own shapes: check before using it.
  lora_lib.check_adapter_tree(abstract[lora_lib.ADAPTER], adapter[lora_lib.ADAPTER],
                              f"reward adapter ({os.path.join(workdir, 'reward', 'best')})")
  return model, {"params": backbone, **adapter}
