import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import roles
from test_model import jit_apply


def _inputs(cfg, batch=2, length=10, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)
  mask = jnp.ones((batch, length), bool)
  return tokens, model_lib.positions_from_mask(mask), model_lib.causal_mask(mask)


def _randomise_b(adapter, seed=3):
  flat = lora_lib.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return lora_lib.unflatten({
      p: (0.1 * jax.random.normal(k, v.shape, v.dtype) if p.endswith("lora_b") else v)
      for k, (p, v) in zip(keys, flat.items())})


@pytest.mark.parametrize("targets", [("attn/(q|k|v|o)$",), ("attn/", "mlp/")])
def test_zero_b_is_exactly_the_base_model(targets):
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=4, lora_targets=targets)
  variables = model_lib.init_variables(model, jax.random.key(0))
  args = _inputs(cfg)
  with_adapter = jit_apply(model, variables, *args)["logits"]
  anchor = jit_apply(model, {"params": variables["params"]}, *args)["logits"]
  np.testing.assert_array_equal(np.asarray(with_adapter), np.asarray(anchor))


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma3", "tiny-llama"])
def test_merged_equals_unmerged(preset):
  cfg = model_lib.model_config(preset)
  model = model_lib.build(cfg, lora_rank=4, lora_alpha=8.0, lora_targets=("attn/", "mlp/"))
  variables = model_lib.init_variables(model, jax.random.key(0))
  adapter = _randomise_b(variables["adapter"])
  args = _inputs(cfg)
  unmerged = jit_apply(model, {"params": variables["params"], "adapter": adapter}, *args)["logits"]
  anchor = jit_apply(model, {"params": variables["params"]}, *args)["logits"]
  merged_backbone = lora_lib.merge_adapters(variables["params"], adapter, model.lora.scale)
  merged = jit_apply(model, {"params": merged_backbone}, *args)["logits"]
  assert float(jnp.abs(unmerged - anchor).max()) > 1e-3  # the adapter really changes outputs
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=1e-5)


def test_gradients_only_for_adapters():
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=4)
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  trainable, frozen = lora_lib.split_variables(variables, full_finetune=False)
  assert set(trainable) == {"adapter"} and set(frozen) == {"params"}
  tokens, positions, mask = _inputs(cfg)

  def loss(trainable):
    out = model.apply({**frozen, **trainable}, tokens, positions, mask, scores=True)
    return out["logits"].mean() + out["scores"].mean()

  grads = lora_lib.flatten(jax.jit(jax.grad(loss))(_randomise_b(trainable)))
  assert all(p.startswith("adapter/") for p in grads)
  assert any("score_head" in p for p in grads)  # the head is trained with the adapters
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values()), "every adapter leaf learns"


def test_low_rank_delta_gradients_equal_autodiff_without_transposing_the_large_operands():
  keys = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(keys[0], (3, 40, 4, 6))  # [B, T] + in_shape (4, 6): n_in = 2
  a = jax.random.normal(keys[1], (4, 6, 2))
  b = jax.random.normal(keys[2], (2, 5, 32))  # out_shape (5, 32)
  g = jax.random.normal(keys[3], (3, 40, 5, 32))
  delta = lambda h, a, b: lora_lib.low_rank_delta(h, a, b, 2)
  by_autodiff = lambda h, a, b: jnp.einsum("btij,ijr,rko->btko", h, a, b)
  np.testing.assert_allclose(delta(h, a, b), by_autodiff(h, a, b), rtol=1e-5, atol=1e-5)
  ours = jax.vjp(delta, h, a, b)[1](g)
  theirs = jax.vjp(by_autodiff, h, a, b)[1](g)
  for got, want in zip(ours, theirs):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":
    # The reason for the custom backward: XLA:CPU would copy the [N, out] cotangent and the
    # [N, in] input into transposed layouts ([out, N], [in, N]) to form dB and dA.
    hlo = jax.jit(jax.grad(lambda h, a, b: (delta(h, a, b) * g).sum(), argnums=(0, 1, 2))).lower(
        h, a, b).compile().as_text()
    assert "f32[160,120]" not in hlo and "f32[24,120]" not in hlo


