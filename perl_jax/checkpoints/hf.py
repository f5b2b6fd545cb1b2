"""Hugging Face transformers checkpoints: `config.json` <-> ModelConfig, safetensors <-> params.

Architectures (config.json `model_type`): "gemma" (GemmaForCausalLM), "gemma2" (Gemma2ForCausalLM),
"gemma3_text" (Gemma3ForCausalLM) and "llama" (LlamaForCausalLM and Llama-architecture models).

Layout. HF Linear weights are (out, in); perl_jax kernels are (in..., out...):

    model.layers.{i}.self_attn.q_proj.weight  (heads * head_dim, d)  ->  attn/q/kernel
                                                         (d, heads, head_dim)
    model.layers.{i}.self_attn.o_proj.weight  (d, heads * head_dim)  ->  attn/o/kernel
                                                         (heads, head_dim, d)
    model.layers.{i}.mlp.down_proj.weight     (d, mlp)               ->  mlp/down/kernel (mlp, d)

HF rotates q/k with the rotate-half convention, which is perl_jax's split-half `apply_rope`, so
q/k need no permutation. Gemma RMSNorm weights are stored as w with (1 + w) applied
(perl_jax norm_offset=True); Llama's are plain weights (norm_offset=False): both load unchanged.

Weights stream tensor by tensor: each is read, converted to the backbone dtype and placed onto its
sharding before the next one is read, so the host never holds more than one tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
from typing import Callable, Iterable

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from perl_jax import common
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib
from perl_jax import tokenizer as tokenizer_lib

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM"}
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "silu": "silu", "swish": "silu"}
# Tensors some checkpoints carry that hold nothing perl_jax needs (recomputed RoPE tables).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# perl_jax projection -> HF module inside a decoder layer (also used for PEFT adapter names).
PROJECTION_MODULES = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj",
                      "attn/v": "self_attn.v_proj", "attn/o": "self_attn.o_proj",
                      "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
                      "mlp/down": "mlp.down_proj"}


# ----------------------------------------------------------------------------- config.json


def _rope(hf: dict, model_type: str) -> tuple[dict, dict | None]:
  """(global, local-or-None) RoPE dicts with "rope_theta", from either config.json format.

  transformers >= 5 writes `rope_parameters` (flat, or nested by layer type for Gemma 3);
  older files write `rope_theta` / `rope_scaling` / `rope_local_base_freq`.
  """
  default_theta = 1_000_000.0 if model_type == "gemma3_text" else 10_000.0
  params = hf.get("rope_parameters")
  if params and ("full_attention" in params or "sliding_attention" in params):
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    return full, local
  full = dict(params or hf.get("rope_scaling") or {})
  full.setdefault("rope_theta", hf.get("rope_theta", default_theta))
  if model_type == "gemma3_text":  # legacy Gemma 3: scaling on global layers only
    return full, {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
  return full, None


def _rope_factor(rope: dict, where: str) -> float:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return 1.0
  if kind == "linear":
    return float(rope["factor"])
  raise NotImplementedError(f"{where}: RoPE type {kind!r} is not supported (only default and "
                            f"linear scaling are)")


def _layer_pattern(hf: dict, model_type: str, num_layers: int) -> int:
  """k such that every k-th layer is global (0: all global), from layer_types or the pattern."""
  types = hf.get("layer_types")
  if types:
    if len(types) != num_layers:
      raise ValueError(f"config.json layer_types has {len(types)} entries for {num_layers} layers")
    if all(t == "full_attention" for t in types):
      return 0
    for k in range(2, num_layers + 2):
      if all(t == ("full_attention" if (i + 1) % k == 0 else "sliding_attention")
             for i, t in enumerate(types)):
        return k
    raise NotImplementedError(f"config.json layer_types {types} is not 'every k-th layer global'")
  for key in ("sliding_window_pattern", "_sliding_window_pattern"):
    if hf.get(key):
      return int(hf[key])
  return {"gemma2": 2, "gemma3_text": 6}.get(model_type, 0)


def config_from_hf(hf: dict, param_dtype: str = "float32") -> model_lib.ModelConfig:
  """The ModelConfig of a transformers config.json (as a dict)."""
  model_type = hf.get("model_type")
  if model_type == "gemma3" and "text_config" in hf:
    raise NotImplementedError("multimodal Gemma 3 (Gemma3ForConditionalGeneration) checkpoints "
                              "are not supported; use a text-only Gemma3ForCausalLM checkpoint")
  if model_type not in ARCHITECTURES:
    raise NotImplementedError(f"config.json model_type {model_type!r} is not supported; "
                              f"supported: {sorted(ARCHITECTURES)}")
  for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    if hf.get(flag):
      raise NotImplementedError(f"config.json sets {flag}=true, which perl_jax does not model")
  gemma = model_type != "llama"
  heads = hf["num_attention_heads"]
  layers = hf["num_hidden_layers"]
  act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if gemma and act_name == "gelu":  # legacy Gemma value, meant (and run by HF) as tanh-GELU
    act_name = "gelu_pytorch_tanh"
  if act_name not in _ACTIVATIONS:
    raise NotImplementedError(f"config.json activation {act_name!r} is not supported; "
                              f"supported: {sorted(_ACTIVATIONS)}")
  full, local = _rope(hf, model_type)
  if full.get("partial_rotary_factor", 1.0) != 1.0:
    raise NotImplementedError("config.json partial_rotary_factor != 1 is not supported")
  pattern = _layer_pattern(hf, model_type, layers) if gemma and model_type != "gemma" else 0
  window = hf.get("sliding_window") if pattern else None
  if local is None and pattern and _rope_factor(full, "config.json") != 1.0:
    raise NotImplementedError("RoPE scaling on sliding-window layers is not supported")
  local_base = float(local["rope_theta"]) if local else None
  if local and _rope_factor(local, "config.json") != 1.0:
    raise NotImplementedError("RoPE scaling on sliding-window layers is not supported")
  post_norms = model_type in ("gemma2", "gemma3_text")
  return model_lib.ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=layers,
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], mlp_activation=_ACTIVATIONS[act_name],
      query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar", 256)) if post_norms else None),
      attn_logit_softcap=hf.get("attn_logit_softcapping") if post_norms else None,
      final_logit_softcap=hf.get("final_logit_softcapping") if post_norms else None,
      sliding_window=window, local_global_pattern=pattern if window else 0,
      rope_base=float(full["rope_theta"]),
      rope_local_base=local_base if window else None,
      rope_scale_factor=_rope_factor(full, "config.json"),
      qk_norm=model_type == "gemma3_text", post_norms=post_norms,
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      embed_scale=gemma, norm_offset=gemma, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      param_dtype=param_dtype)


def architecture_of(cfg: model_lib.ModelConfig) -> str:
  """The HF model_type whose architecture `cfg` is (checked exactly by `config_to_hf`)."""
  if cfg.qk_norm:
    return "gemma3_text"
  if cfg.post_norms:
    return "gemma2"
  if not cfg.norm_offset:
    return "llama"
  return "gemma"


# How a run stores and computes the model, not what the model is: reset before comparing.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "weight_dtype", "embedding_dtype", "remat",
                   "remat_policy", "scan_layers", "logprob_chunk_tokens", "logprob_vocab_tile",
                   "attention_chunk", "mlp_chunk")


def _canonical(cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
  """`cfg` with equivalent spellings unified and storage/compute fields reset, for comparison."""
  local = any(cfg.is_local(i) for i in range(cfg.num_layers))
  defaults = {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)
              if f.name in _RUNTIME_FIELDS}
  return dataclasses.replace(
      cfg, **defaults, query_pre_attn_scalar=float(cfg.query_pre_attn_scalar or cfg.head_dim),
      sliding_window=cfg.sliding_window if local else None,
      local_global_pattern=cfg.local_global_pattern if local else 0,
      rope_local_base=(cfg.rope_local_base or cfg.rope_base) if local else None,
      attn_logit_softcap=cfg.attn_logit_softcap or None,
      final_logit_softcap=cfg.final_logit_softcap or None)


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def config_to_hf(cfg: model_lib.ModelConfig, base: dict | None = None,
                 special_ids: dict | None = None, dtype: str | None = None) -> dict:
  """A transformers config.json for `cfg`; raises if no supported architecture expresses it.

  Args:
    base: a config.json to start from (e.g. the one a checkpoint was converted from), so fields
      perl_jax does not model (max_position_embeddings, ...) survive a round trip.
    special_ids: {"bos_token_id", "eos_token_id", "pad_token_id"}.
    dtype: the weights' dtype name, written as `dtype` / `torch_dtype`.
  """
  model_type = architecture_of(cfg)
  gemma = model_type != "llama"
  out = dict(base or {})
  for stale in ("rope_parameters", "rope_scaling", "layer_types", "sliding_window_pattern",
                "_sliding_window_pattern", "text_config", "auto_map"):
    out.pop(stale, None)
  local = any(cfg.is_local(i) for i in range(cfg.num_layers))
  act = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[cfg.mlp_activation]
  out.update({
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "hidden_act": act,
      "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "rope_theta": _number(cfg.rope_base), "attention_bias": False,
  })
  out.setdefault("max_position_embeddings",
                 {"gemma3_text": 32_768, "llama": 4096}.get(model_type, 8192))
  if cfg.rope_scale_factor != 1.0:
    out["rope_scaling"] = {"rope_type": "linear", "factor": _number(cfg.rope_scale_factor)}
  if gemma:
    out["hidden_activation"] = act
  if model_type == "llama":
    out["mlp_bias"] = False
  if model_type in ("gemma2", "gemma3_text"):
    out["query_pre_attn_scalar"] = _number(cfg.query_pre_attn_scalar or cfg.head_dim)
    out["attn_logit_softcapping"] = cfg.attn_logit_softcap
    out["final_logit_softcapping"] = cfg.final_logit_softcap
    out["sliding_window"] = cfg.sliding_window if local else out.get("sliding_window", 4096)
    out["layer_types"] = ["sliding_attention" if cfg.is_local(i) else "full_attention"
                          for i in range(cfg.num_layers)]
  if model_type == "gemma3_text":
    out["rope_local_base_freq"] = _number(cfg.rope_local_base or cfg.rope_base)
    if local:
      out["sliding_window_pattern"] = cfg.local_global_pattern
  if special_ids:
    out.update({k: int(v) for k, v in special_ids.items() if v is not None})
  if dtype:
    out["dtype"] = out["torch_dtype"] = jnp.dtype(dtype).name
  again = config_from_hf(out)
  want, got = _canonical(cfg), _canonical(again)
  if want != got:
    diff = {f.name: (getattr(want, f.name), getattr(got, f.name))
            for f in dataclasses.fields(want) if getattr(want, f.name) != getattr(got, f.name)}
    raise ValueError(f"no transformers architecture expresses this ModelConfig exactly; closest "
                     f"is {ARCHITECTURES[model_type]}, which differs in (wanted, got): {diff}")
  return out


# ----------------------------------------------------------------------------- tensor names


def layer_prefix(i: int) -> str:
  return f"model.layers.{i}."


def tensor_names(cfg: model_lib.ModelConfig) -> dict[str, str]:
  """HF tensor name -> perl_jax param path, for every backbone tensor `cfg` has."""
  names = {"model.embed_tokens.weight": "embedder/input_embedding",
           "model.norm.weight": "final_norm/scale"}
  if not cfg.tie_embeddings:
    names["lm_head.weight"] = "lm_head/kernel"
  for i in range(cfg.num_layers):
    hf, pj = layer_prefix(i), f"layer_{i}/"
    names.update({f"{hf}{module}.weight": f"{pj}{proj}/kernel"
                  for proj, module in PROJECTION_MODULES.items()})
    names[f"{hf}input_layernorm.weight"] = f"{pj}pre_attention_norm/scale"
    if cfg.post_norms:
      names[f"{hf}post_attention_layernorm.weight"] = f"{pj}post_attention_norm/scale"
      names[f"{hf}pre_feedforward_layernorm.weight"] = f"{pj}pre_ffw_norm/scale"
      names[f"{hf}post_feedforward_layernorm.weight"] = f"{pj}post_ffw_norm/scale"
    else:  # Gemma 1 / Llama call the pre-MLP norm "post_attention_layernorm"
      names[f"{hf}post_attention_layernorm.weight"] = f"{pj}pre_ffw_norm/scale"
    if cfg.qk_norm:
      names[f"{hf}self_attn.q_norm.weight"] = f"{pj}attn/q_norm/scale"
      names[f"{hf}self_attn.k_norm.weight"] = f"{pj}attn/k_norm/scale"
  return names


def hf_module(projection: str) -> str:
  """"layer_3/attn/q" -> "model.layers.3.self_attn.q_proj"."""
  layer, rest = projection.split("/", 1)
  if not layer.startswith("layer_") or rest not in PROJECTION_MODULES:
    raise KeyError(f"{projection} is not an adaptable projection path")
  return layer_prefix(int(layer[len("layer_"):])) + PROJECTION_MODULES[rest]


def _in_dims(path: str) -> int:
  """Number of leading input axes of a perl_jax kernel (o contracts heads and head_dim)."""
  return 2 if path.endswith("attn/o/kernel") else 1


def hf_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape in the HF checkpoint of the perl_jax leaf `path` of shape `shape`."""
  if path == "embedder/input_embedding" or not path.endswith("/kernel"):
    return tuple(shape)
  n = _in_dims(path)
  return (math.prod(shape[n:]), math.prod(shape[:n]))


