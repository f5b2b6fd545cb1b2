"""A decoder-only transformer covering the Gemma family (Gemma 1/2/3) and Llama-style models.

Every architectural difference is a field of `ModelConfig`; `PRESETS` holds the real sizes.

Param layout (the `params` collection; checkpoint loaders map onto these names):

    embedder/input_embedding                 (vocab, d_model)
    layer_{i}/pre_attention_norm/scale       (d_model,)
    layer_{i}/attn/q/kernel                  (d_model, num_heads, head_dim)
    layer_{i}/attn/k/kernel, v/kernel        (d_model, num_kv_heads, head_dim)
    layer_{i}/attn/o/kernel                  (num_heads, head_dim, d_model)
    layer_{i}/attn/q_norm/scale, k_norm      (head_dim,)            if qk_norm
    layer_{i}/post_attention_norm/scale      (d_model,)             if post_norms
    layer_{i}/pre_ffw_norm/scale             (d_model,)
    layer_{i}/mlp/gate/kernel, up/kernel     (d_model, mlp_dim)
    layer_{i}/mlp/down/kernel                (mlp_dim, d_model)
    layer_{i}/post_ffw_norm/scale            (d_model,)             if post_norms
    final_norm/scale                         (d_model,)
    lm_head/kernel                           (d_model, vocab)       if not tie_embeddings

The `adapter` collection holds LoRA `lora_a`/`lora_b` under the same module paths, and the scalar
head `score_head/{kernel, bias}` used by reward and value models. Applied without it, the model is
the anchor (adapters off); applied with it, it must fit the model's targets exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perl_jax import lora as lora_lib
from perl_jax import quant

_NEG_INF = -2.3819763e38  # large negative finite value, safe in bf16/f32
SCANNED = "layers"  # the stacked layers' path under ModelConfig.scan_layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer. Defaults are Gemma 1 conventions."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int  # 1 = multi-query, < num_heads = grouped-query attention
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "gelu_tanh"  # "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU, Llama)
  query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power; None = head_dim
  attn_logit_softcap: float | None = None  # Gemma 2: 50.0
  final_logit_softcap: float | None = None  # Gemma 2: 30.0
  sliding_window: int | None = None  # window of the local layers
  local_global_pattern: int = 0  # k > 0: every k-th layer is global, the others local
  rope_base: float = 10_000.0  # RoPE base of global layers
  rope_local_base: float | None = None  # RoPE base of local layers (Gemma 3: 10k); None = same
  rope_scale_factor: float = 1.0  # linear position scaling on global layers (Gemma 3 4B+: 8)
  qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys
  post_norms: bool = False  # Gemma 2/3: RMSNorm after attention and MLP too
  tie_embeddings: bool = True
  embed_scale: bool = True  # multiply input embeddings by sqrt(d_model) (Gemma)
  norm_offset: bool = True  # RMSNorm weight applied as (1 + scale) (Gemma); False: scale (Llama)
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # storage dtype of the backbone
  # Storage of the frozen projection kernels (attention q/k/v/o, MLP): "" = param_dtype,
  # "float32"/"bfloat16", or "int8"/"nf4"/"gguf"/"bf16_bits" (perl_jax.quant: dequantised
  # inside each matmul).
  weight_dtype: str = ""
  # Storage of the vocabulary tables (the tied embedding; or the input embedding and lm_head):
  # "" = param_dtype, "float32"/"bfloat16", or "int8"/"nf4" (gathered rows and vocabulary tiles
  # dequantised).
  embedding_dtype: str = ""
  remat: bool = False  # rematerialise each layer in the backward pass
  # What a rematerialised layer keeps for the backward pass: a name in jax.checkpoint_policies
  # ("nothing_saveable": only the layer's input; "dots_saveable": matmul outputs too, ...).
  remat_policy: str = "nothing_saveable"
  # Layers under nn.scan: one compiled layer body (fast compiles at any depth) and a backward
  # pass that rematerialises one layer at a time. Params and adapters are then stacked under
  # `layers/` with a leading layer axis (`stack_layers` / `unstack_layers` convert); False keeps
  # the per-layer `layer_{i}/` layout that checkpoint loaders and exports use.
  scan_layers: bool = False
  # Tokens (over the batch) per chunk of the log-prob computation (perl_jax.logprobs): the
  # largest logits tensor any step builds is [chunk, vocab] f32. 0 = about 256 MiB of it.
  logprob_chunk_tokens: int = 0
  # Vocabulary rows per tile of the log-prob computation: each chunk's logits are built one
  # tile at a time with a running log-sum-exp, so only [chunk, tile] logits (and one
  # dequantised tile of a quantised embedding) exist at once. 0 = the whole vocabulary at once
  # for a float embedding, EMBEDDING_TILE rows for a quantised one.
  logprob_vocab_tile: int = 0
  # Positions per MLP block: a layer's [B, T, mlp_dim] intermediates (gate, up, their product
  # and gradients) are computed, and recomputed in the backward pass, a block at a time. 0 =
  # all positions at once; lengths it does not divide run as one block.
  mlp_chunk: int = 0
  # Queries per attention block (perl_jax.model.attend): a layer's f32 scores are computed and
  # rematerialised [B, heads, chunk, S] at a time. 0 = all queries at once.
  attention_chunk: int = 0

  def is_local(self, layer: int) -> bool:
    return (self.sliding_window is not None and self.local_global_pattern > 0
            and (layer + 1) % self.local_global_pattern != 0)


_GEMMA2 = dict(attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
               local_global_pattern=2, post_norms=True, query_pre_attn_scalar=256)
_GEMMA3 = dict(sliding_window=512, local_global_pattern=6, post_norms=True, qk_norm=True,
               rope_base=1_000_000.0, rope_local_base=10_000.0, query_pre_attn_scalar=256)

PRESETS: dict[str, ModelConfig] = {
    "gemma-2b": ModelConfig(256_000, 2048, 18, 8, 1, 256, 16_384),
    "gemma-7b": ModelConfig(256_000, 3072, 28, 16, 16, 256, 24_576),
    "gemma2-2b": ModelConfig(256_000, 2304, 26, 8, 4, 256, 9216, **_GEMMA2),
    "gemma2-9b": ModelConfig(256_000, 3584, 42, 16, 8, 256, 14_336, **_GEMMA2),
    "gemma3-270m": ModelConfig(262_144, 640, 18, 4, 1, 256, 2048, **_GEMMA3),
    "gemma3-1b": ModelConfig(262_144, 1152, 26, 4, 1, 256, 6912, **_GEMMA3),
    # Small models for tests and the CPU demo; they exercise the same switches.
    "demo": ModelConfig(256, 128, 4, 4, 1, 32, 512),
    "tiny": ModelConfig(512, 64, 2, 4, 2, 16, 128),
    "tiny-gemma2": ModelConfig(512, 64, 2, 4, 2, 16, 128, **{**_GEMMA2, "sliding_window": 4,
                                                             "query_pre_attn_scalar": 16}),
    "tiny-gemma3": ModelConfig(512, 64, 3, 4, 1, 16, 128, **{**_GEMMA3, "sliding_window": 4,
                                                             "local_global_pattern": 3,
                                                             "query_pre_attn_scalar": 16}),
    "tiny-llama": ModelConfig(512, 64, 2, 4, 2, 16, 128, mlp_activation="silu",
                              tie_embeddings=False, embed_scale=False, norm_offset=False),
}


def model_config(preset: str, **overrides) -> ModelConfig:
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
  unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"unknown model fields {sorted(unknown)}")
  return dataclasses.replace(PRESETS[preset], **overrides)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """path -> (in_shape, out_shape) of every projection that can carry an adapter."""
  shapes = {}
  for i in range(cfg.num_layers):
    d, h, k, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    shapes.update({
        f"layer_{i}/attn/q": ((d,), (h, hd)),
        f"layer_{i}/attn/k": ((d,), (k, hd)),
        f"layer_{i}/attn/v": ((d,), (k, hd)),
        f"layer_{i}/attn/o": ((h, hd), (d,)),
        f"layer_{i}/mlp/gate": ((d,), (f,)),
        f"layer_{i}/mlp/up": ((d,), (f,)),
        f"layer_{i}/mlp/down": ((f,), (d,)),
    })
  return shapes


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
  offset: bool = True
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale if self.offset else scale)).astype(x.dtype)


def rope_tables(cfg: "ModelConfig", positions, num_positions: int) -> dict:
  """The rotary sin/cos tables of every layer kind, once per forward pass: {"global": (sin, cos)}
  plus "local" when local layers use another base; each [B, T, head_dim // 2] f32.

  sin and cos are evaluated on the `num_positions` rows 0..num_positions - 1 and gathered by
  position (padding positions clipped: padding can hold anything). The caller passes the number
  of key slots S: a real token's position counts the real tokens before it, all of which are
  keys, so it is below S. Gathering is exact (the same float ops on the same integers) and
  keeps XLA from fusing sin and cos into every q/k rotation that reads them, which recomputed
  them per head in each of them (forward and backward, every layer). Under nn.scan the tables
  are computed once outside the layer loop."""
  half = cfg.head_dim // 2
  rows = jnp.clip(positions, 0, num_positions - 1)

  def table(base, scale_factor):
    timescale = base ** (2.0 * jnp.arange(half, dtype=jnp.float32) / cfg.head_dim)
    angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] / scale_factor / timescale
    return jnp.take(jnp.sin(angles), rows, axis=0), jnp.take(jnp.cos(angles), rows, axis=0)
  tables = {"global": table(cfg.rope_base, cfg.rope_scale_factor)}
  if (cfg.sliding_window is not None and cfg.local_global_pattern > 0
      and (cfg.rope_local_base or cfg.rope_base, 1.0) != (cfg.rope_base, cfg.rope_scale_factor)):
    tables["local"] = table(cfg.rope_local_base or cfg.rope_base, 1.0)
  return tables


def apply_rope(x, sin, cos):
  """Rotary embedding, split-half convention. x: [B, T, N, D]; sin, cos: [B, T, D // 2]."""
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap: float | None):
  return x if cap is None else jnp.tanh(x / cap) * cap


def _attend_block(q, k, v, mask, cap):
  """q [B, T, K, G, D] over keys/values [B, S, K, D] where mask [B, T, S]: [B, T, K, G, D]."""
  logits = jnp.einsum("btkgd,bskd->bktgs", q, k).astype(jnp.float32)
  logits = softcap(logits, cap)
  logits = jnp.where(mask[:, None, :, None, :], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bktgs,bskd->btkgd", probs, v)


def attend(q, k, v, mask, cap: float | None, chunk: int):
  """Softmax attention, exact (soft-cap and masks included), in blocks of `chunk` queries.

  Each block's f32 scores [B, K, chunk, G, S] are rematerialised in the backward pass, so a
  layer never holds all [B, K, G, T, S] of them at once. chunk 0, or T not a multiple of it
  (decoding), is one block."""
  t = q.shape[1]
  if not chunk or t <= chunk or t % chunk:
    return _attend_block(q, k, v, mask, cap)
  n = t // chunk
  blocks = lambda x: jnp.moveaxis(x.reshape((x.shape[0], n, chunk) + x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda qm: jax.checkpoint(_attend_block)(qm[0], k, v, qm[1], cap),
                    (blocks(q), blocks(mask)))
  return jnp.moveaxis(out, 0, 1).reshape(q.shape[:2] + out.shape[3:])


def remat_policy(name: str):
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy):
    known = sorted(n for n in dir(jax.checkpoint_policies) if n.endswith("saveable"))
    raise ValueError(f"model.remat_policy {name!r} is not in jax.checkpoint_policies; try one of "
                     f"{', '.join(known)}")
  return policy


EMBEDDING_TILE = 16384  # vocabulary rows per tile of a quantised output embedding


def vocab_tile(cfg: ModelConfig) -> int:
  """Vocabulary rows per log-prob tile (cfg.logprob_vocab_tile; 0 = see ModelConfig)."""
  if cfg.logprob_vocab_tile:
    return min(cfg.logprob_vocab_tile, cfg.vocab_size)
  return min(EMBEDDING_TILE, cfg.vocab_size) if quant.is_quantized(cfg.embedding_dtype) \
      else cfg.vocab_size


def logits_of(cfg: ModelConfig, params: dict, hidden, start=None, size: int | None = None):
  """f32 logits [..., V] of final hidden states [..., d] (tied embedding or lm_head, soft-cap),
  or of vocabulary rows [start, start + size) only ([..., size]).

  Only for a few positions at a time (decoding, chunked log-probs): over a whole batch of
  sequences this is the [B, T, V] tensor that perl_jax.logprobs exists to avoid."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:  # einsum, not table.T: no transposed copy of the table
    table = quant.dequantize_slice(params["embedder"], "input_embedding", cfg.embedding_dtype,
                                   0, dtype, start, size)
    raw = jnp.einsum("...d,vd->...v", hidden.astype(dtype), table,
                     preferred_element_type=jnp.float32)
  else:
    kernel = quant.dequantize_slice(params["lm_head"], "kernel", cfg.embedding_dtype, 1, dtype,
                                    start, size)
    raw = jnp.einsum("...d,dv->...v", hidden.astype(dtype), kernel,
                     preferred_element_type=jnp.float32)
  return softcap(raw.astype(jnp.float32), cfg.final_logit_softcap)


def next_token_logits(cfg: ModelConfig, params: dict, hidden):
  """f32 logits [B, V] of last hidden states [B, d], for sampling. A quantised table is read
  vocab_tile(cfg) rows at a time into the [B, V] logits (the last tile shifted back to end at the
  vocabulary's end, rewriting rows it shares with the one before), so a decode step dequantises
  one tile, never the whole table; a float table is read at once unless model.logprob_vocab_tile
  asks for tiles. On a mesh that shards the vocabulary over `tensor`, XLA gathers the stored
  table once per call to slice its tiles (as for the tiled log-probs); the logits come out
  replicated."""
  tile, vocab = vocab_tile(cfg), cfg.vocab_size
  if tile >= vocab:
    return logits_of(cfg, params, hidden)

  def write(i, logits):
    start = jnp.minimum(i * tile, vocab - tile)
    return jax.lax.dynamic_update_slice_in_dim(logits, logits_of(cfg, params, hidden, start, tile),
                                               start, axis=logits.ndim - 1)

  return jax.lax.fori_loop(0, -(-vocab // tile), write,
                           jnp.zeros(hidden.shape[:-1] + (vocab,), jnp.float32))


class _Lora(nn.Module):
  """Base with the LoRA lookup shared by attention and MLP."""
  cfg: ModelConfig
  lora: lora_lib.LoRASpec | None
  lora_targets: frozenset
  prefix: str  # module path of this layer part, e.g. "layer_3/attn"

  def proj(self, name, in_shape, out_shape):
    spec = self.lora if f"{self.prefix}/{name}" in self.lora_targets else None
    weight = self.cfg.weight_dtype
    quantized = quant.is_quantized(weight)
    return lora_lib.LoRAProjection(
        in_shape, out_shape, spec, dtype=jnp.dtype(self.cfg.dtype),
        param_dtype=jnp.dtype(weight if weight and not quantized else self.cfg.param_dtype),
        weight_format=weight if quantized else "", name=name)


class Attention(_Lora):

  @nn.compact
  def __call__(self, x, is_local, rope, attn_mask, cache, cache_index, deterministic,
               rows=None):
    """rows: None, or [B] positions: only they query (outputs [B, 1, d]); keys and values come
    from every position of x. Not with a cache."""
    cfg = self.cfg
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    at_rows = (lambda a: a) if rows is None else (lambda a: take_rows(a, rows))
    q = self.proj("q", (d,), (h, hd))(at_rows(x), deterministic)
    k = self.proj("k", (d,), (kv, hd))(x, deterministic)
    v = self.proj("v", (d,), (kv, hd))(x, deterministic)
    if cfg.qk_norm:
      norm = lambda name: RMSNorm(cfg.norm_offset, cfg.norm_eps, jnp.dtype(cfg.param_dtype),
                                  name=name)
      q, k = norm("q_norm")(q), norm("k_norm")(k)
    has_local = cfg.sliding_window is not None and cfg.local_global_pattern > 0
    local = jnp.asarray(is_local)
    sin, cos = rope["global"]
    if "local" in rope:  # under nn.scan `is_local` is traced: select the table, not the layer
      sin, cos = (jnp.where(local, a, b) for a, b in zip(rope["local"], rope["global"]))
    q = apply_rope(q, at_rows(sin), at_rows(cos))
    k = apply_rope(k, sin, cos)
    q = q * (cfg.query_pre_attn_scalar or hd) ** -0.5

    start = 0 if cache is None else cache_index
    if cache is not None and "layer" in cache:  # scanned: this layer's slot of [L, B, S, K, D]
      layer = cache["layer"]
      write = lambda c, new: jax.lax.dynamic_update_slice(
          c, new.astype(c.dtype)[None], (layer, 0, start, 0, 0))
      cache = {"k": write(cache["k"], k), "v": write(cache["v"], v), "layer": layer}
      k, v = cache["k"][layer], cache["v"][layer]
    elif cache is not None:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
      cache = {"k": k, "v": v}
    b, t = q.shape[:2]
    s = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, hd)
    mask = at_rows(attn_mask)
    if has_local and cache is None:  # by position: in a packed row (perl_jax.packing) a
      # key can sit further from its query than their positions are apart
      positions = rope["positions"]
      in_window = (at_rows(positions)[:, :, None] - positions[:, None, :]) < cfg.sliding_window
      mask = mask & (in_window | ~local)
    elif has_local:  # query slots [1, t] against the cache's key slots
      q_slot = (start + jnp.arange(t))[None]
      in_window = (q_slot[:, :, None] - jnp.arange(s)) < cfg.sliding_window
      mask = mask & (in_window | ~local)
    out = attend(qg, k.astype(q.dtype), v, mask, cfg.attn_logit_softcap, cfg.attention_chunk)
    return self.proj("o", (h, hd), (d,))(out.reshape(b, t, h, hd).astype(x.dtype),
                                         deterministic), cache


def take_rows(a, rows):
  """a [B, T, ...] at one position per row, rows [B] -> [B, 1, ...]. take_along_axis gathers
  within each row, so a batch sharded over devices stays where it is."""
  return jnp.take_along_axis(a, rows.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)


class MLP(_Lora):

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    act = {"gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True), "silu": jax.nn.silu}
    if cfg.mlp_activation not in act:
      raise ValueError(f"model.mlp_activation must be one of {sorted(act)}, "
                       f"got {cfg.mlp_activation!r}")
    gate = self.proj("gate", (cfg.d_model,), (cfg.mlp_dim,))(x, deterministic)
    up = self.proj("up", (cfg.d_model,), (cfg.mlp_dim,))(x, deterministic)
    return self.proj("down", (cfg.mlp_dim,), (cfg.d_model,))(act[cfg.mlp_activation](gate) * up,
                                                              deterministic)


class Block(nn.Module):
  """One decoder layer. `prefix` is its path ("layer_3", or "layers" under nn.scan)."""
  cfg: ModelConfig
  prefix: str
  lora: lora_lib.LoRASpec | None
  lora_targets: frozenset

  @nn.compact
  def __call__(self, x, is_local, rope, attn_mask, cache, cache_index, deterministic,
               rows=None):
    """rows: None, or [B] positions: the layer's output only there ([B, 1, d]; see Attention)."""
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_offset, cfg.norm_eps, jnp.dtype(cfg.param_dtype),
                                name=name)
    path = self.prefix
    h, cache = Attention(cfg, self.lora, self.lora_targets, f"{path}/attn",
                         name="attn")(norm("pre_attention_norm")(x), is_local, rope,
                                      attn_mask, cache, cache_index, deterministic, rows)
    if cfg.post_norms:
      h = norm("post_attention_norm")(h)
    x = (x if rows is None else take_rows(x, rows)) + h
    h = norm("pre_ffw_norm")(x)
    blocks = mlp_blocks(cfg, h.shape[1])
    if blocks == 1:
      h = MLP(cfg, self.lora, self.lora_targets, f"{path}/mlp", name="mlp")(h, deterministic)
    else:  # positions in blocks of cfg.mlp_chunk, each rematerialised on its own
      scanned = nn.scan(nn.remat(_MLPBlock, prevent_cse=False),
                        variable_broadcast=["params", lora_lib.ADAPTER],
                        split_rngs={"params": False, "dropout": True}, length=blocks)
      chunks = jnp.moveaxis(h.reshape(h.shape[0], blocks, -1, h.shape[-1]), 1, 0)
      _, out = scanned(cfg, self.lora, self.lora_targets, f"{path}/mlp", deterministic,
                       name="mlp")(None, chunks)
      h = jnp.moveaxis(out, 0, 1).reshape(h.shape)
    if cfg.post_norms:
      h = norm("post_ffw_norm")(h)
    return x + h, cache


def mlp_blocks(cfg: ModelConfig, length: int) -> int:
  """How many blocks of positions the MLP runs in (cfg.mlp_chunk; 1 = all at once)."""
  chunk = cfg.mlp_chunk
  return length // chunk if chunk and length > chunk and length % chunk == 0 else 1


class _MLPBlock(MLP):
  """The MLP on one block of positions, the body of Block's scan over blocks: the same params
  (broadcast, not stacked: the layout is MLP's), [B, T, mlp] intermediates one block at a time."""
  deterministic: bool = True

  def __call__(self, carry, x):
    return carry, super().__call__(x, self.deterministic)


class ScannedBlock(Block):
  """The layer body under nn.scan. The stacked KV cache [L, B, S, K, D] rides in the carry with
  the layer index, and attention writes the new keys and values into its layer's slot in place;
  as a scanned output it would be a fresh copy of the whole cache at every token."""

  def __call__(self, carry, is_local, rope, attn_mask, cache_index, deterministic):
    x, cache, layer = carry
    if cache is not None:
      cache = {**cache, "layer": layer}
    x, cache = super().__call__(x, is_local, rope, attn_mask, cache, cache_index,
                                deterministic)
    if cache is not None:
      cache = {"k": cache["k"], "v": cache["v"]}
    return (x, cache, layer + 1), None


class ScoreHead(nn.Module):
  """Scalar head (reward or value) per position; its params live in the adapter collection."""

  @nn.compact
  def __call__(self, hidden):
    d = hidden.shape[-1]
    kernel = self.variable(lora_lib.ADAPTER, "kernel", lambda: jnp.zeros((d, 1), jnp.float32))
    bias = self.variable(lora_lib.ADAPTER, "bias", lambda: jnp.zeros((1,), jnp.float32))
    return (hidden.astype(jnp.float32) @ kernel.value + bias.value)[..., 0]


def embed(cfg: ModelConfig, embedder: dict, tokens):
  """Token embeddings in the compute dtype (times sqrt(d_model) where the family scales them).
  embedder: the `embedder` params ({"input_embedding"}, plus "scale" when quantised)."""
  dtype = jnp.dtype(cfg.dtype)
  x = quant.lookup_rows(embedder, cfg.embedding_dtype, tokens, dtype)
  return x * jnp.asarray(cfg.d_model ** 0.5, dtype) if cfg.embed_scale else x


def _stored_param(module: nn.Module, name: str, key: str, shape: tuple, n_lead: int,
                  cfg: ModelConfig, init):
  """A vocabulary table's param group {key: ...} as cfg.embedding_dtype stores it: codes and
  scales when quantised (values come from the float twin, see init_variables), else a float
  `key` from `init` in embedding_dtype or param_dtype."""
  fmt = cfg.embedding_dtype
  if quant.is_quantized(fmt):
    codes_shape, scale_shape = quant.stored_shapes(shape, fmt, 1, n_lead)
    return module.param(name, lambda rng: {
        key: jnp.zeros(codes_shape, quant.CODE_DTYPES[fmt]),
        "scale": jnp.zeros(scale_shape, quant.SCALE_DTYPES[fmt])})
  return module.param(name, lambda rng: {key: init(rng, shape, jnp.dtype(fmt or cfg.param_dtype))})


class Transformer(nn.Module):
  """Decoder-only LM with LoRA on `lora_targets`.

  Applied with an `adapter` collection, it must hold A/B for every target and for nothing else
  (score-head leaves aside), else ValueError; applied without one, it is the bare backbone."""
  cfg: ModelConfig
  lora: lora_lib.LoRASpec | None = None
  lora_targets: frozenset = frozenset()

  def _active_lora(self) -> lora_lib.LoRASpec | None:
    """Adapters are on exactly when the caller passes an adapter collection, and it must then
    fit the targets; with none the model is the bare backbone (the anchor)."""
    if self.is_initializing():
      return self.lora
    if lora_lib.ADAPTER not in self.variables:
      return None
    lora_lib.check_adapter_targets(self.variables[lora_lib.ADAPTER], self.lora_targets)
    return self.lora

  @nn.compact
  def __call__(self, tokens, positions, attn_mask, *, cache=None, cache_index=None,
               logits: bool = True, scores: bool = False, deterministic: bool = True,
               rows=None):
    """Runs the model.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int positions (0 at the first real token; padding can hold anything).
        A real token's position must be below S (attn_mask's last axis): it counts the real
        tokens before it, which are all keys (see rope_tables).
      attn_mask: [B, T, S] bool, True where query t may attend to key slot s (S = T without a
        cache, the cache length with one). Build it with `causal_mask` / `decode_mask`.
      cache: optional {"layer_i": {"k", "v"}} from `init_cache`; keys/values of these tokens are
        written at slots [cache_index, cache_index + T).
      logits / scores: which outputs to compute (the vocab projection is the largest matmul).
      rows: None, or [B] int positions: every output only at these ([B, 1, ...]), e.g. a
        reward model's score at each sequence's last token. The last layer then runs its
        queries, attention, output projection and MLP at them alone: nothing after it reads the
        other positions (with unrolled layers; under nn.scan the outputs are just gathered).
        Not with a cache.
    Returns:
      dict with "hidden" [B, T, d], "logits" [B, T, V] f32, "scores" [B, T] f32, "cache".
    """
    cfg = self.cfg
    if rows is not None and cache is not None:
      raise ValueError("Transformer: `rows` (outputs at one position per row) is not for "
                       "decoding with a KV cache")
    embedder = _stored_param(self, "embedder", "input_embedding", (cfg.vocab_size, cfg.d_model),
                             1, cfg, nn.initializers.normal(cfg.d_model ** -0.5))
    x = embed(cfg, embedder, tokens)
    lora = self._active_lora()
    block = ScannedBlock if cfg.scan_layers else Block
    if cfg.remat:  # `deterministic` (a Python bool, before `rows`) is static; self is 0
      block = nn.remat(block, static_argnums=(6 if cfg.scan_layers else 7,),
                       prevent_cse=not cfg.scan_layers, policy=remat_policy(cfg.remat_policy))
    flags = [cfg.is_local(i) for i in range(cfg.num_layers)]
    rope = dict(rope_tables(cfg, positions, attn_mask.shape[-1]), positions=positions)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0, lora_lib.ADAPTER: 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers)
      (x, new_cache, _), _ = scanned(cfg, SCANNED, lora, self.lora_targets, name=SCANNED)(
          (x, cache, 0), jnp.asarray(flags), rope, attn_mask, cache_index, deterministic)
      if rows is not None:
        x = take_rows(x, rows)
    else:
      new_cache = {} if cache is not None else None
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else cache[f"layer_{i}"]
        last = i == cfg.num_layers - 1
        x, layer_cache = block(cfg, f"layer_{i}", lora, self.lora_targets,
                               name=f"layer_{i}")(x, flags[i], rope, attn_mask, layer_cache,
                                                  cache_index, deterministic,
                                                  rows if last else None)
        if cache is not None:
          new_cache[f"layer_{i}"] = layer_cache
    hidden = RMSNorm(cfg.norm_offset, cfg.norm_eps, jnp.dtype(cfg.param_dtype),
                     name="final_norm")(x)
    out = {"hidden": hidden, "cache": new_cache}
    if not cfg.tie_embeddings:
      _stored_param(self, "lm_head", "kernel", (cfg.d_model, cfg.vocab_size), 0, cfg,
                    nn.initializers.lecun_normal())
    if logits:  # every position: for parity checks; training and decoding use logits_of
      out["logits"] = logits_of(cfg, self.variables["params"], hidden)
    if scores:
      out["scores"] = ScoreHead(name="score_head")(hidden)
    return out


# ----------------------------------------------------------------------------- masks and cache


def causal_mask(input_mask):
  """[B, T] bool of real tokens -> [B, T, T] causal attention mask over real keys."""
  t = input_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None] & input_mask[:, None, :]