def test_bf16_projection_accumulates_in_f32_and_its_backward_stays_in_bf16():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (3, 5, 4, 6)).astype(jnp.bfloat16)  # n_in = 2
  kernel = jax.random.normal(keys[1], (4, 6, 7, 2)).astype(jnp.bfloat16)
  g = jax.random.normal(keys[2], (3, 5, 7, 2)).astype(jnp.bfloat16)
  project = lambda x, k: lora_lib.project(x, k, 2)
  exact = lambda x, k: jnp.einsum("btij,ijko->btko", x.astype(jnp.float32), k.astype(jnp.float32))
  y = project(x, kernel)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, exact(x, kernel).astype(jnp.bfloat16))  # rounded once
  dx, dk = jax.vjp(project, x, kernel)[1](g)
  want_dx, want_dk = jax.vjp(exact, x, kernel)[1](g.astype(jnp.float32))
  assert (dx.dtype, dk.dtype) == (jnp.bfloat16, jnp.bfloat16)
  np.testing.assert_array_equal(dx, want_dx.astype(jnp.bfloat16))
  np.testing.assert_array_equal(dk, want_dk.astype(jnp.bfloat16))
  # Every matmul of the backward multiplies bf16 by bf16 (XLA:CPU's fast AVX512-BF16 kernel),
  # none the f32 cotangent by an f32 copy of the kernel.
  hlo = jax.jit(jax.grad(lambda x, k: (project(x, k).astype(jnp.float32) * g).sum(),
                         argnums=(0, 1))).lower(x, kernel).as_text(dialect="hlo")
  dtype_of = dict(re.findall(r"^\s*%?([\w.\-]+) = (\w+)\[", hlo, re.M))
  dots = re.findall(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo)
  assert dots and all(dtype_of[a] == dtype_of[b] == "bf16" for a, b in dots), (dots, dtype_of)
  assert float(jnp.abs(lora_lib.project(x.astype(jnp.float32), kernel.astype(jnp.float32), 2)
                       - exact(x, kernel)).max()) == 0.0  # float32: the plain contraction


def test_lora_step_builds_no_backbone_gradient_buffers():
  # A mid-sized model so the backbone dominates memory; compile only.
  cfg = model_lib.model_config("tiny", d_model=512, mlp_dim=2048, num_layers=4, head_dim=64,
                               num_heads=8, num_kv_heads=8, vocab_size=8192)
  model = model_lib.build(cfg, lora_rank=4)
  shapes = jax.eval_shape(lambda r: model_lib.init_variables(model, r), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)

  def step_memory(full_finetune):
    trainable, frozen = lora_lib.split_variables(shapes, full_finetune)

    def loss(trainable, frozen, tokens):
      mask = jnp.ones(tokens.shape, bool)
      return roles.token_logprobs(model, {**frozen, **trainable}, tokens, mask)[0].mean()

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, tokens).compile()
    return compiled.memory_analysis()

  backbone_bytes = 4 * lora_lib.count_params(shapes["params"])
  lora_stats, full_stats = step_memory(False), step_memory(True)
  # Full tuning must return a gradient for every backbone weight...
  assert full_stats.output_size_in_bytes >= backbone_bytes
  # ...the LoRA step holds no such buffer, neither as output nor as scratch. (Its scratch is not
  # zero: on CPU, XLA keeps a transposed copy of one layer's weights for the backward matmuls.)
  lora_bytes = lora_stats.output_size_in_bytes + lora_stats.temp_size_in_bytes
  assert lora_stats.output_size_in_bytes < 0.01 * backbone_bytes
  assert lora_bytes < 0.25 * backbone_bytes, (lora_bytes, backbone_bytes)


