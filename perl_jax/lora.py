"""LoRA: low-rank adapters on frozen projections, and helpers over adapter trees.

A projection contracts the trailing `in_shape` axes of its input with a frozen kernel of shape
`in_shape + out_shape`. With an adapter it computes

    y = x W + (alpha / rank) * dropout(x) A B,      A: in_shape + (rank,),  B: (rank,) + out_shape

The frozen kernel lives in the `params` collection under the same path as without LoRA; A and B live
in the `adapter` collection (`.../lora_a`, `.../lora_b`), so one backbone can be applied with any
adapter set, or with none (the anchor). `lora_b` starts at zero, so a fresh adapter is the identity.

An adapter set must fit its model exactly: applied with an adapter collection, a model raises if a
targeted projection's A/B is missing or misshapen, or if the collection holds leaves for anything
else than its targets and the score head (`check_adapter_targets`; `check_adapter_tree` compares a
loaded tree with the expected shapes). Only an absent collection means "adapters off".
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from perl_jax import quant

ADAPTER = "adapter"  # variable collection holding every trainable role-specific leaf


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Adapter settings for one projection."""
  rank: int
  alpha: float
  dropout: float = 0.0
  dtype: Any = jnp.float32  # adapters may be f32 on a bf16 backbone

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _contract(x, kernel, n_in: int, matmul=jnp.matmul):
  """Contracts the last n_in axes of x with the first n_in axes of kernel, as one 2-D matmul
  (multi-axis contractions made XLA:CPU copy the q/o kernels into transposed layouts)."""
  fan_in = math.prod(kernel.shape[:n_in])
  y = matmul(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1))
  return y.reshape(x.shape[:x.ndim - n_in] + kernel.shape[n_in:])


def project(x, kernel, n_in: int):
  """x's trailing n_in axes contracted with the kernel's leading ones, in x's dtype. Below
  float32 the products are accumulated and returned in float32, then rounded once, in the
  backward pass too (_matmul_rounded): XLA:CPU has a bf16 x bf16 -> f32 kernel (AVX512-BF16)
  about 2x faster than its f32 one, but none for a bf16 result or for JAX's default transpose,
  which would multiply the f32 cotangent by the bf16 kernel in f32."""
  if jnp.dtype(x.dtype) == jnp.float32:
    return _contract(x, kernel, n_in)
  return _contract(x, kernel, n_in, _matmul_rounded)


def _dot_f32(a, b, contract=(1, 0)):
  """a @ b over a's axis contract[0] and b's axis contract[1], accumulated in f32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_rounded(x, kernel):
  """x [N, in] @ kernel [in, out] accumulated in f32, rounded to x's dtype."""
  return _dot_f32(x, kernel).astype(x.dtype)


def _matmul_rounded_fwd(x, kernel):
  return _matmul_rounded(x, kernel), (x, kernel)


def _matmul_rounded_bwd(res, g):
  x, kernel = res
  g = g.astype(kernel.dtype)
  # The kernel's gradient: XLA drops it when the kernel is frozen (LoRA), as it is unused.
  return (_dot_f32(g, kernel, (1, 1)).astype(x.dtype),
          _dot_f32(x, g, (0, 0)).astype(kernel.dtype))


_matmul_rounded.defvjp(_matmul_rounded_fwd, _matmul_rounded_bwd)


@jax.custom_vjp
def _low_rank(h, a, b):
  """h [N, in] @ a [in, r] @ b [r, out], with a backward pass that contracts over the N rows of
  the large operands in place (see _low_rank_bwd)."""
  return (h @ a) @ b


def _low_rank_fwd(h, a, b):
  u = h @ a
  return u @ b, (h, a, b, u)


def _low_rank_bwd(res, g):
  # JAX's own transpose of `u @ b` asks for dB^T = g^T u, and XLA:CPU then copies all of g
  # ([N, out], 8 MiB per projection of a 270M reward step) into transposed layout; likewise
  # h^T for dA. Written as (small)^T @ (large) the large operands stay as they are and only
  # the [N, rank] factors are transposed: the same sums, ~10% less time per LoRA step there.
  h, a, b, u = res
  du = g @ b.T
  return ((du @ a.T).astype(h.dtype), (du.T @ h).T.astype(a.dtype),
          (u.T @ g).astype(b.dtype))


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def low_rank_delta(h, lora_a, lora_b, n_in: int):
  """h's trailing n_in axes contracted with A, then B: the adapter's update before scaling."""
  fan_in = math.prod(lora_a.shape[:-1])
  out = _low_rank(h.reshape(-1, fan_in), lora_a.reshape(fan_in, -1),
                  lora_b.reshape(lora_b.shape[0], -1))
  return out.reshape(h.shape[:h.ndim - n_in] + lora_b.shape[1:])


