"""Jitted sampling with a KV cache: one prefill over the prompts, then a fixed-length scan of
one-token steps. Shapes never depend on the data, so it compiles once per (batch, lengths).

Prompts are left-padded so every row's next token goes to the same cache slot. After a row emits
EOS its later tokens are padding and its `completion_mask` is False.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from perl_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  eos_id: int = 1
  pad_id: int = 0


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k and nucleus filtering; filtered entries become -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def first_argmax(x):
  """jnp.argmax over the last axis (the first index of the maximum) as a max and a min-reduce:
  XLA:CPU runs argmax's variadic (value, index) reduce several times slower than these two over
  a 262k vocabulary. A row holding NaN gives the last index."""
  vocab = x.shape[-1]
  hit = x == jnp.max(x, axis=-1, keepdims=True)
  return jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab - 1), axis=-1)


def next_token(logits, rng, cfg: SamplingConfig):
  if cfg.temperature == 0.0:
    return first_argmax(logits)
  # jax.random.categorical's Gumbel-max draw (the same noise, so the same tokens), on first_argmax.
  logits = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
  return first_argmax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def sample(model: model_lib.Transformer, variables, prompt_tokens, prompt_mask, rng,
           cfg: SamplingConfig):
  """Samples `cfg.max_new_tokens` tokens after left-padded prompts.

  Args:
    variables: {"params": backbone} for the anchor, plus {"adapter": ...} for an adapted policy;
      adapters are applied unmerged.
    prompt_tokens, prompt_mask: [B, P] left-padded prompts (repeat rows for several samples).
  Returns:
    dict with "tokens" [B, P + N] (prompt then completion), "input_mask" [B, P + N],
    "completion" [B, N], "completion_mask" [B, N] (True up to and including EOS).
  """
  batch, prompt_len = prompt_tokens.shape
  total = prompt_len + cfg.max_new_tokens
  cache_valid = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(prompt_mask)
  positions = model_lib.positions_from_mask(prompt_mask)
  # The prefill projects only the last position onto the vocabulary: that is all it samples from.
  last_logits = lambda out: model_lib.next_token_logits(model.cfg, variables["params"],
                                                        out["hidden"][:, -1])
  out = model.apply(variables, prompt_tokens, positions,
                    model_lib.decode_mask(cache_valid, 0, prompt_len),
                    cache=model_lib.init_cache(model.cfg, batch, total), cache_index=0,
                    logits=False)
  next_position = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

  def body(carry, i):
    logits, cache, cache_valid, position, done, rng = carry
    rng, step_rng = jax.random.split(rng)
    token = next_token(logits, step_rng, cfg)
    alive = ~done
    token = jnp.where(alive, token, cfg.pad_id)
    slot = prompt_len + i
    cache_valid = cache_valid.at[:, slot].set(alive)
    out = model.apply(variables, token[:, None], position[:, None],
                      model_lib.decode_mask(cache_valid, slot, 1), cache=cache, cache_index=slot,
                      logits=False)
    done = done | (token == cfg.eos_id)
    carry = (last_logits(out), out["cache"], cache_valid, position + 1, done, rng)
    return carry, (token, alive)

  init = (last_logits(out), out["cache"], cache_valid, next_position,
          jnp.zeros((batch,), bool), rng)
  _, (completion, alive) = jax.lax.scan(body, init, jnp.arange(cfg.max_new_tokens))
  completion, completion_mask = completion.T, alive.T
  return {"tokens": jnp.concatenate([prompt_tokens, completion], axis=1),
          "input_mask": jnp.concatenate([prompt_mask, completion_mask], axis=1),
          "completion": completion, "completion_mask": completion_mask}
