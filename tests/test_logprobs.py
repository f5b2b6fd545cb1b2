"""Chunked log-probs equal the full-logits reference; scanned layers equal unrolled ones; steps
with a 256k vocabulary never hold a [B, T, V] f32 tensor."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import logprobs
from perl_jax import lora as lora_lib
from perl_jax import memory
from perl_jax import model as model_lib
from perl_jax import roles
from perl_jax import sampling
from perl_jax import sft
from perl_jax import train as train_lib


def _reference(cfg, params, hidden, targets):
  logits = model_lib.logits_of(cfg, params, hidden)
  logp = jax.nn.log_softmax(logits, axis=-1)
  taken = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return taken, entropy


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-llama"])  # gemma2: soft-cap 30
@pytest.mark.parametrize("chunk_tokens,vocab_tile", [(1, 0), (7, 0), (0, 0), (7, 100), (0, 64)])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(preset, chunk_tokens,
                                                                      vocab_tile):
  """vocab_tile 100 of 256 rows: the last tile overlaps the one before (rows counted once)."""
  cfg = dataclasses.replace(model_lib.model_config(preset), logprob_vocab_tile=vocab_tile)
  assert vocab_tile < cfg.vocab_size
  params = model_lib.init_variables(model_lib.build(cfg), jax.random.key(0))["params"]
  # Scale the embedding up so soft-capping (tanh(z / 30) * 30) is far from the identity.
  params = jax.tree.map(lambda x: x * 40.0, params) if cfg.final_logit_softcap else params
  hidden = jax.random.normal(jax.random.key(1), (3, 11, cfg.d_model))
  targets = jax.random.randint(jax.random.key(2), (3, 11), 0, cfg.vocab_size)
  if cfg.final_logit_softcap:
    raw = jnp.einsum("btd,vd->btv", hidden, params["embedder"]["input_embedding"])
    assert float(jnp.abs(raw).max()) > 60.0  # the cap bites
  got, got_entropy = logprobs.token_logprobs(cfg, params, hidden, targets, chunk_tokens,
                                             with_entropy=True)
  want, want_entropy = _reference(cfg, params, hidden, targets)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_entropy, want_entropy, atol=1e-5, rtol=1e-5)

  def loss(fn, params, hidden):
    taken, entropy = fn(params, hidden)
    return jnp.sum(taken * jnp.linspace(0.5, 1.5, taken.size).reshape(taken.shape)) + 0.1 * jnp.sum(
        entropy)

  chunked = lambda p, h: logprobs.token_logprobs(cfg, p, h, targets, chunk_tokens, True)
  reference = lambda p, h: _reference(cfg, p, h, targets)
  got_grads = jax.grad(lambda p, h: loss(chunked, p, h), argnums=(0, 1))(params, hidden)
  want_grads = jax.grad(lambda p, h: loss(reference, p, h), argnums=(0, 1))(params, hidden)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(jnp.abs(w).max())), rtol=1e-4)


def test_auto_chunk_size_follows_the_vocabulary():
  assert logprobs.chunk_tokens_for(262_144) == 256
  assert logprobs.chunk_tokens_for(256) == 262_144  # the demo: one chunk, no loop
  assert logprobs.chunk_tokens_for(262_144, 64) == 64


# Gemma 3 (local/global layers, q/k norms, post norms) and Llama (untied head): the scan's
# layer bookkeeping. Gemma 2's soft-caps are per-layer arithmetic that scanning does not touch
# (covered with blocks and chunks above and below).
@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-llama"])
def test_scanned_layers_equal_unrolled_layers(preset):
  """Same weights stacked: same logits, scores, gradients and greedy KV-cache samples."""
  cfg = model_lib.model_config(preset)
  targets = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
  model = model_lib.build(cfg, 4, lora_targets=targets)
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  variables[lora_lib.ADAPTER] = jax.tree.map(lambda x: x + 0.05, variables[lora_lib.ADAPTER])
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
  scanned = model_lib.build(scanned_cfg, 4, lora_targets=targets)
  stacked = {k: model_lib.stack_layers(v, cfg.num_layers) for k, v in variables.items()}
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
      jnp.shape, model_lib.init_variables(scanned, jax.random.key(0), score_head=True))
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  mask = jnp.ones((2, 10), bool).at[0, :3].set(False)
  args = (tokens, model_lib.positions_from_mask(mask), model_lib.causal_mask(mask))
  forward = lambda m: jax.jit(lambda v: m.apply(v, *args, scores=True))  # eager is slow
  a, b = forward(model)(variables), forward(scanned)(stacked)
  np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4)
  np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)

  def loss(m, adapter, params):
    return jnp.sum(roles.token_logprobs(m, {"params": params, lora_lib.ADAPTER: adapter},
                                        tokens, mask)[0])

  grads = jax.jit(jax.grad(lambda ad: loss(model, ad, variables["params"])))(
      variables[lora_lib.ADAPTER])
  scanned_grads = jax.jit(jax.grad(lambda ad: loss(scanned, ad, stacked["params"])))(
      stacked[lora_lib.ADAPTER])
  for g, w in zip(jax.tree_util.tree_leaves(scanned_grads),
                  jax.tree_util.tree_leaves(model_lib.stack_layers(grads, cfg.num_layers))):
    np.testing.assert_allclose(g, w, atol=1e-4)
  greedy = sampling.SamplingConfig(6, temperature=0.0, eos_id=-1)
  prompt, prompt_mask = tokens[:, :5], jnp.ones((2, 5), bool).at[0, :2].set(False)
  unrolled_sample = sampling.sample(model, variables, prompt, prompt_mask, jax.random.key(0),
                                    greedy)["completion"]
  scanned_sample = sampling.sample(scanned, stacked, prompt, prompt_mask, jax.random.key(0),
                                   greedy)["completion"]
  np.testing.assert_array_equal(unrolled_sample, scanned_sample)
  back = {k: model_lib.unstack_layers(v) for k, v in stacked.items()}
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back, variables))


def test_scanned_layers_need_the_same_targets_in_every_layer():
  cfg = model_lib.model_config("tiny", scan_layers=True)
  with pytest.raises(ValueError, match="scan_layers=False"):
    model_lib.build(cfg, 4, lora_targets=("layer_1/attn/q$",))
  model_lib.build(dataclasses.replace(cfg, scan_layers=False), 4, lora_targets=("layer_1/attn/q$",))


# A 262,144-piece vocabulary on a tiny body: here the logits are everything.
_BIG_VOCAB = model_lib.model_config("tiny", vocab_size=262_144, scan_layers=True, remat=True,
                                    logprob_chunk_tokens=64)


def test_rl_and_sft_steps_never_hold_batch_by_sequence_by_vocab_logits():
  episodes, prompt_len, new_tokens = 4, 16, 240
  full_logits = episodes * (prompt_len + new_tokens) * _BIG_VOCAB.vocab_size * 4  # 1 GiB
  rl = memory.rl_step_memory(_BIG_VOCAB, 4, episodes, prompt_len, new_tokens)
  assert rl["temp_bytes"] < 0.35 * full_logits, rl

  model = model_lib.build(_BIG_VOCAB, 0)
  params = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))["params"]
  optimizer = optax.adam(1e-3)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": {"params": params},
           "opt_state": jax.eval_shape(optimizer.init, {"params": params})}
  seq = prompt_len + new_tokens
  batch = {"tokens": jax.ShapeDtypeStruct((episodes, seq), jnp.int32),
           "input_mask": jax.ShapeDtypeStruct((episodes, seq), bool),
           "loss_mask": jax.ShapeDtypeStruct((episodes, seq), bool)}
  step = train_lib.make_train_step(sft.sft_loss(model), optimizer, 1)
  compiled = jax.jit(step).lower(state, {}, batch,
                                 jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
  stats = train_lib.compiled_memory(compiled)
  # Full SFT of the embedding: its gradient and Adam moments are 3 x 64 MiB on their own.
  assert stats["temp_bytes"] < 0.35 * full_logits, stats


@pytest.mark.parametrize("preset,field", [("tiny-gemma2", "attention_chunk"),  # soft-cap 50
                                          ("tiny-gemma3", "attention_chunk"),  # sliding window
                                          ("tiny-gemma3", "mlp_chunk")])
def test_attention_and_mlp_in_position_blocks_equal_them_at_once(preset, field):
  """Queries in blocks (attention_chunk) or MLP positions in blocks (mlp_chunk, a scan over
  blocks sharing the layer's params and adapters): the same log-probs and adapter gradients."""
  cfg = model_lib.model_config(preset, scan_layers=True, remat=True)
  targets = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
  model = model_lib.build(cfg, 4, lora_targets=targets)
  blocked = model_lib.build(dataclasses.replace(cfg, **{field: 4}), 4, lora_targets=targets)
  assert field == "attention_chunk" or model_lib.mlp_blocks(blocked.cfg, 16) == 4
  variables = model_lib.init_variables(model, jax.random.key(0))
  variables[lora_lib.ADAPTER] = jax.tree.map(lambda x: x + 0.05, variables[lora_lib.ADAPTER])
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  mask = jnp.ones((2, 16), bool).at[0, :3].set(False)

  def logprobs_and_grads(m):
    def summed(adapter):
      logprobs = roles.token_logprobs(m, {**variables, lora_lib.ADAPTER: adapter}, tokens,
                                      mask)[0]
      return jnp.sum(logprobs), logprobs
    # One jitted forward and backward (eager is slow): the log-probs come out as the aux.
    (_, logprobs), grads = jax.jit(jax.value_and_grad(summed, has_aux=True))(
        variables[lora_lib.ADAPTER])
    return logprobs, grads

  (want, want_grads), (got, got_grads) = logprobs_and_grads(model), logprobs_and_grads(blocked)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(jnp.abs(w).max())))
