import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import model as model_lib
from perl_jax import sampling
from perl_jax.data import batching
from test_model import jit_apply


def _setup(preset="tiny-gemma2"):
  cfg = model_lib.model_config(preset)
  model = model_lib.build(cfg, lora_rank=4)
  variables = model_lib.init_variables(model, jax.random.key(0))
  rows = [[2, 17, 33, 9], [2, 5], [2, 40, 41, 42, 43, 44]]
  tokens, mask = batching.pad_rows(rows, 7, 0, left=True)
  return cfg, model, variables, jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_greedy_equals_argmax_of_full_forward(preset):
  cfg, model, variables, tokens, mask = _setup(preset)
  scfg = sampling.SamplingConfig(max_new_tokens=9, temperature=0.0, eos_id=-1)  # never stops
  out = sampling.sample(model, variables, tokens, mask, jax.random.key(1), scfg)
  full = jit_apply(model, variables, out["tokens"],
                   model_lib.positions_from_mask(out["input_mask"]),
                   model_lib.causal_mask(out["input_mask"]))["logits"]
  predicted = np.asarray(jnp.argmax(full, -1))[:, tokens.shape[1] - 1:-1]
  np.testing.assert_array_equal(predicted, np.asarray(out["completion"]))


def test_low_temperature_and_top_k_1_match_greedy():
  cfg, model, variables, tokens, mask = _setup()
  greedy = sampling.sample(model, variables, tokens, mask, jax.random.key(1),
                           sampling.SamplingConfig(8, temperature=0.0, eos_id=-1))["completion"]
  cold = sampling.sample(model, variables, tokens, mask, jax.random.key(2),
                         sampling.SamplingConfig(8, temperature=1e-4, eos_id=-1))["completion"]
  top1 = sampling.sample(model, variables, tokens, mask, jax.random.key(3),
                         sampling.SamplingConfig(8, temperature=1.0, top_k=1, eos_id=-1))
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
  np.testing.assert_array_equal(np.asarray(top1["completion"]), np.asarray(greedy))


def test_tokens_after_eos_are_padding_and_masked():
  cfg, model, variables, tokens, mask = _setup()
  # Make EOS the greedy choice at some step: pick the token greedy emits at step 3 of row 0.
  greedy = sampling.sample(model, variables, tokens, mask, jax.random.key(1),
                           sampling.SamplingConfig(8, temperature=0.0, eos_id=-1))["completion"]
  eos = int(greedy[0, 3])
  out = sampling.sample(model, variables, tokens, mask, jax.random.key(1),
                        sampling.SamplingConfig(8, temperature=0.0, eos_id=eos, pad_id=0))
  completion, cmask = np.asarray(out["completion"]), np.asarray(out["completion_mask"])
  for row in range(completion.shape[0]):
    hits = np.flatnonzero(completion[row] == eos)
    if hits.size:
      first = hits[0]
      assert cmask[row, :first + 1].all()  # EOS itself is part of the completion
      assert not cmask[row, first + 1:].any()
      assert (completion[row, first + 1:] == 0).all()
    else:
      assert cmask[row].all()
  assert np.flatnonzero(completion[0] == eos)[0] <= 3


def test_top_p_filters_low_mass_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, 0, 0.75)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, 0, 0.1)))
  np.testing.assert_array_equal(kept, [[True, False, False, False]])
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, 3, 1.0)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_sampling_distribution_matches_softmax():
  logits = jnp.tile(jnp.log(jnp.asarray([[0.6, 0.3, 0.1]])), (20_000, 1))
  draws = np.asarray(sampling.next_token(logits, jax.random.key(0),
                                         sampling.SamplingConfig(1, temperature=1.0)))
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [0.6, 0.3, 0.1],
                             atol=0.015)


def test_next_token_draws_what_argmax_and_jax_categorical_draw():
  """first_argmax (a max and a min-reduce, fast on CPU) picks jnp.argmax's index, ties and -inf
  rows included, and sampling's Gumbel draw picks jax.random.categorical's token for a key."""
  for seed in range(3):
    logits_key, key = jax.random.split(jax.random.key(seed))
    logits = jnp.round(jax.random.normal(logits_key, (16, 1000)) * 3)  # many ties
    logits = jnp.where(jax.random.uniform(key, logits.shape) < 0.3, -jnp.inf, logits)
    np.testing.assert_array_equal(sampling.first_argmax(logits), jnp.argmax(logits, -1))
    cfg = sampling.SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=50)
    np.testing.assert_array_equal(
        sampling.next_token(logits, key, cfg),
        jax.random.categorical(key, sampling.filter_logits(logits, 0.7, 50, 1.0)))
