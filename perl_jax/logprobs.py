"""Token log-probs and entropies from hidden states, without a [B, T, V] logits tensor.

With a 256k vocabulary the logits of a training batch dwarf everything else (16 sequences of 512
tokens: 8 GiB in f32, times the softmax and its gradient). Here the sequence is cut into chunks of
about `chunk_tokens` tokens (over the whole batch); a `lax.scan` projects one chunk onto the
vocabulary, keeps only log p(taken token) (and the entropy when asked) and drops the rest. The
chunk body is rematerialised, so the backward pass recomputes one chunk's logits at a time: the
peak is a [B, chunk, V] tensor, set by `chunk_tokens`. Final-logit soft-capping (Gemma 2) is
applied per chunk exactly as on full logits. The trade is speed: smaller chunks, more loop steps.

With `model.logprob_vocab_tile` below the vocabulary (the default for a quantised output
embedding), each chunk's logits are also built one vocabulary tile at a time: a running
log-sum-exp (and, for the entropy, a running sum of p·logit) is carried across the tiles, so at
most [B, chunk, tile] logits and one dequantised [tile, d] slice of the table exist at once.

This is Tunix's `compute_chunked_logps` / MaxText's vocabulary tiling (sequence chunks with remat)
in plain JAX; it needs no kernel, so it runs on CPU, GPU and TPU alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from perl_jax import model as model_lib

AUTO_CHUNK_FLOATS = 2 ** 26  # chunk_tokens=0: chunks of about 256 MiB of f32 logits


def chunk_tokens_for(vocab_size: int, chunk_tokens: int = 0) -> int:
  """Tokens per chunk: `chunk_tokens`, or (0) as many as fit 256 MiB of f32 logits (256 tokens
  at Gemma's 262k vocabulary; a small vocabulary gets one chunk, i.e. no loop)."""
  return chunk_tokens or max(1, AUTO_CHUNK_FLOATS // vocab_size)


def token_logprobs(cfg: model_lib.ModelConfig, params: dict, hidden, targets,
                   chunk_tokens: int = 0, with_entropy: bool = False):
  """log p(targets[b, t] | hidden[b, t]) as f32 [B, T], and the entropy [B, T] (else None).

  Args:
    cfg: the model's architecture (output embedding, compute dtype, final soft-cap).
    params: the backbone (`params` collection) holding the output embedding.
    hidden: [B, T, d] final hidden states (after the final norm).
    targets: [B, T] int token ids that `hidden` predicts.
    chunk_tokens: tokens per chunk over the batch (the sequence chunk is chunk_tokens // B);
      0 = `chunk_tokens_for(vocab)`.
  """
  batch, length = targets.shape
  chunk_tokens = chunk_tokens_for(cfg.vocab_size, chunk_tokens)
  chunk = max(1, min(length, chunk_tokens // max(batch, 1)))
  pad = (-length) % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (length + pad) // chunk
  # [n, B, chunk, ...]: the scan runs over sequence chunks; the batch axis stays whole, so a
  # batch sharded over devices stays sharded inside every chunk.
  hidden_chunks = jnp.moveaxis(hidden.reshape(batch, n, chunk, -1), 1, 0)
  target_chunks = jnp.moveaxis(targets.reshape(batch, n, chunk), 1, 0)

  tile = model_lib.vocab_tile(cfg)

  @jax.checkpoint
  def one_chunk(h, y):
    if tile < cfg.vocab_size:
      return _tiled_chunk(cfg, params, h, y, tile, with_entropy)
    logits = model_lib.logits_of(cfg, params, h)  # [B, chunk, V] f32
    lse = jax.nn.logsumexp(logits, axis=-1)
    taken = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - lse
    if not with_entropy:
      return taken, None
    logp = logits - lse[..., None]
    return taken, -jnp.sum(jnp.exp(logp) * logp, axis=-1)

  def body(carry, xs):
    return carry, one_chunk(*xs)

  _, (logp, entropy) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, n * chunk)[:, :length]
  return unchunk(logp), (unchunk(entropy) if with_entropy else None)



def _tiled_chunk(cfg, params, h, y, tile: int, with_entropy: bool):
  """(log p(y), entropy or None) of one chunk h [B, c, d], its logits built `tile` vocabulary rows
  at a time. The last tile is shifted back to end at the vocabulary's end; the rows it shares
  with the previous tile are masked out, so every row counts once."""
  vocab = cfg.vocab_size
  num_tiles = -(-vocab // tile)

  @jax.checkpoint
  def one_tile(carry, i):
    running_max, sum_exp, sum_exp_logit, taken = carry
    start = jnp.minimum(i * tile, vocab - tile)
    logits = model_lib.logits_of(cfg, params, h, start, tile)  # [B, c, tile] f32
    rows = start + jnp.arange(tile)
    fresh = rows >= i * tile
    # The max only keeps exp() in range: it cancels in log-sum-exp, so no gradient through it.
    new_max = jax.lax.stop_gradient(jnp.maximum(
        running_max, jnp.max(jnp.where(fresh, logits, -jnp.inf), axis=-1)))
    rescale = jnp.exp(running_max - new_max)
    weights = jnp.where(fresh, jnp.exp(logits - new_max[..., None]), 0.0)
    sum_exp = sum_exp * rescale + jnp.sum(weights, axis=-1)
    if with_entropy:
      sum_exp_logit = sum_exp_logit * rescale + jnp.sum(
          weights * jnp.where(fresh, logits, 0.0), axis=-1)
    hit = (y[..., None] == rows) & fresh
    taken = taken + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return (new_max, sum_exp, sum_exp_logit, taken), None

  zeros = jnp.zeros(y.shape, jnp.float32)
  init = (jnp.full(y.shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
  (running_max, sum_exp, sum_exp_logit, taken), _ = jax.lax.scan(
      one_tile, init, jnp.arange(num_tiles))
  lse = running_max + jnp.log(sum_exp)
  entropy = lse - sum_exp_logit / sum_exp if with_entropy else None
  return taken - lse, entropy