def to_perl(path: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF-layout array as the perl_jax leaf `path` of shape `shape`."""
  if path == "embedder/input_embedding" or not path.endswith("/kernel"):
    return array.reshape(shape)
  return array.T.reshape(shape)


def to_hf(path: str, array: np.ndarray) -> np.ndarray:
  """A perl_jax leaf in HF layout."""
  if path == "embedder/input_embedding" or not path.endswith("/kernel"):
    return array
  n = _in_dims(path)
  return array.reshape(math.prod(array.shape[:n]), -1).T


# ----------------------------------------------------------------------------- streaming load


def abstract_params(cfg: model_lib.ModelConfig) -> dict:
  """{path: ShapeDtypeStruct} of the backbone of `cfg` (nothing is allocated)."""
  shapes = jax.eval_shape(
      lambda: model_lib.init_variables(model_lib.build(cfg), jax.random.key(0)))["params"]
  return traverse_util.flatten_dict(shapes, sep="/")


def default_mesh():
  return sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])


def check_names(found: dict[str, str], expected: Iterable[str], source: str,
                ignorable: Iterable[str] = ()) -> None:
  """Raises naming every missing and unexpected tensor. found: name -> file holding it."""
  expected, ignorable = set(expected), set(ignorable)
  missing = sorted(expected - set(found))
  unexpected = sorted(n for n in set(found) - expected - ignorable
                      if not n.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    lines = [f"checkpoint {source} does not match the model its config describes:"]
    if missing:
      lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected tensors ({len(unexpected)}): "
                   + ", ".join(f"{n} (in {found[n]})" for n in unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    raise ValueError("\n".join(lines))


def place_tensors(cfg: model_lib.ModelConfig, names: dict[str, str], found: dict[str, str],
                  read: Callable[[str], np.ndarray], mesh=None, source: str = "",
                  weight_dtype: str = "") -> dict:
  """Builds the params tree one tensor at a time, each placed straight onto its sharding.

  Args:
    cfg: the model; its param_dtype is the dtype every tensor is converted to.
    names: source tensor name -> perl_jax path, for every tensor the model needs.
    found: source tensor name -> the file holding it (for error messages).
    read: source tensor name -> numpy array in HF layout (only called once per tensor).
    mesh: where params go (default: the first device); shardings follow sharding.PARAM_RULES.
    weight_dtype: how projection kernels are stored (perl_jax.quant.store_kernel): quantised
      formats are quantised here on the host, one tensor at a time.
  """
  from perl_jax import quant
  from perl_jax.progress import Progress
  mesh = mesh or default_mesh()
  abstract = abstract_params(dataclasses.replace(cfg, weight_dtype=""))
  flat = {}
  progress = Progress("checkpoint", f"loading {os.path.basename(source) or 'weights'}:",
                      len(names), "tensors")
  for name, path in names.items():
    want = abstract[path]
    array = read(name)
    if isinstance(array, dict):  # quantised blocks kept as the file stores them (GGUF)
      stored = _stored_blocks(path, array, want.shape, found.get(name, source), name)
    else:
      expected = hf_shape(path, want.shape)
      if tuple(array.shape) != expected:
        raise ValueError(f"{found.get(name, source)}: tensor {name} has shape "
                         f"{tuple(array.shape)}, expected {expected} (perl_jax {path} "
                         f"{tuple(want.shape)})")
      stored = quant.store_kernel(np.asarray(to_perl(path, array, want.shape), want.dtype),
                                  path, weight_dtype)
    flat.update({p: put(v, p, v.dtype, mesh) for p, v in stored.items()})
    del array
    progress.update(len(flat))
  return traverse_util.unflatten_dict(flat, sep="/")


def _stored_blocks(path: str, blocks: dict, shape: tuple, source: str, name: str) -> dict:
  """The "gguf" leaves (perl_jax.quant) of one kernel's blocks in HF layout ({"codes" [out, in],
  "scale"/"offset" [out, in / block], "bits"}), in the perl_jax layout of `shape`."""
  from perl_jax import quant
  expected = hf_shape(path, shape)
  if tuple(blocks["codes"].shape) != expected:
    raise ValueError(f"{source}: tensor {name} has shape {tuple(blocks['codes'].shape)}, "
                     f"expected {expected} (perl_jax {path} {tuple(shape)})")
  axis = _in_dims(path) - 1
  per_block = expected[1] // blocks["scale"].shape[1]
  block_shape = shape[:axis] + (shape[axis] // per_block,) + shape[axis + 1:]
  as_perl = lambda a, s: None if a is None else to_perl(path, a, s)
  leaves = quant.gguf_leaves(to_perl(path, blocks["codes"], shape),
                             as_perl(blocks["scale"], block_shape),
                             as_perl(blocks["offset"], block_shape), blocks["bits"], axis)
  return {f"{path.rsplit('/', 1)[0]}/{leaf}": v for leaf, v in leaves.items()}


def put(host: np.ndarray, path: str, dtype, mesh) -> jax.Array:
  """One host array, converted to `dtype`, onto its sharding (each device gets only its shard)."""
  host = np.ascontiguousarray(host, dtype=dtype)
  sharding = NamedSharding(mesh, sharding_lib.spec_for(path, host.shape, mesh))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _tensor_files(directory: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the shard index or the files themselves."""
  from safetensors import safe_open
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors weights in {directory}")
  found = {}
  for file in files:
    with safe_open(file, framework="numpy") as f:
      found.update({name: file for name in f.keys()})
  return found


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    return json.load(f)


