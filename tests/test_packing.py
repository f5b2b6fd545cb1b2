"""Packed reward batches (perl_jax/packing.py): the layout, and a packed train step equal to the
padded one over the same examples (pairs sharing prompts, 0/1 labels with class weights,
gradient accumulation, a model with sliding-window layers, steps filling fewer chunks than the
largest)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import config_base
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import packing
from perl_jax import reward as reward_lib
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib
from perl_jax.data import batching


def _pairs(rng, n, length, vocab, num_seqs=2):
  """Right-padded examples [n, num_seqs, length]: a shared prompt, then each sequence's own
  tokens (some long enough to cross the tiny model's window of 4)."""
  tokens = np.zeros((n, num_seqs, length), np.int32)
  mask = np.zeros((n, num_seqs, length), bool)
  for i in range(n):
    prompt = rng.integers(3, vocab, rng.integers(1, length // 2))
    for k in range(num_seqs):
      own = rng.integers(3, vocab, rng.integers(1, length - len(prompt) + 1))
      seq = np.concatenate([prompt, own])
      tokens[i, k, :len(seq)], mask[i, k, :len(seq)] = seq, True
  return tokens, mask


def test_layout_and_mask_of_one_pair():
  tokens = np.array([[[2, 5, 6, 7, 8, 0], [2, 5, 6, 9, 0, 0]]], np.int32)
  arrays = {"tokens": tokens, "input_mask": tokens > 0, "label": np.ones(1, np.float32)}
  plan = packing.train_plan(arrays, steps=1, batch_size=1, seed=0, row_len=8, chunk_rows=1)
  assert (plan.rows, plan.blocks_per_row, plan.token_share) == (1, 1, 8 / 12)
  packed = {k: v[:, 0] for k, v in packing.pack(arrays, np.array([0]), plan).items()
            if k != "chunk_count"}  # the one chunk
  np.testing.assert_array_equal(packed["tokens"][0], [2, 5, 6, 7, 8, 9, 0, 0])
  np.testing.assert_array_equal(packed["positions"][0], [0, 1, 2, 3, 4, 3, 0, 0])
  np.testing.assert_array_equal(packed["branch"][0], [0, 0, 0, 1, 1, 2, 0, 0])
  np.testing.assert_array_equal(packed["score_index"][0, 0], [4, 5])
  mask = np.asarray(packing.attention_mask(packed["segment"], packed["branch"]))[0]
  np.testing.assert_array_equal(mask[5], [1, 1, 1, 0, 0, 1, 0, 0])  # rejected: not chosen
  np.testing.assert_array_equal(mask[4], [1, 1, 1, 1, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="pack_row_len=5 is shorter than example 0"):
    packing.train_plan(arrays, steps=1, batch_size=1, seed=0, row_len=5, chunk_rows=1)


def test_plan_fits_every_step():
  rng = np.random.default_rng(0)
  tokens, mask = _pairs(rng, 40, 12, 50)
  arrays = {"tokens": tokens, "input_mask": mask, "label": np.ones(40, np.float32)}
  plan = packing.train_plan(arrays, steps=25, batch_size=8, seed=3, row_len=24, chunk_rows=1,
                      row_multiple=2)
  assert plan.chunk_rows == 2
  counts = set()
  for step in range(25):  # every step packs into the planned shape, every example once
    index = batching.batch_rows(40, step, 8, 3)
    packed = packing.pack(arrays, index, plan, accum_steps=2)
    assert packed["block_mask"].sum() == 8
    np.testing.assert_allclose(packed["weight"].sum(), 1.0, rtol=1e-6)
    count = packed["chunk_count"][0]
    counts.add(int(count))
    assert not packed["block_mask"][:, count:].any() and packed["block_mask"][:, count - 1].any()
    assert (packed["segment"] > 0).sum() == packing.block_lengths(tokens[index],
                                                                  mask[index]).sum()
  assert max(counts) == plan.max_chunks and len(counts) > 1


def _reward_model():
  """A tiny Gemma 3 (local layers with a window of 4) with a LoRA adapter and score head whose
  B factors and head are nonzero."""
  cfg = model_lib.model_config("tiny-gemma3")
  model = model_lib.build(cfg, 4, lora_targets=("attn/(q|k|v|o)$", "mlp/(gate|up|down)$"))
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  leaves, treedef = jax.tree.flatten(variables[lora_lib.ADAPTER])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables[lora_lib.ADAPTER] = jax.tree.unflatten(
      treedef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  return cfg, model, variables


def test_packed_evaluation_scores_every_example_as_padded():
  cfg, model, variables = _reward_model()
  tokens, mask = _pairs(np.random.default_rng(5), 21, 14, cfg.vocab_size)
  arrays = {"tokens": tokens, "input_mask": mask, "label": np.ones(21, np.float32)}
  trainable, frozen = lora_lib.split_variables(variables, full_finetune=False)
  config, mesh = config_base.base_config(), sharding_lib.make_mesh()
  config.reward.eval_batch_size = 8  # 21 rows: a short last batch
  scores = {}
  for pack in (False, True):
    config.reward.pack = pack
    scores_of = reward_lib.eval_scores_fn(config, arrays, model, frozen, mesh)
    scores[pack] = scores_of(trainable, arrays)
  assert scores[True].shape == (21, 2) and np.abs(scores[False]).min() > 0
  np.testing.assert_allclose(scores[True], scores[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,accum", [("pairwise", 1), ("pointwise", 2)])
def test_packed_step_equals_padded_step(kind, accum):
  cfg, model, variables = _reward_model()
  rng = np.random.default_rng(2)
  n, batch_size = 32, 16
  tokens, mask = _pairs(rng, n, 14, cfg.vocab_size, num_seqs=2 if kind == "pairwise" else 1)
  arrays = {"tokens": tokens, "input_mask": mask,
            "label": (rng.random(n) < (1.0 if kind == "pairwise" else 0.7)).astype(np.float32)}
  if kind == "pointwise":
    arrays["weight"] = reward_lib.class_balancing_weights(arrays["label"])
  plan = packing.train_plan(arrays, 8, batch_size, 0, row_len=tokens.shape[1] * 14, chunk_rows=1)
  step = min(range(8), key=lambda s: packing.pack(arrays, batching.batch_rows(
      n, s, batch_size, 0), plan)["chunk_count"][0])
  packed_batch = packing.pack(arrays, batching.batch_rows(n, step, batch_size, 0), plan, accum)
  assert packed_batch["chunk_count"][0] < plan.max_chunks  # this step runs fewer chunks
  trainable, frozen = lora_lib.split_variables(variables, full_finetune=False)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optax.sgd(1.0).init(trainable)}
  runs = {}
  for name, step_fns, batch in (
      ("padded", {"loss_fn": reward_lib.reward_loss_fn(model, 0.0)},
       batching.batch_at(arrays, step, batch_size, 0)),
      ("packed", {"loss_fn": None,
                  "grads_fn": reward_lib.packed_reward_grads_fn(model, 0.0, accum)},
       packed_batch)):
    train_step = jax.jit(train_lib.make_train_step(optimizer=optax.sgd(1.0), accum_steps=accum,
                                                   **step_fns))
    runs[name] = train_step(state, frozen, jax.tree.map(jnp.asarray, batch), jax.random.key(3))
  (padded_state, padded), (packed_state, packed) = runs["padded"], runs["packed"]
  assert float(padded["grad_norm"]) > 1e-3
  assert set(packed) == set(padded)
  for key in padded:  # loss and every metric, each micro-batch's averaged as the padded step does
    np.testing.assert_allclose(packed[key], padded[key], rtol=2e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               packed_state["trainable"], padded_state["trainable"])
