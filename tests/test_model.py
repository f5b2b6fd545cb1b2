import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import model as model_lib

TINY = ["tiny", "tiny-gemma2", "tiny-gemma3", "tiny-llama"]


def jit_apply(model, variables, *args, **kwargs):
  """model.apply as one compiled program: run op by op, a first forward of a new model takes
  seconds (each operation compiles on its own)."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


def _model(preset, **overrides):
  cfg = model_lib.model_config(preset, **overrides)
  model = model_lib.build(cfg)
  return cfg, model, model_lib.init_variables(model, jax.random.key(0), score_head=True)


@pytest.mark.parametrize("preset", TINY)
def test_causality(preset):
  cfg, model, variables = _model(preset)
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.vocab_size)
  changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % cfg.vocab_size)
  mask = jnp.ones((1, 12), bool)
  args = (model_lib.positions_from_mask(mask), model_lib.causal_mask(mask))
  a = jit_apply(model, variables, tokens, *args)["logits"]
  b = jit_apply(model, variables, changed, *args)["logits"]
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 0


@pytest.mark.parametrize("preset", TINY)
def test_kv_cache_decode_matches_full_forward(preset):
  cfg, model, variables = _model(preset)
  batch, prompt_len, total = 2, 5, 12  # longer than the tiny sliding windows
  tokens = jax.random.randint(jax.random.key(2), (batch, total), 0, cfg.vocab_size)
  # Row 1 is left-padded by 2: its real tokens start at slot 2.
  input_mask = jnp.ones((batch, total), bool).at[1, :2].set(False)
  positions = model_lib.positions_from_mask(input_mask)
  full = jit_apply(model, variables, tokens, positions,
                   model_lib.causal_mask(input_mask))["logits"]

  cache = model_lib.init_cache(cfg, batch, total)
  cache_valid = jnp.zeros((batch, total), bool).at[:, :prompt_len].set(input_mask[:, :prompt_len])
  out = jit_apply(model, variables, tokens[:, :prompt_len], positions[:, :prompt_len],
                  model_lib.decode_mask(cache_valid, 0, prompt_len), cache=cache, cache_index=0)
  step_logits = [out["logits"]]
  cache = out["cache"]
  step = jax.jit(lambda v, tok, pos, mask, cache, i: model.apply(
      v, tok, pos, mask, cache=cache, cache_index=i))
  for i in range(prompt_len, total):
    cache_valid = cache_valid.at[:, i].set(True)
    out = step(variables, tokens[:, i:i + 1], positions[:, i:i + 1],
               model_lib.decode_mask(cache_valid, i, 1), out["cache"], i)
    step_logits.append(out["logits"])
  decoded = jnp.concatenate(step_logits, axis=1)
  real = np.asarray(input_mask)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], atol=2e-5)


def test_padding_does_not_change_real_tokens():
  cfg, model, variables = _model("tiny-gemma2")
  tokens = jax.random.randint(jax.random.key(3), (1, 6), 0, cfg.vocab_size)
  mask = jnp.ones((1, 6), bool)
  base = jit_apply(model, variables, tokens, model_lib.positions_from_mask(mask),
                     model_lib.causal_mask(mask), scores=True)
  for padded, pad_mask in [
      (jnp.concatenate([tokens, jnp.zeros((1, 3), jnp.int32)], 1),
       jnp.concatenate([mask, jnp.zeros((1, 3), bool)], 1)),  # right padding
      (jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], 1),
       jnp.concatenate([jnp.zeros((1, 3), bool), mask], 1)),  # left padding
  ]:
    out = jit_apply(model, variables, padded, model_lib.positions_from_mask(pad_mask),
                      model_lib.causal_mask(pad_mask), scores=True)
    np.testing.assert_allclose(np.asarray(out["logits"][pad_mask]),
                               np.asarray(base["logits"][0]), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(model_lib.last_token_values(out["scores"], pad_mask)),
        np.asarray(base["scores"][:, -1]), atol=1e-6)


def test_sliding_window_limits_attention():
  cfg, model, variables = _model("tiny-gemma2", num_layers=1)  # one local layer, window 4
  assert cfg.is_local(0)
  tokens = jax.random.randint(jax.random.key(4), (1, 10), 0, cfg.vocab_size)
  mask = jnp.ones((1, 10), bool)
  args = (model_lib.positions_from_mask(mask), model_lib.causal_mask(mask))
  a = jit_apply(model, variables, tokens, *args)["logits"]
  b = jit_apply(model, variables, tokens.at[0, 0].set((tokens[0, 0] + 1) % cfg.vocab_size),
                  *args)["logits"]
  diff = np.abs(np.asarray(a - b)).max(axis=-1)[0]
  assert diff[1:4].max() > 0  # within the window
  np.testing.assert_array_equal(diff[4:], 0)  # token 0 is out of every later window


def test_presets_have_published_sizes():
  expected = {"gemma-7b": 8_537_680_896, "gemma2-2b": 2_614_341_888, "gemma3-270m": 268_098_176,
              "gemma3-1b": 999_885_952}
  for name, count in expected.items():
    assert model_lib.param_counts(model_lib.build(model_lib.PRESETS[name]))["backbone"] == count


def test_unknown_preset_or_field_is_an_error():
  with pytest.raises(ValueError, match="unknown model preset 'gemma-3b'"):
    model_lib.model_config("gemma-3b")
  with pytest.raises(ValueError, match="unknown model fields"):
    model_lib.model_config("tiny", hidden=3)


def test_rope_tables_equal_direct_sin_cos_and_are_evaluated_once_per_forward():
  cfg = model_lib.model_config("tiny-gemma3")  # global and local bases: two tables
  positions = jnp.array([[0, 1, 2, 3, 4, 5], [7, 7, 0, 1, 2, 3]])  # row 1 left-padded
  tables = model_lib.rope_tables(cfg, positions, num_positions=6)
  assert set(tables) == {"global", "local"}
  for kind, base, scale in (("global", cfg.rope_base, cfg.rope_scale_factor),
                            ("local", cfg.rope_local_base, 1.0)):
    timescale = base ** (2.0 * jnp.arange(cfg.head_dim // 2, dtype=jnp.float32) / cfg.head_dim)
    angles = positions[1:, 2:, None].astype(jnp.float32) / scale / timescale  # real tokens
    sin, cos = tables[kind]
    np.testing.assert_array_equal(np.asarray(sin[1:, 2:]), np.asarray(jnp.sin(angles)))
    np.testing.assert_array_equal(np.asarray(cos[1:, 2:]), np.asarray(jnp.cos(angles)))
    # Padding positions past the table read its last row (padding can hold anything).
    np.testing.assert_array_equal(np.asarray(sin[1, :2]), np.asarray(sin[0, [5, 5]]))

  # XLA fuses elementwise sin/cos into each consumer (15 sine ops in this forward and backward
  # when computed per position); gathered from the tables, they are evaluated once per table.
  # tiny-gemma3's 3 layers: two local, then a global one (both tables used).
  model = model_lib.build(cfg, 2)
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  mask = jnp.ones((2, 16), bool)

  def loss(adapter):
    out = model.apply({**variables, "adapter": adapter}, jnp.ones((2, 16), jnp.int32),
                      model_lib.positions_from_mask(mask), model_lib.causal_mask(mask),
                      logits=False, scores=True)
    return out["scores"].sum()
  hlo = jax.jit(jax.grad(loss)).lower(variables["adapter"]).compile().as_text()
  assert hlo.count(" sine(") == 2 and hlo.count(" cosine(") == 2, hlo.count(" sine(")


@pytest.mark.parametrize("preset,overrides", [
    ("tiny-gemma3", {}), ("tiny-gemma3", {"num_layers": 2}),  # last layer global / local
    ("tiny-gemma2", {"remat": True}), ("tiny-gemma3", {"scan_layers": True})])
def test_outputs_at_rows_equal_the_full_forward_read_there(preset, overrides):
  """rows= runs the last layer at one position per row (a reward model's last token): the same
  scores and adapter gradients as reading the full forward's there, with left and right
  padding, and a last layer with a window shorter than the sequence."""
  from perl_jax import roles
  cfg = model_lib.model_config(preset, **overrides)
  model = model_lib.build(cfg, 2)
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         variables["adapter"])  # B != 0: the adapters change the scores
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 1, cfg.vocab_size)
  mask = jnp.ones((3, 12), bool).at[1, 9:].set(False).at[2, :4].set(False)

  def full(adapter):
    out = model.apply({**variables, "adapter": adapter}, tokens,
                      model_lib.positions_from_mask(mask), model_lib.causal_mask(mask),
                      logits=False, scores=True)
    return model_lib.last_token_values(out["scores"], mask)

  def at_rows(adapter):
    return roles.sequence_scores(model, {**variables, "adapter": adapter}, tokens, mask)
  np.testing.assert_allclose(np.asarray(jax.jit(at_rows)(adapter)),
                             np.asarray(jax.jit(full)(adapter)), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda a, f=f: jnp.sum(f(a) * jnp.array([1.0, -2.0, 0.5]))))(adapter)
           for f in (full, at_rows)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="rows"):
    model.apply(variables, tokens[:, :1], jnp.zeros((3, 1), jnp.int32),
                model_lib.decode_mask(jnp.ones((3, 4), bool), 0, 1),
                cache=model_lib.init_cache(cfg, 3, 4), cache_index=0, rows=jnp.zeros(3, int))