class LoRAProjection(nn.Module):
  """A frozen linear projection `in_shape -> out_shape` with an optional LoRA adapter.

  With `lora` set, applying it without its `lora_a`/`lora_b` (or with other shapes) raises: build
  it with lora=None for the bare projection."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  lora: LoRASpec | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  # "" (a float kernel in param_dtype) or a perl_jax.quant format: the kernel is then stored as
  # codes + `scale` and dequantised here, inside the matmul. Such a model is initialised through
  # its float twin (model.init_variables), so the zeros below are never used as weights.
  weight_format: str = ""

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    n_in = len(self.in_shape)
    fan_in = math.prod(self.in_shape)
    shape = self.in_shape + self.out_shape
    if self.weight_format == "gguf":
      # The leaves' shapes depend on the file's block types (quant module docstring): read
      # what is there; initialisation makes quantize_gguf's layout.
      if self.is_initializing():
        leaves = {name: self.param(name, nn.initializers.zeros, leaf_shape, jnp.float32
                                   if name == "scale" else jnp.uint8)
                  for name, leaf_shape in quant.gguf_shapes(shape, n_in).items()}
      else:
        leaves = {name: self.get_variable("params", name)
                  for name in ("kernel", "high", "scale", "offset")
                  if self.has_variable("params", name)}
      kernel = quant.dequantize_gguf(leaves, n_in, self.dtype)
    elif self.weight_format:
      codes_shape, scale_shape = quant.stored_shapes(shape, self.weight_format, n_in)
      codes = self.param("kernel", nn.initializers.zeros, codes_shape,
                         quant.CODE_DTYPES[self.weight_format])
      scale = None if scale_shape is None else self.param(  # bf16_bits has no scale
          "scale", nn.initializers.zeros, scale_shape, quant.SCALE_DTYPES[self.weight_format])
      kernel = quant.dequantize(codes, scale, self.weight_format, n_in, self.dtype)
    else:
      init = lambda rng, shape, dtype: self.kernel_init(
          rng, (fan_in, math.prod(self.out_shape)), dtype).reshape(shape)
      kernel = self.param("kernel", init, shape, self.param_dtype)
    y = project(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    if self.lora is None:
      return y
    spec = self.lora
    if not self.is_initializing() and not (self.has_variable(ADAPTER, "lora_a")
                                           and self.has_variable(ADAPTER, "lora_b")):
      here = sorted(self.variables.get(ADAPTER, {}))
      raise ValueError(
          f"LoRA projection {_path(self)} has no adapter (needs {_path(self)}/lora_a and "
          f"lora_b; the adapter collection holds {here or 'nothing'} here). A mis-keyed adapter "
          f"tree never runs as the bare backbone: build the projection with lora=None for that "
          f"(Transformer does so when applied without an adapter collection)")
    a_init = lambda rng: nn.initializers.kaiming_uniform()(
        rng, (fan_in, spec.rank), spec.dtype).reshape(self.in_shape + (spec.rank,))
    lora_a = self.variable(ADAPTER, "lora_a", a_init, self.make_rng("params")
                           if self.is_initializing() else None).value
    lora_b = self.variable(ADAPTER, "lora_b", jnp.zeros, (spec.rank,) + self.out_shape,
                           spec.dtype).value
    want_a, want_b = self.in_shape + (spec.rank,), (spec.rank,) + self.out_shape
    if lora_a.shape != want_a or lora_b.shape != want_b:
      raise ValueError(
          f"adapter of LoRA projection {_path(self)} has lora_a {tuple(lora_a.shape)} and lora_b "
          f"{tuple(lora_b.shape)}; this model (rank {spec.rank}) expects {want_a} and {want_b}: "
          f"an adapter of another rank or shape?")
    h = x.astype(spec.dtype)
    if spec.dropout > 0.0:
      h = nn.Dropout(spec.dropout)(h, deterministic=deterministic)
    delta = low_rank_delta(h, lora_a, lora_b, n_in)
    y = y + (spec.scale * delta).astype(y.dtype)
    return y


def _path(module: nn.Module) -> str:
  return "/".join(module.scope.path) or type(module).__name__


# ----------------------------------------------------------------------------- target selection


def select_targets(projections: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                   patterns: Sequence[str], rank: int) -> set[str]:
  """Returns the projection paths that get adapters; raises on a useless pattern or a bad rank.

  Args:
    projections: path ("layer_0/attn/q") -> (in_shape, out_shape) for every adaptable projection.
    patterns: regular expressions searched in each path; every one must match something.
    rank: LoRA rank; 0 means no adapters (full fine-tuning) and selects nothing.
  """
  if rank < 0:
    raise ValueError(f"lora.rank must be >= 0, got {rank}")
  if rank == 0:
    return set()
  if isinstance(patterns, str):
    patterns = (patterns,)
  if not patterns:
    raise ValueError("lora.targets is empty: name at least one projection pattern, or set "
                     "lora.rank=0 for full fine-tuning")
  chosen = set()
  for pattern in patterns:
    matched = {p for p in projections if re.search(pattern, p)}
    if not matched:
      examples = ", ".join(sorted(projections)[:8])
      raise ValueError(f"lora.targets pattern {pattern!r} matches no projection; "
                       f"projection paths look like: {examples}, ...")
    chosen |= matched
  for path in sorted(chosen):
    in_shape, out_shape = projections[path]
    limit = min(math.prod(in_shape), math.prod(out_shape))
    if rank > limit:
      raise ValueError(f"lora.rank={rank} is larger than min(in, out)={limit} of projection "
                       f"{path} (in={math.prod(in_shape)}, out={math.prod(out_shape)})")
  return chosen


# ----------------------------------------------------------------------------- adapter trees


# perl_jax names a leaf by its "/"-joined path ("layer_0/attn/q/lora_a"), which is
# traverse_util.flatten_dict(tree, sep="/"); code calls that directly. These two aliases remain
# for the tests that still use them (tests/test_checkpoints_hf.py, tests/test_rl.py).
def flatten(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


HEADS = ("score_head",)  # modules whose leaves sit in the adapter collection beside the LoRA A/B


def _show(items: Sequence[str], limit: int = 6) -> str:
  return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _near(tree, path: str) -> str:
  """What `tree` holds at the deepest existing prefix of `path`, e.g. "layer_0/attn: [k, v]"."""
  node, found = tree, []
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      break
    node, found = node[part], found + [part]
  keys = sorted(map(str, node)) if isinstance(node, Mapping) else []
  return f"{'/'.join(found) or '(top)'}: [{_show(keys, 12)}]"


def _layout_hint(model_paths, tree_paths) -> str:
  """A sentence when one side is in the per-layer layout (layer_i/...) and the other stacked."""
  layered = lambda ps: any(re.match(r"layer_\d+(/|$)", p) for p in ps)
  stacked = lambda ps: any(p == "layers" or p.startswith("layers/") for p in ps)
  if stacked(model_paths) and layered(tree_paths) and not stacked(tree_paths):
    return (" The tree has the per-layer layout (layer_i/...) and the model scans its layers "
            "(model.scan_layers=True): convert it with model.stack_layers.")
  if layered(model_paths) and stacked(tree_paths) and not layered(tree_paths):
    return (" The tree has the scanned layout (layers/...) and the model does not scan its "
            "layers: convert it with model.unstack_layers.")
  return ""


def check_adapter_targets(adapter, targets, heads: Sequence[str] = HEADS) -> None:
  """Raises unless `adapter` (an applied model's adapter collection) holds `lora_a` and `lora_b`
  for every target path, and no LoRA leaf or other leaf outside the targets and `heads`.

  Cheap (tree structure only): a model runs it at trace time whenever it is applied with an
  adapter collection, so a tree for other targets, another layout or misspelled keys fails
  loudly instead of running (in part) as the bare backbone.
  """
  flat = traverse_util.flatten_dict(adapter, sep="/")
  targets = set(targets)
  missing = sorted(t for t in targets if f"{t}/lora_a" not in flat or f"{t}/lora_b" not in flat)
  extra = sorted(p for p in flat
                 if not (p.endswith(("/lora_a", "/lora_b")) and p.rsplit("/", 1)[0] in targets)
                 and p.split("/", 1)[0] not in heads)
  if not missing and not extra:
    return
  problems = []
  if missing:
    problems.append(f"no lora_a/lora_b for targeted projection(s) {_show(missing)} (near "
                    f"{missing[0]} the adapter holds {_near(adapter, missing[0])})")
  if extra:
    problems.append(f"leaves for projections this model does not target: {_show(extra)}")
  hint = _layout_hint(targets, flat) or (
      f" The model targets {len(targets)} projection(s): config.lora.targets, lora.rank and "
      f"model.scan_layers must match those of the run that made the adapter (for the bare "
      f"backbone, apply the model with no adapter collection).")
  raise ValueError("adapter tree does not fit the model: " + "; ".join(problems) + "." + hint)


def check_adapter_tree(expected, adapter, what: str = "adapter") -> None:
  """Raises unless `adapter` has exactly `expected`'s leaf paths and shapes.

  For adapters loaded from elsewhere (a checkpoint, an SFT run, a PEFT export), before use;
  `expected` is the model's abstract adapter, e.g.
  `roles.abstract_variables(model, score_head)["adapter"]` (arrays or ShapeDtypeStructs).
  """
  want, got = (traverse_util.flatten_dict(t, sep="/") for t in (expected, adapter))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shapes = sorted(f"{p} {tuple(got[p].shape)} (expected {tuple(want[p].shape)})"
                  for p in set(want) & set(got) if tuple(got[p].shape) != tuple(want[p].shape))
  if not (missing or extra or shapes):
    return
  problems = ([f"missing {_show(missing)}"] if missing else []) + (
      [f"unexpected {_show(extra)}"] if extra else []) + (
      [f"wrong shapes: {_show(shapes)}"] if shapes else [])
  raise ValueError(f"{what} does not fit the model: " + "; ".join(problems) + "."
                   + _layout_hint(want, got))


_CODES = ("kernel", "input_embedding")  # leaves that hold a quantised table's codes


def count_params(tree) -> int:
  """Number of weights in a tree of arrays or ShapeDtypeStructs. A quantised kernel or table
  (perl_jax.quant: integer codes with a `scale` beside them) counts the weights it stands for:
  two per uint8 (NF4 and gguf pack two codes, or their low bits, in a byte); its scales,
  offsets and high bits count none."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = path[-1].key if path and hasattr(path[-1], "key") else ""
    if name in _CODES and jnp.dtype(x.dtype) == jnp.uint8:
      total += 2 * math.prod(x.shape)
    elif not (name in ("scale", "high", "offset") and _beside_quantized_kernel(tree, path)):
      total += math.prod(x.shape)
  return total


def _beside_quantized_kernel(tree, path) -> bool:
  parent = tree
  for key in path[:-1]:
    parent = parent[key.key if hasattr(key, "key") else key.idx]
  if not isinstance(parent, Mapping):
    return False
  codes = [parent[name] for name in _CODES if name in parent]
  return bool(codes) and jnp.dtype(codes[0].dtype) in (jnp.int8, jnp.uint8)


def split_variables(variables: dict, full_finetune: bool) -> tuple[dict, dict]:
  """Splits model variables into (trainable, frozen).

  With adapters only the `adapter` collection (LoRA A/B and heads) is trainable and the backbone
  is frozen. For full fine-tuning everything is trainable.
  """
  if full_finetune:
    return dict(variables), {}
  trainable = {k: v for k, v in variables.items() if k == ADAPTER}
  frozen = {k: v for k, v in variables.items() if k != ADAPTER}
  return trainable, frozen


def merge_adapters(backbone: dict, adapter: dict, scale: float) -> dict:
  """Folds LoRA deltas into the backbone kernels: W' = W + scale * A B (for export/inference).

  Args:
    backbone: the `params` collection.
    adapter: the `adapter` collection (heads in it are ignored).
    scale: alpha / rank used in training.
  Returns:
    A new `params` tree; apply it without the adapter's LoRA leaves.
  """
  flat_backbone = traverse_util.flatten_dict(backbone, sep="/")
  flat_adapter = traverse_util.flatten_dict(adapter, sep="/")
  merged = dict(flat_backbone)
  for path, lora_a in flat_adapter.items():
    if not path.endswith("/lora_a"):
      continue
    prefix = path[: -len("/lora_a")]
    lora_b = flat_adapter[prefix + "/lora_b"]
    kernel_path = prefix + "/kernel"
    if kernel_path not in flat_backbone:
      raise KeyError(f"adapter {prefix} has no backbone kernel {kernel_path}")
    kernel = flat_backbone[kernel_path]
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
      raise ValueError(f"{kernel_path} is stored as {kernel.dtype} codes (model.weight_dtype "
                       f"int8/nf4/gguf/bf16_bits): merge adapters into the float backbone")
    delta = _contract(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), 1)
    assert delta.shape == kernel.shape, (prefix, delta.shape, kernel.shape)
    merged[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged, sep="/")