def test_trainable_fraction_gemma_2b_rank_4():
  counts = model_lib.param_counts(model_lib.build(model_lib.PRESETS["gemma-2b"], lora_rank=4))
  assert counts["backbone"] == 2_506_172_416  # the published Gemma 2B size
  assert counts["adapter"] / counts["total"] < 1e-3


def test_rank_larger_than_layer_is_an_error():
  cfg = model_lib.model_config("tiny")  # d_model 64; k/v project to 2 heads x 16 = 32
  with pytest.raises(ValueError, match=r"lora.rank=33 is larger than min\(in, out\)=32 of "
                     r"projection layer_0/attn/k"):
    model_lib.build(cfg, lora_rank=33)
  model_lib.build(cfg, lora_rank=32)  # the largest rank that fits


def test_unknown_target_is_an_error():
  cfg = model_lib.model_config("tiny")
  with pytest.raises(ValueError, match="'attn/qq' matches no projection"):
    model_lib.build(cfg, lora_rank=4, lora_targets=("attn/qq",))
  with pytest.raises(ValueError, match="rank must be >= 0"):
    model_lib.build(cfg, lora_rank=-1)


def test_adapter_dtype_independent_of_backbone():
  cfg = model_lib.model_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
  model = model_lib.build(cfg, lora_rank=4, lora_dtype="float32")
  variables = model_lib.init_variables(model, jax.random.key(0))
  dtypes = {p: v.dtype for p, v in lora_lib.flatten(variables).items()}
  assert all(d == jnp.bfloat16 for p, d in dtypes.items() if p.startswith("params/"))
  assert all(d == jnp.float32 for p, d in dtypes.items() if p.startswith("adapter/"))
  out = jit_apply(model, _randomise_b_tree(variables), *_inputs(cfg))["logits"]
  assert bool(jnp.isfinite(out).all())


def _randomise_b_tree(variables):
  return {"params": variables["params"], "adapter": _randomise_b(variables["adapter"])}


def test_lora_dropout_only_in_training():
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=4, lora_dropout=0.5)
  variables = _randomise_b_tree(model_lib.init_variables(model, jax.random.key(0)))
  args = _inputs(cfg)
  eval_a = jit_apply(model, variables, *args)["logits"]
  eval_b = jit_apply(model, variables, *args)["logits"]
  train = jit_apply(model, variables, *args, deterministic=False,
                      rngs={"dropout": jax.random.key(5)})["logits"]
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  assert float(jnp.abs(train - eval_a).max()) > 1e-4


