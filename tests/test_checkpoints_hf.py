"""Checkpoints in and out: transformers safetensors, PEFT adapters, converted dirs, the CLI.

The parity tests (logits equal to transformers' and PEFT's) need torch, transformers and peft and
are skipped without them; everything else needs only safetensors.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from perl_jax import checkpoint as checkpoint_lib  # noqa: E402
from perl_jax import checkpoints  # noqa: E402
from perl_jax import convert  # noqa: E402
from perl_jax import lora as lora_lib  # noqa: E402
from perl_jax import model as model_lib  # noqa: E402
from perl_jax import sharding as sharding_lib  # noqa: E402
from perl_jax.checkpoints import gemma_flax  # noqa: E402
from perl_jax.checkpoints import hf  # noqa: E402
from perl_jax.checkpoints import peft  # noqa: E402

TINY = ["tiny", "tiny-gemma2", "tiny-gemma3", "tiny-llama"]
ASSET_TOKENIZER = os.path.join(os.path.dirname(model_lib.__file__), "assets", "reviews_sp256.model")


def _random(model, collection, seed, scale=0.1):
  """Random host values for every leaf of a collection (no init, no compiles). Non-trivial
  everywhere: zero-init norms or lora_b would hide mapping mistakes."""
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))[collection]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _params(cfg, seed=0):
  return _random(model_lib.build(cfg), "params", seed)


def _adapter(model, seed):
  return _random(model, lora_lib.ADAPTER, seed)


def _assert_trees_equal(a, b):
  a, b = lora_lib.flatten(a), lora_lib.flatten(b)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset", TINY)
def test_round_trip_through_safetensors(preset, tmp_path):
  cfg = model_lib.model_config(preset)
  params = _params(cfg, 1)
  # Small shards: exercises model.safetensors.index.json too.
  hf.save(str(tmp_path), cfg, params, max_shard_bytes=64 << 10)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  loaded_cfg, loaded, tokenizer = checkpoints.load_checkpoint(str(tmp_path), mesh)
  assert loaded_cfg == cfg
  assert tokenizer is None
  _assert_trees_equal(params, loaded)
  q = loaded["layer_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == sharding_lib.spec_for("layer_0/attn/q/kernel", q.shape, mesh)


def test_load_converts_dtype(tmp_path):
  cfg = model_lib.model_config("tiny-gemma3")
  params = _params(cfg, 2)
  hf.save(str(tmp_path), cfg, params)
  loaded_cfg, loaded, _ = checkpoints.load_checkpoint(str(tmp_path), dtype="bfloat16")
  assert loaded_cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
  _assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), loaded)
  hf.save(str(tmp_path / "bf16"), loaded_cfg, loaded)  # bf16 out, read back unchanged
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  _assert_trees_equal(loaded, checkpoints.load_checkpoint(str(tmp_path / "bf16"),
                                                          dtype="bfloat16")[1])


# ----------------------------------------------------------------------------- real HF names


def _hf_checkpoint(arch: str):
  """config.json and tensors exactly as transformers names and shapes them (written by hand)."""
  vocab, d, layers, heads, kv, hd, mlp = 96, 32, 2, 4, 2, 8, 48
  config = {"vocab_size": vocab, "hidden_size": d, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
            "intermediate_size": mlp, "rms_norm_eps": 1e-6}
  if arch == "gemma":
    config.update(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_act="gelu",
                  rope_theta=10000.0)
  elif arch == "gemma2":
    config.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                  hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=8,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
                  rope_theta=10000.0)
  elif arch == "gemma3_text":  # the format of google/gemma-3-270m's config.json
    config.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                  hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=8,
                  sliding_window=4, sliding_window_pattern=2, rope_theta=1_000_000.0,
                  rope_local_base_freq=10_000.0,
                  rope_scaling={"rope_type": "linear", "factor": 8.0},
                  attn_logit_softcapping=None, final_logit_softcapping=None)
  else:
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=500000.0, attention_bias=False,
                  mlp_bias=False)
  rng = np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
  if arch == "llama":
    shapes["lm_head.weight"] = (vocab, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": (heads * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
        p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, heads * hd),
        p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
        p + "mlp.down_proj.weight": (d, mlp), p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,)})
    if arch in ("gemma2", "gemma3_text"):
      shapes.update({p + "pre_feedforward_layernorm.weight": (d,),
                     p + "post_feedforward_layernorm.weight": (d,)})
    if arch == "gemma3_text":
      shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
  tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  return config, tensors


def _write(directory, config, tensors):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text", "llama"])
def test_real_hf_names_and_layouts(arch, tmp_path):
  config, tensors = _hf_checkpoint(arch)
  _write(tmp_path, config, tensors)
  cfg, params, _ = checkpoints.load_checkpoint(str(tmp_path))
  layer = params["layer_1"]
  w = tensors["model.layers.1.self_attn.q_proj.weight"]  # (heads * hd, d): row h * hd + j
  np.testing.assert_array_equal(layer["attn"]["q"]["kernel"][:, 2, 5], w[2 * 8 + 5])
  w = tensors["model.layers.1.self_attn.o_proj.weight"]  # (d, heads * hd)
  np.testing.assert_array_equal(layer["attn"]["o"]["kernel"][3, 1], w[:, 3 * 8 + 1])
  np.testing.assert_array_equal(layer["mlp"]["down"]["kernel"],
                                tensors["model.layers.1.mlp.down_proj.weight"].T)
  # "post_attention_layernorm" is the pre-MLP norm in Gemma 1 / Llama, a real post-norm in 2/3.
  post = tensors["model.layers.1.post_attention_layernorm.weight"]
  target = "post_attention_norm" if cfg.post_norms else "pre_ffw_norm"
  np.testing.assert_array_equal(layer[target]["scale"], post)
  assert cfg.tie_embeddings == (arch != "llama")
  assert cfg.norm_offset == cfg.embed_scale == (arch != "llama")
  if arch == "gemma3_text":
    assert (cfg.sliding_window, cfg.local_global_pattern) == (4, 2)
    assert (cfg.rope_base, cfg.rope_local_base, cfg.rope_scale_factor) == (1e6, 1e4, 8.0)
    assert cfg.qk_norm and cfg.query_pre_attn_scalar == 8
  if arch == "gemma2":
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
    assert [cfg.is_local(i) for i in range(2)] == [True, False]


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  config, tensors = _hf_checkpoint("gemma3_text")
  extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
  _write(tmp_path / "extra", config, extra)
  with pytest.raises(ValueError, match=r"unexpected tensors \(1\): "
                                       r"model\.layers\.0\.self_attn\.q_proj\.bias"):
    checkpoints.load_checkpoint(str(tmp_path / "extra"))
  missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_norm.weight"}
  _write(tmp_path / "missing", config, missing)
  with pytest.raises(ValueError, match=r"missing tensors \(1\): "
                                       r"model\.layers\.1\.self_attn\.k_norm\.weight"):
    checkpoints.load_checkpoint(str(tmp_path / "missing"))
  bad = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.zeros((48, 31), np.float32)})
  _write(tmp_path / "bad", config, bad)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\."
                                       r"up_proj\.weight has shape \(48, 31\), "
                                       r"expected \(48, 32\)"):
    checkpoints.load_checkpoint(str(tmp_path / "bad"))
  # Harmless extras: a tied lm_head copy and old RoPE buffers.
  harmless = dict(tensors, **{
      "lm_head.weight": tensors["model.embed_tokens.weight"],
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
  _write(tmp_path / "harmless", config, harmless)
  checkpoints.load_checkpoint(str(tmp_path / "harmless"))


def test_config_formats_and_limits():
  legacy, _ = _hf_checkpoint("gemma3_text")
  legacy_keys = ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")
  new = {k: v for k, v in legacy.items() if k not in legacy_keys}
  new.update(layer_types=["sliding_attention", "full_attention"], rope_parameters={
      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
      "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
  assert hf.config_from_hf(legacy) == hf.config_from_hf(new)
  llama, _ = _hf_checkpoint("llama")
  with pytest.raises(NotImplementedError, match="llama3"):
    hf.config_from_hf(dict(llama, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
  with pytest.raises(NotImplementedError, match="attention_bias"):
    hf.config_from_hf(dict(llama, attention_bias=True))
  with pytest.raises(NotImplementedError, match="qwen2"):
    hf.config_from_hf(dict(llama, model_type="qwen2"))
  odd = model_lib.model_config("tiny-llama", embed_scale=True)  # no HF architecture does this
  with pytest.raises(ValueError, match="embed_scale"):
    hf.config_to_hf(odd)
  for preset in TINY:  # the exported config.json reads back as the same model
    cfg = model_lib.model_config(preset)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_tokenizer_and_special_ids_from_checkpoint_dir(tmp_path):
  config, tensors = _hf_checkpoint("llama")
  _write(tmp_path, config, tensors)
  assert checkpoints.load_checkpoint(str(tmp_path))[2] is None  # no tokenizer.model
  shutil.copyfile(ASSET_TOKENIZER, tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8],
                                                               "bos_token_id": 5}))
  config.update(bos_token_id=6, pad_token_id=9)
  (tmp_path / "config.json").write_text(json.dumps(config))
  tok = checkpoints.load_checkpoint(str(tmp_path))[2]
  # tokenizer_config first, then generation_config, then config.json.
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (tok.sp.piece_to_id("<pad>"), 5, 9)


# ----------------------------------------------------------------------------- converted dirs, CLI


def test_converted_dir_and_cli(tmp_path):
  cfg = model_lib.model_config("tiny-gemma2")
  params = _params(cfg, 3)
  hf_dir, converted = str(tmp_path / "hf"), str(tmp_path / "converted")
  hf.save(hf_dir, cfg, params, base_config={"max_position_embeddings": 1234})
  shutil.copyfile(ASSET_TOKENIZER, os.path.join(hf_dir, "tokenizer.model"))
  convert.main(["to-orbax", "--src", hf_dir, "--out", converted, "--dtype", "bfloat16"])
  loaded_cfg, loaded, tok = checkpoints.load_checkpoint(converted, dtype=None)
  assert loaded_cfg.param_dtype == "bfloat16" and tok is not None
  _assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), loaded)

  # A trained adapter, as a training checkpoint's state item holds it.
  model = model_lib.build(cfg, 4, 8.0, ("attn/(q|k|v|o)$", "mlp/down$"))
  adapter = _adapter(model, 5)
  state_dir = str(tmp_path / "checkpoints" / "7" / "state")
  checkpoint_lib.save_tree(state_dir, {"step": np.int32(7), "opt_state": [{"mu": adapter}],
                                       "trainable": {"policy": {lora_lib.ADAPTER: adapter}}})
  out = str(tmp_path / "merged")
  convert.main(["to-hf", "--src", converted, "--adapter", str(tmp_path / "checkpoints"),
                "--lora_alpha", "8", "--dtype", "float32", "--out", out])
  written = json.loads(open(os.path.join(out, "config.json")).read())
  assert written["max_position_embeddings"] == 1234 and written["model_type"] == "gemma2"
  assert os.path.exists(os.path.join(out, "tokenizer.model"))
  merged_cfg, merged, _ = checkpoints.load_checkpoint(out)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  expected = lora_lib.merge_adapters(jax.tree.map(lambda x: x.astype(jnp.float32), bf16),
                                     adapter, 8.0 / 4)
  for path, value in lora_lib.flatten(expected).items():
    np.testing.assert_allclose(np.asarray(lora_lib.flatten(merged)[path]), np.asarray(value),
                               atol=1e-6, err_msg=path)

  peft_dir = str(tmp_path / "peft")
  convert.main(["to-peft", "--adapter", state_dir, "--lora_alpha", "8", "--base_model", hf_dir,
                "--out", peft_dir])
  peft_config = json.loads(open(os.path.join(peft_dir, "adapter_config.json")).read())
  assert peft_config["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
  assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 8.0)
  back, rank, alpha = peft.load(peft_dir, cfg)
  assert (rank, alpha) == (4, 8.0)
  _assert_trees_equal(adapter, back)

  # A bare orbax backbone (what the sft stage saves) needs its preset.
  sft_backbone = str(tmp_path / "sft" / "backbone")
  checkpoint_lib.save_tree(sft_backbone, params)
  convert.main(["to-hf", "--src", sft_backbone, "--preset", "tiny-gemma2", "--tokenizer",
                ASSET_TOKENIZER, "--out", str(tmp_path / "from_sft")])
  from_sft_cfg, from_sft, from_sft_tok = checkpoints.load_checkpoint(str(tmp_path / "from_sft"))
  assert from_sft_cfg == cfg and from_sft_tok is not None
  _assert_trees_equal(params, from_sft)

  with pytest.raises(SystemExit, match="lora_alpha is required"):
    convert.main(["to-peft", "--adapter", state_dir, "--out", peft_dir])
  with pytest.raises(SystemExit, match="no checkpoint at"):
    convert.main(["to-orbax", "--src", str(tmp_path / "nowhere"), "--out", peft_dir])


def test_peft_names_and_partial_targets(tmp_path):
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, 2, 4.0, ("layer_1/attn/q$", "mlp/gate$"))
  adapter = _adapter(model, 7)
  config = peft.save(str(tmp_path), adapter, 4.0)
  # q is adapted in layer 1 only, so targets name modules in full.
  assert config["target_modules"] == ["model.layers.0.mlp.gate_proj",
                                      "model.layers.1.mlp.gate_proj",
                                      "model.layers.1.self_attn.q_proj"]
  from safetensors import safe_open
  with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="numpy") as f:
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
  assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == [2, 64]
  assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == [4 * 16, 2]
  back, _, _ = peft.load(str(tmp_path), cfg)
  _assert_trees_equal(adapter, back)
  rebuilt = model_lib.build(cfg, 2, 4.0, peft.target_patterns(back))
  assert set(rebuilt.lora_targets) == {"layer_1/attn/q", "layer_0/mlp/gate", "layer_1/mlp/gate"}


# ----------------------------------------------------------------------------- Gemma Flax


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma3", "tiny-mha"])
def test_gemma_flax_layout(preset, tmp_path, monkeypatch):
  # tiny-mha: kv_heads == heads, stored as one qkv_einsum like Gemma 7B.
  monkeypatch.setitem(model_lib.PRESETS, "tiny-mha", model_lib.model_config("tiny",
                                                                            num_kv_heads=4))
  cfg = model_lib.model_config(preset)
  params = _params(cfg, 8)
  gemma_flax.save(str(tmp_path), cfg, params)
  leaves = gemma_flax._leaves(str(tmp_path))
  assert ("layer_0/attn/qkv_einsum/w" in leaves) == (preset == "tiny-mha")
  q = leaves.get("layer_0/attn/q_einsum/w")
  assert q is None or q[1] == (cfg.num_heads, cfg.d_model, cfg.head_dim)
  loaded_cfg, loaded, _ = checkpoints.load_checkpoint(str(tmp_path))
  assert loaded_cfg == cfg
  _assert_trees_equal(params, loaded)


# ----------------------------------------------------------------------------- transformers parity


def _hf_model(arch: str, directory: str, qk_scale: float = 1.0, **config_overrides):
  """A random tiny transformers model in float32 with eager attention, saved to `directory`;
  its q/k projections scaled by `qk_scale` (attention logits by qk_scale^2)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  configs = {
      "gemma": lambda: transformers.GemmaConfig(**common),
      "gemma2": lambda: transformers.Gemma2Config(**common, sliding_window=4,
                                                  query_pre_attn_scalar=12,
                                                  attn_logit_softcapping=2.0,
                                                  final_logit_softcapping=3.0),
      "gemma3": lambda: transformers.Gemma3TextConfig(
          **common, sliding_window=4, query_pre_attn_scalar=12,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
          rope_parameters={
              "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
      "llama": lambda: transformers.LlamaConfig(
          **common, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
  }
  config = configs[arch]()
  for key, value in config_overrides.items():
    setattr(config, key, value)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # zero-init norms would hide a wrong (1 + w)
      p.normal_(0.0, 0.2)
      if name.endswith(("q_proj.weight", "k_proj.weight")):
        p.mul_(qk_scale)
  model.save_pretrained(directory)
  return model


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (2, 10))
  mask = np.ones((2, 10), bool)
  mask[0, :3] = False  # left padding (longer than the sliding window of 4 after it)
  mask[1, 8:] = False  # right padding
  return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _torch_logits(model, tokens, mask, positions):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def _our_logits(model, variables, tokens, mask, positions):
  apply = jax.jit(lambda v, t, p, m: model.apply(v, t, p, model_lib.causal_mask(m))["logits"])
  return np.asarray(apply(variables, jnp.asarray(tokens), jnp.asarray(positions),
                          jnp.asarray(mask)))


ATOL = 1e-4  # float32 on CPU; observed differences are ~1e-5 or less


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "llama"])
def test_transformers_parity_with_peft_and_merged_exports(arch, tmp_path):
  """Loaded logits, PEFT-exported adapter logits and merged-export logits all match torch."""
  hf_dir = str(tmp_path / "hf")
  reference = _hf_model(arch, hf_dir)
  peft_lib = pytest.importorskip("peft")
  import transformers
  tokens, mask, positions = _batch()
  cfg, params, _ = checkpoints.load_checkpoint(hf_dir)
  ours = _our_logits(model_lib.build(cfg), {"params": params}, tokens, mask, positions)
  np.testing.assert_allclose(ours[mask], _torch_logits(reference, tokens, mask, positions)[mask],
                             atol=ATOL, rtol=0)

  model = model_lib.build(cfg, 4, 8.0, ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$"))
  adapter = _adapter(model, 2)
  adapted = _our_logits(model, {"params": params, lora_lib.ADAPTER: adapter}, tokens, mask,
                        positions)
  assert np.abs(adapted - ours)[mask].max() > 1e-2  # the adapter matters

  peft_dir = str(tmp_path / "peft")
  peft.save(peft_dir, adapter, alpha=8.0, base_model=hf_dir)
  with_adapter = peft_lib.PeftModel.from_pretrained(reference, peft_dir).eval()
  np.testing.assert_allclose(adapted[mask],
                             _torch_logits(with_adapter, tokens, mask, positions)[mask],
                             atol=ATOL, rtol=0)

  merged_dir = str(tmp_path / "merged")
  hf.save(merged_dir, cfg, lora_lib.merge_adapters(params, adapter, 8.0 / 4))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      merged_dir, attn_implementation="eager").float().eval()
  np.testing.assert_allclose(adapted[mask], _torch_logits(merged, tokens, mask, positions)[mask],
                             atol=ATOL, rtol=0)