def load(directory: str, mesh=None, dtype: str = "float32", weight_dtype: str = ""
         ) -> tuple[model_lib.ModelConfig, dict]:
  """(ModelConfig, params) of a transformers checkpoint dir, params in `dtype` on `mesh`
  (projection kernels as `weight_dtype`, see place_tensors)."""
  from safetensors import safe_open
  cfg = config_from_hf(read_config(directory), param_dtype=jnp.dtype(dtype).name)
  found = _tensor_files(directory)
  names = tensor_names(cfg)
  ignorable = ["lm_head.weight"] if cfg.tie_embeddings else []
  check_names(found, names, directory, ignorable)
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name):
      file = found[name]
      if file not in handles:
        handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
      return handles[file].get_tensor(name)

    params = place_tensors(cfg, names, found, read, mesh, directory, weight_dtype)
  return dataclasses.replace(cfg, weight_dtype=weight_dtype), params


# ----------------------------------------------------------------------------- tokenizer


def _token_id(value, sp) -> int | None:
  """An id from a config value: an int, a list of ints (first), or a token string / dict."""
  if isinstance(value, list):
    value = value[0] if value else None
  if isinstance(value, dict):
    value = value.get("content")
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, str):
    i = sp.piece_to_id(value)
    return i if i != sp.unk_id() or value == sp.id_to_piece(sp.unk_id()) else None
  return None


