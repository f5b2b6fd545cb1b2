"""Official Gemma Flax checkpoints (google-deepmind/gemma orbax param trees), by key mapping.

The released trees have flat top-level keys (`transformer/layer_0/attn/q_einsum` -> {"w": ...});
the same paths joined with "/" are:

    transformer/embedder/input_embedding              (vocab, d)
    transformer/layer_{i}/attn/q_einsum/w             (heads, d, head_dim)
    transformer/layer_{i}/attn/kv_einsum/w            (2, kv_heads, d, head_dim)
    transformer/layer_{i}/attn/qkv_einsum/w           (3, heads, d, head_dim)  if kv_heads == heads
    transformer/layer_{i}/attn/attn_vec_einsum/w      (heads, head_dim, d)
    transformer/layer_{i}/attn/_query_norm/scale, _key_norm/scale               Gemma 3
    transformer/layer_{i}/mlp/gating_einsum[/w]       (2, mlp, d) Gemma 2/3, (2, d, mlp) Gemma 1
    transformer/layer_{i}/mlp/linear[/w]              (mlp, d)
    transformer/layer_{i}/{pre_attention,post_attention,pre_ffw,post_ffw}_norm/scale
    transformer/final_norm/scale

Gemma's RMSNorm applies (1 + scale) and its RoPE is split-half, as perl_jax's. The trees hold no
config: the architecture is the perl_jax preset whose sizes match the tree (or the one named), with
the vocab size of the embedding table. Vision-encoder weights of multimodal Gemma 3 are skipped.
Each layer is restored on its own (orbax partial restore), so the host holds one layer at a time.
"""
from __future__ import annotations

import os
from typing import Callable

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import model as model_lib
from perl_jax import checkpoints
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.checkpoints import hf

_SKIPPED = ("vision_encoder", "mm_input_projection", "mm_soft_embedding_norm", "siglip")


def _leaves(path: str) -> dict[str, tuple[tuple, tuple[int, ...]]]:
  """joined path (without a leading "transformer/") -> (key tuple in the tree, shape)."""
  out = {}
  for joined, entry in checkpoints.orbax_leaves(path).items():
    out[joined[len("transformer/"):] if joined.startswith("transformer/") else joined] = entry
  return out


def is_gemma_flax(path: str) -> bool:
  """Whether `path` is an orbax tree with the gemma library's param names."""
  try:
    leaves = _leaves(path)
  except Exception:  # not an orbax checkpoint at all
    return False
  return "embedder/input_embedding" in leaves and any("_einsum" in p for p in leaves)


def _get(leaves: dict, path: str):
  """The entry for `path`, accepting the `.../w` spelling of MLP weights too."""
  for candidate in (path, path + "/w"):
    if candidate in leaves:
      return candidate
  return None


def config_from_shapes(leaves: dict, preset: str | None = None,
                       param_dtype: str = "float32") -> model_lib.ModelConfig:
  """The preset `preset`, or the one whose sizes and family match the tree; vocab from the table."""
  vocab, d = leaves["embedder/input_embedding"][1]
  layers = len({p.split("/")[0] for p in leaves if p.startswith("layer_")})
  vec = leaves[_get(leaves, "layer_0/attn/attn_vec_einsum/w")][1]
  heads, head_dim = vec[0], vec[1]
  kv = _get(leaves, "layer_0/attn/kv_einsum/w")
  kv_heads = leaves[kv][1][1] if kv else heads
  mlp = leaves[_get(leaves, "layer_0/mlp/linear")][1][0]
  qk_norm = "layer_0/attn/_query_norm/scale" in leaves
  post_norms = "layer_0/post_attention_norm/scale" in leaves
  sizes = dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
               head_dim=head_dim, mlp_dim=mlp, qk_norm=qk_norm, post_norms=post_norms)
  if preset is None:
    matches = [name for name, cfg in model_lib.PRESETS.items()  # Gemma presets only
               if cfg.norm_offset and all(getattr(cfg, k) == v for k, v in sizes.items())]
    if not matches:
      raise ValueError(f"no perl_jax preset has the sizes of this Gemma checkpoint {sizes}; "
                       f"add one to model.PRESETS and pass its name")
    preset = matches[0]
  cfg = model_lib.model_config(preset, vocab_size=vocab, param_dtype=param_dtype)
  wrong = {k: (getattr(cfg, k), v) for k, v in sizes.items() if getattr(cfg, k) != v}
  if wrong:
    raise ValueError(f"preset {preset!r} does not fit this checkpoint: "
                     f"(preset, checkpoint) {wrong}")
  return cfg