def _rename(tree, old, new):
  return lora_lib.unflatten({p.replace(old, new): v for p, v in lora_lib.flatten(tree).items()})


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_mis_keyed_adapter_is_an_error_not_the_anchor(scan):
  cfg = model_lib.model_config("tiny", scan_layers=scan)
  layer = model_lib.SCANNED if scan else "layer_0"
  model = model_lib.build(cfg, lora_rank=4, lora_targets=("attn/(q|v)$",))
  variables = _randomise_b_tree(model_lib.init_variables(model, jax.random.key(0)))
  params, adapter = variables["params"], variables["adapter"]
  args = _inputs(cfg)
  apply = jax.jit(lambda adapter: model.apply({"params": params, "adapter": adapter}, *args))
  # One projection's key misspelt: it would otherwise run as the bare backbone.
  with pytest.raises(ValueError, match=f"targeted projection.*{layer}/attn/q\\b.*near "
                     f"{layer}/attn/q the adapter holds {layer}/attn: \\[qq, v\\].*"
                     f"not target: {layer}/attn/qq"):
    apply(_rename(adapter, "attn/q/", "attn/qq/"))
  # A tree made for other targets.
  other = model_lib.build(cfg, lora_rank=4, lora_targets=("attn/k$",))
  with pytest.raises(ValueError, match=f"{layer}/attn/q.*not target: {layer}/attn/k/lora_a"):
    apply(model_lib.init_variables(other, jax.random.key(0))["adapter"])
  # The other layout (per-layer vs stacked).
  relaid = (model_lib.unstack_layers(adapter) if scan
            else model_lib.stack_layers(adapter, cfg.num_layers))
  with pytest.raises(ValueError, match=f"{layer}/attn/q.*convert it with model\\."
                     f"{'stack' if scan else 'unstack'}_layers"):
    apply(relaid)
  # Another rank: consistent A/B shapes that would contract fine with the wrong alpha / rank.
  rank8 = model_lib.build(cfg, lora_rank=8, lora_targets=("attn/(q|v)$",))
  with pytest.raises(ValueError, match=f"LoRA projection {layer}/attn/q has lora_a \\(64, 8\\).*"
                     f"rank 4"):
    apply(model_lib.init_variables(rank8, jax.random.key(0))["adapter"])
  with pytest.raises(ValueError, match=f"no lora_a/lora_b for targeted projection.*{layer}/attn/q"):
    apply({})  # an empty collection is not "no adapters"
  apply(adapter)  # the right tree runs


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_no_adapter_collection_is_the_anchor(scan):
  cfg = model_lib.model_config("tiny", scan_layers=scan)
  model = model_lib.build(cfg, lora_rank=4, lora_targets=("attn/", "mlp/"))
  variables = _randomise_b_tree(model_lib.init_variables(model, jax.random.key(0),
                                                         score_head=True))
  args = _inputs(cfg)
  logits = jax.jit(lambda model, variables: model.apply(
      variables, *args, scores="adapter" in variables)["logits"], static_argnums=0)
  bare = logits(model_lib.build(cfg), {"params": variables["params"]})
  anchor = logits(model, {"params": variables["params"]})
  adapted = logits(model, variables)  # LoRA + score head: the head's leaves are legitimate
  np.testing.assert_array_equal(np.asarray(anchor), np.asarray(bare))
  assert float(jnp.abs(adapted - anchor).max()) > 1e-3


def test_check_adapter_tree():
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=4)
  expected = roles.abstract_variables(model, score_head=True)["adapter"]
  adapter = model_lib.init_variables(model, jax.random.key(0), score_head=True)["adapter"]
  lora_lib.check_adapter_tree(expected, adapter)
  with pytest.raises(ValueError, match="policy adapter does not fit the model: missing "
                     "layer_0/attn/q/lora_a, .*; unexpected layer_0/attn/qq/lora_a"):
    lora_lib.check_adapter_tree(expected, _rename(adapter, "attn/q/", "attn/qq/"),
                                what="policy adapter")
  with pytest.raises(ValueError, match="missing score_head/bias, score_head/kernel"):
    lora_lib.check_adapter_tree(expected, {k: v for k, v in adapter.items() if k != "score_head"})
  rank8 = model_lib.init_variables(model_lib.build(cfg, lora_rank=8), jax.random.key(0),
                                   score_head=True)["adapter"]
  with pytest.raises(ValueError, match=r"wrong shapes: layer_0/attn/k/lora_a \(64, 8\) "
                     r"\(expected \(64, 4\)\)"):
    lora_lib.check_adapter_tree(expected, rank8)
  with pytest.raises(ValueError, match="convert it with model.stack_layers"):
    scanned = model_lib.build(model_lib.model_config("tiny", scan_layers=True), lora_rank=4)
    lora_lib.check_adapter_tree(roles.abstract_variables(scanned, score_head=True)["adapter"],
                                adapter)


def test_projection_with_a_spec_needs_its_adapter():
  proj = lora_lib.LoRAProjection((4,), (3,), lora_lib.LoRASpec(2, 2.0))
  x = jnp.ones((1, 4))
  variables = proj.init(jax.random.key(0), x)
  proj.apply(variables, x)
  with pytest.raises(ValueError, match="LoRA projection LoRAProjection has no adapter"):
    proj.apply({"params": variables["params"]}, x)
  bare = lora_lib.LoRAProjection((4,), (3,)).apply({"params": variables["params"]}, x)
  np.testing.assert_array_equal(np.asarray(bare), np.asarray(proj.apply(variables, x)))  # B = 0