def special_token_ids(directory: str, sp) -> dict[str, int | None]:
  """bos/eos/pad ids from tokenizer_config.json, generation_config.json, then config.json."""
  ids = {"bos_id": None, "eos_id": None, "pad_id": None}
  sources = [("tokenizer_config.json", "{}_token"), ("generation_config.json", "{}_token_id"),
             ("config.json", "{}_token_id")]
  for file, key in sources:
    path = os.path.join(directory, file)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      values = json.load(f)
    for name in ids:
      if ids[name] is None:
        ids[name] = _token_id(values.get(key.format(name[:-3])), sp)
  return ids


def load_tokenizer(directory: str) -> tokenizer_lib.Tokenizer | None:
  """The sentencepiece tokenizer of a checkpoint dir (None if it ships no tokenizer.model).

  Without a pad id anywhere (Llama), padding uses the unknown token's id; masks, not ids, keep
  padding out of the model.
  """
  import sentencepiece as spm
  path = os.path.join(directory, "tokenizer.model")
  if not os.path.exists(path):
    return None
  sp = spm.SentencePieceProcessor(model_file=path)
  ids = special_token_ids(directory, sp)
  if ids["pad_id"] is None and sp.pad_id() < 0:
    ids["pad_id"] = sp.unk_id()
  return tokenizer_lib.Tokenizer(path, **ids)