def _layer_tensors(i: int, leaves: dict, cfg: model_lib.ModelConfig
                   ) -> dict[str, tuple[list[str], Callable]]:
  """perl_jax path -> (source paths, function of their arrays) for layer i."""
  src = f"layer_{i}/"
  dst = f"layer_{i}/"
  out = {}
  q, kv, qkv = (_get(leaves, src + f"attn/{n}/w") for n in ("q_einsum", "kv_einsum", "qkv_einsum"))
  heads_first = lambda w: np.moveaxis(w, 0, 1)  # (N, D, H) -> (D, N, H)
  if qkv:
    for j, name in enumerate("qkv"):
      out[dst + f"attn/{name}/kernel"] = ([qkv], lambda w, j=j: heads_first(w[j]))
  else:
    out[dst + "attn/q/kernel"] = ([q], heads_first)
    out[dst + "attn/k/kernel"] = ([kv], lambda w: heads_first(w[0]))
    out[dst + "attn/v/kernel"] = ([kv], lambda w: heads_first(w[1]))
  out[dst + "attn/o/kernel"] = ([_get(leaves, src + "attn/attn_vec_einsum/w")], lambda w: w)
  gating = _get(leaves, src + "mlp/gating_einsum")
  if cfg.mlp_dim == cfg.d_model:  # shapes cannot tell: Gemma 2/3 store (2, mlp, d)
    transposed = cfg.post_norms
  else:
    transposed = leaves[gating][1][1:] == (cfg.mlp_dim, cfg.d_model)
  gate_up = (lambda w, j: w[j].T) if transposed else (lambda w, j: w[j])
  out[dst + "mlp/gate/kernel"] = ([gating], lambda w: gate_up(w, 0))
  out[dst + "mlp/up/kernel"] = ([gating], lambda w: gate_up(w, 1))
  out[dst + "mlp/down/kernel"] = ([_get(leaves, src + "mlp/linear")], lambda w: w)
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if cfg.post_norms:
    norms += ["post_attention_norm", "post_ffw_norm"]
  for norm in norms:
    out[dst + f"{norm}/scale"] = ([src + f"{norm}/scale"], lambda w: w)
  if cfg.qk_norm:
    out[dst + "attn/q_norm/scale"] = ([src + "attn/_query_norm/scale"], lambda w: w)
    out[dst + "attn/k_norm/scale"] = ([src + "attn/_key_norm/scale"], lambda w: w)
  return out


def load(path: str, mesh=None, dtype: str = "float32", preset: str | None = None
         ) -> tuple[model_lib.ModelConfig, dict, tokenizer_lib.Tokenizer | None]:
  """(ModelConfig, params on `mesh` as `dtype`, tokenizer or None) of a Gemma Flax checkpoint.

  The tokenizer is `tokenizer.model` beside the checkpoint (in it or its parent dir), if any.
  """
  leaves = _leaves(path)
  cfg = config_from_shapes(leaves, preset, jnp.dtype(dtype).name)
  mesh = mesh or hf.default_mesh()
  abstract = hf.abstract_params(cfg)
  plan = {"embedder/input_embedding": (["embedder/input_embedding"], lambda w: w),
          "final_norm/scale": (["final_norm/scale"], lambda w: w)}
  groups = [["embedder/input_embedding", "final_norm/scale"]]
  for i in range(cfg.num_layers):
    layer = _layer_tensors(i, leaves, cfg)
    plan.update(layer)
    groups.append(list(layer))
  used = {s for sources, _ in plan.values() for s in sources}
  missing = sorted(s for s in used if s is None or s not in leaves)
  unexpected = sorted(p for p in set(leaves) - used if not any(k in p for k in _SKIPPED))
  if missing or unexpected or set(plan) != set(abstract):
    raise ValueError(f"Gemma Flax checkpoint {path} does not match {cfg}: missing "
                     f"{missing[:20]}, unexpected {unexpected[:20]}")
  flat = {}
  for group in groups:
    sources = sorted({s for p in group for s in plan[p][0]})
    arrays = checkpoints.restore_orbax_leaves(path, {s: leaves[s][0] for s in sources})
    for dst in group:
      srcs, convert = plan[dst]
      want = abstract[dst]
      host = convert(*[arrays[s] for s in srcs])
      if host.shape != tuple(want.shape):
        raise ValueError(f"{path}: {srcs} gives {dst} shape {host.shape}, expected {want.shape}")
      flat[dst] = hf.put(host, dst, want.dtype, mesh)
    del arrays
  tokenizer = None
  for candidate in (os.path.join(path, "tokenizer.model"),
                    os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")):
    if os.path.exists(candidate):
      tokenizer = tokenizer_lib.Tokenizer(candidate)
      break
  return cfg, traverse_util.unflatten_dict(flat, sep="/"), tokenizer


def save(path: str, cfg: model_lib.ModelConfig, params: dict) -> None:
  """Writes `params` in the released layout (flat "transformer/..." keys); used by tests."""
  import orbax.checkpoint as ocp
  flat = {p: np.asarray(jax.device_get(v))
          for p, v in traverse_util.flatten_dict(params, sep="/").items()}
  tree = {"transformer/embedder": {"input_embedding": flat["embedder/input_embedding"]},
          "transformer/final_norm": {"scale": flat["final_norm/scale"]}}
  heads_last = lambda w: np.moveaxis(w, 1, 0)  # (D, N, H) -> (N, D, H)
  for i in range(cfg.num_layers):
    src, dst = f"layer_{i}/", f"transformer/layer_{i}/"
    q, k, v = (flat[src + f"attn/{n}/kernel"] for n in "qkv")
    if cfg.num_kv_heads == cfg.num_heads:
      tree[dst + "attn/qkv_einsum"] = {"w": np.stack([heads_last(q), heads_last(k), heads_last(v)])}
    else:
      tree[dst + "attn/q_einsum"] = {"w": heads_last(q)}
      tree[dst + "attn/kv_einsum"] = {"w": np.stack([heads_last(k), heads_last(v)])}
    tree[dst + "attn/attn_vec_einsum"] = {"w": flat[src + "attn/o/kernel"]}
    gate, up = flat[src + "mlp/gate/kernel"], flat[src + "mlp/up/kernel"]
    gating = np.stack([gate.T, up.T]) if cfg.post_norms else np.stack([gate, up])
    tree[dst + "mlp/gating_einsum"] = {"w": gating}
    tree[dst + "mlp/linear"] = {"w": flat[src + "mlp/down/kernel"]}
    for name in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm", "post_ffw_norm"):
      if src + f"{name}/scale" in flat:
        tree[dst + name] = {"scale": flat[src + f"{name}/scale"]}
    if cfg.qk_norm:
      tree[dst + "attn/_query_norm"] = {"scale": flat[src + "attn/q_norm/scale"]}
      tree[dst + "attn/_key_norm"] = {"scale": flat[src + "attn/k_norm/scale"]}
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree, force=True)