def test_reward_model_peft_export_scores_equal_in_transformers(tmp_path):
  """A LoRA reward model (adapter + score head) exported by `convert to-peft --score_head` gives
  the same scores in transformers + PEFT as in perl_jax (Gemma 3, right-padded rows)."""
  pytest.importorskip("peft")
  from perl_jax import roles
  hf_dir = str(tmp_path / "hf")
  _hf_model("gemma3", hf_dir)
  cfg, params, _ = checkpoints.load_checkpoint(hf_dir)
  model = model_lib.build(cfg, 4, 8.0, ("attn/(q|k|v|o)$",))
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0),
                                                           score_head=True))[lora_lib.ADAPTER]
  rng = np.random.default_rng(4)
  adapter = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  assert set(adapter) > {"score_head"}
  tokens = rng.integers(1, 128, (3, 10))  # no real token is the pad id 0
  mask = np.ones((3, 10), bool)
  mask[1, 6:] = mask[2, 3:] = False
  tokens[~mask] = 0
  ours = np.asarray(jax.jit(lambda v, t, m: roles.sequence_scores(model, v, t, m))(
      {"params": params, lora_lib.ADAPTER: adapter}, tokens, mask))

  best = str(tmp_path / "reward" / "best")  # what the reward stage keeps
  checkpoint_lib.save_tree(best, {lora_lib.ADAPTER: adapter})
  out = str(tmp_path / "rm_peft")
  convert.main(["to-peft", "--adapter", best, "--lora_alpha", "8", "--score_head",
                "--base_model", hf_dir, "--out", out])
  config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
  assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
  import torch
  reward_model = peft.load_reward_model_torch(hf_dir, out, attn_implementation="eager")
  with torch.no_grad():
    theirs = reward_model(input_ids=torch.tensor(tokens),
                          attention_mask=torch.tensor(mask.astype(np.int64))).logits[:, 0].numpy()
  assert np.ptp(ours) > 1e-2  # the rows score differently
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
  back, _, _ = peft.load(out, cfg)  # the LoRA factors read back; the head is skipped
  assert "score_head" not in back
  # A run's ModelConfig (scanned, remat, chunked attention) still exports: those fields say how
  # perl_jax computes, not what the model is.
  run_cfg = dataclasses.replace(cfg, scan_layers=True, remat=True, attention_chunk=128,
                                logprob_chunk_tokens=64, remat_policy="dots_saveable")
  hf.save(str(tmp_path / "from_run"), run_cfg, params)


def test_transformers_parity_with_attention_logits_past_the_softcap(tmp_path):
  """Gemma 2's real attention soft-cap (50), the reference's q/k projections scaled 5x
  (attention logits 25x): the largest |attention logit| per layer is 83, 116 and 173 (measured
  once by recording the soft-cap's input), so tanh(x / 50) * 50 bends them hard. Parity holds
  only if we cap as transformers does; the same model without the cap is checked to miss."""
  hf_dir = str(tmp_path / "hf")
  reference = _hf_model("gemma2", hf_dir, qk_scale=5.0, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0)
  tokens, mask, positions = _batch()
  cfg, params, _ = checkpoints.load_checkpoint(hf_dir)
  assert cfg.attn_logit_softcap == 50.0
  theirs = _torch_logits(reference, tokens, mask, positions)
  ours = _our_logits(model_lib.build(cfg), {"params": params}, tokens, mask, positions)
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=ATOL, rtol=0)
  # Without the attention soft-cap the same weights give other logits: the cap is exercised.
  uncapped = _our_logits(model_lib.build(dataclasses.replace(cfg, attn_logit_softcap=None)),
                         {"params": params}, tokens, mask, positions)
  assert np.abs(uncapped - theirs)[mask].max() > 100 * ATOL