# ----------------------------------------------------------------------------- export


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save(directory: str, cfg: model_lib.ModelConfig, params: dict, *,
         tokenizer: tokenizer_lib.Tokenizer | None = None, base_config: dict | None = None,
         dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `params` as a transformers checkpoint: config.json + safetensors (+ index, tokenizer).

  Tensors are fetched one at a time and written in shards of at most `max_shard_bytes`, so the host
  holds one shard. `dtype` (default: each leaf's own) converts on the way out. On several hosts
  every process must call this; only process 0 writes.
  """
  from safetensors.numpy import save_file
  names = tensor_names(cfg)
  flat = traverse_util.flatten_dict(params, sep="/")
  check_names({p: "params" for p in flat}, names.values(), "params tree")
  dtype = jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype).name
  special = None
  if tokenizer is not None:
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
  hf_config = config_to_hf(cfg, base_config, special, dtype)
  write = jax.process_index() == 0
  if write:
    os.makedirs(directory, exist_ok=True)
    for old in glob.glob(os.path.join(directory, "model*.safetensors*")):
      os.remove(old)
  shard, shard_bytes, shard_files, weight_map, total = {}, 0, [], {}, 0

  def flush():
    nonlocal shard, shard_bytes
    file = f"model-part-{len(shard_files):05d}.safetensors"
    if write:
      save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
      os.chmod(os.path.join(directory, file), 0o644)  # safetensors writes 0600
    shard_files.append(file)
    weight_map.update({name: file for name in shard})
    shard, shard_bytes = {}, 0

  for name, path in names.items():
    array = np.ascontiguousarray(to_hf(path, _to_host(flat[path])), dtype=jnp.dtype(dtype))
    if shard and shard_bytes + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
    shard_bytes += array.nbytes
    total += array.nbytes
  flush()
  if not write:
    return
  _name_shards(directory, shard_files, weight_map, total)
  common.write_json(os.path.join(directory, "config.json"), hf_config)
  if special:
    common.write_json(os.path.join(directory, "generation_config.json"), special)
  if tokenizer is not None:
    _save_tokenizer(directory, tokenizer, hf_config["model_type"])


def _name_shards(directory: str, shard_files: list[str], weight_map: dict, total: int) -> None:
  """Renames the written shards as transformers names them (one file: model.safetensors, no
  index; several: model-0000i-of-0000n.safetensors and the index)."""
  if len(shard_files) == 1:
    os.replace(os.path.join(directory, shard_files[0]),
               os.path.join(directory, "model.safetensors"))
    return
  n = len(shard_files)
  final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(shard_files)}
  for old, new in final.items():
    os.replace(os.path.join(directory, old), os.path.join(directory, new))
  index = {"metadata": {"total_size": total},
           "weight_map": {k: final[v] for k, v in weight_map.items()}}
  common.write_json(os.path.join(directory, "model.safetensors.index.json"), index)


def _save_tokenizer(directory: str, tokenizer: tokenizer_lib.Tokenizer, model_type: str) -> None:
  """tokenizer.model + a tokenizer_config.json naming the special pieces (BOS added on encode)."""
  target = os.path.join(directory, "tokenizer.model")
  if os.path.abspath(tokenizer.path) != os.path.abspath(target):
    shutil.copyfile(tokenizer.path, target)
  sp = tokenizer.sp
  common.write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "LlamaTokenizer" if model_type == "llama" else "GemmaTokenizer",
      "add_bos_token": True, "add_eos_token": False,
      "bos_token": sp.id_to_piece(tokenizer.bos_id), "eos_token": sp.id_to_piece(tokenizer.eos_id),
      "pad_token": sp.id_to_piece(tokenizer.pad_id), "unk_token": sp.id_to_piece(sp.unk_id()),
  })