def decode_mask(cache_valid, cache_index, num_new: int):
  """Mask for `num_new` tokens written at slots [cache_index, cache_index + num_new).

  cache_valid: [B, S] bool, True at slots holding real tokens (including the new ones).
  """
  s = cache_valid.shape[1]
  q_slot = cache_index + jnp.arange(num_new)
  return (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & cache_valid[:, None, :]


def positions_from_mask(input_mask):
  """Positions counting real tokens only (0 at the first), for left or right padding."""
  return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """Zero KV cache: {"layer_i": {"k", "v"}} of [B, S, K, D], or stacked [L, B, S, K, D]."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.num_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(cfg.num_layers)}


def last_token_index(input_mask):
  """[B] position of each row's last real token (left or right padding)."""
  return input_mask.shape[1] - 1 - jnp.argmax(input_mask[:, ::-1], axis=1)


def last_token_values(values, input_mask):
  """values [B, T] read at the last real token of each row (works for left or right padding)."""
  return jnp.take_along_axis(values, last_token_index(input_mask)[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- construction


def build(cfg: ModelConfig, lora_rank: int = 0, lora_alpha: float | None = None,
          lora_targets=("attn/(q|k|v|o)$",), lora_dropout: float = 0.0,
          lora_dtype: str = "float32") -> Transformer:
  """A Transformer with adapters on the projections matched by `lora_targets` (rank 0: none)."""
  targets = lora_lib.select_targets(projection_shapes(cfg), lora_targets, lora_rank)
  if cfg.scan_layers:
    targets = _scanned_targets(targets, cfg.num_layers, lora_targets)
  spec = None
  if lora_rank > 0:
    spec = lora_lib.LoRASpec(lora_rank, float(lora_alpha or lora_rank), lora_dropout,
                             jnp.dtype(lora_dtype))
  return Transformer(cfg, spec, frozenset(targets))


def _scanned_targets(targets: set[str], num_layers: int, patterns) -> set[str]:
  """Per-layer target paths -> the stacked layers' ("layers/attn/q"); every layer must match."""
  kinds: dict[str, int] = {}
  for path in targets:
    kind = path.split("/", 1)[1]
    kinds[kind] = kinds.get(kind, 0) + 1
  partial = sorted(k for k, n in kinds.items() if n != num_layers)
  if partial:
    raise ValueError(f"lora.targets {tuple(patterns)} adapt {', '.join(partial)} in some layers "
                     f"only; with model.scan_layers=True every layer shares one adapter layout. "
                     f"Target every layer, or set --config.model.scan_layers=False")
  return {f"{SCANNED}/{kind}" for kind in kinds}


def _is_layer(key: str) -> bool:
  return key.startswith("layer_") and key[len("layer_"):].isdigit()


def stack_layers(tree: dict, num_layers: int) -> dict:
  """A params/adapter tree in the per-layer layout (`layer_{i}/...`) -> the scanned layout
  (`layers/...` with a leading layer axis). Other keys are kept; an empty tree stays empty."""
  layers = [tree[f"layer_{i}"] for i in range(num_layers) if f"layer_{i}" in tree]
  if not layers:
    return tree
  if len(layers) != num_layers:
    raise ValueError(f"tree has {len(layers)} of {num_layers} layer_i subtrees")
  out = {k: v for k, v in tree.items() if not _is_layer(k)}
  out[SCANNED] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layers(tree: dict) -> dict:
  """The inverse of `stack_layers` (a tree without `layers/` is returned as it is)."""
  if SCANNED not in tree:
    return tree
  stacked = tree[SCANNED]
  num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  out = {k: v for k, v in tree.items() if k != SCANNED}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def init_variables(model: Transformer, rng, batch: int = 1, length: int = 8,
                   score_head: bool = False):
  """{"params": backbone, "adapter": LoRA (+ score head)} for `model`.

  A scanned model gets its unrolled twin's values, stacked: the same seed gives the same weights
  in either layout (a run's numbers do not depend on model.scan_layers). A quantised model gets
  its float twin's values, quantised (perl_jax.quant)."""
  if quant.is_quantized(model.cfg.weight_dtype) or quant.is_quantized(model.cfg.embedding_dtype):
    twin = Transformer(dataclasses.replace(model.cfg, weight_dtype="", embedding_dtype=""),
                       model.lora,
                       model.lora_targets)
    variables = init_variables(twin, rng, batch, length, score_head)
    store = lambda params: quant.store_params(params, model.cfg.weight_dtype,
                                              model.cfg.embedding_dtype)
    return {**variables, "params": jax.jit(store)(variables["params"])}
  if model.cfg.scan_layers:
    twin = Transformer(dataclasses.replace(model.cfg, scan_layers=False), model.lora,
                       frozenset(f"layer_{i}/{path.split('/', 1)[1]}" for path in model.lora_targets
                                 for i in range(model.cfg.num_layers)))
    variables = init_variables(twin, rng, batch, length, score_head)
    stack = lambda variables: {k: stack_layers(v, model.cfg.num_layers)
                               for k, v in variables.items()}
    return jax.jit(stack)(variables)  # one program, as the init itself
  tokens = jnp.zeros((batch, length), jnp.int32)
  mask = jnp.ones((batch, length), bool)
  # One program: called outside a jit, an init would otherwise run op by op (hundreds of small
  # compilations; seconds for even a tiny model).
  return jax.jit(lambda rng: model.init({"params": rng}, tokens, positions_from_mask(mask),
                                        causal_mask(mask), logits=True, scores=score_head))(rng)


def param_counts(model: Transformer, score_head: bool = False) -> dict[str, int]:
  """Backbone, adapter and total parameter counts from shapes alone (nothing is allocated)."""
  shapes = jax.eval_shape(lambda r: init_variables(model, r, score_head=score_head),
                          jax.random.key(0))
  backbone = lora_lib.count_params(shapes.get("params", {}))
  adapter = lora_lib.count_params(shapes.get(lora_lib.ADAPTER, {}))
  return {"backbone": backbone, "adapter": adapter, "total": backbone + adapter}



