"""LoRA: low-rank adapters on frozen projections, and helpers over adapter trees.

A projection contracts the trailing `in_shape` axes of its input with a frozen kernel of shape
`in_shape + out_shape`. With an adapter it computes

    y = x W + (alpha / rank) * dropout(x) A B,      A: in_shape + (rank,),  B: (rank,) + out_shape

The frozen kernel lives in the `params` collection under the same path as without LoRA; A and B live
in the `adapter` collection (`.../lora_a`, `.../lora_b`), so one backbone can be applied with any
adapter set, or with none (the anchor). `lora_b` starts at zero, so a fresh adapter is the identity.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTER = "adapter"  # variable collection holding every trainable role-specific leaf
BACKBONE = "params"  # variable collection holding the frozen backbone


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


def _contract(x, kernel, n_in: int):
  """Contracts the last n_in axes of x with the first n_in axes of kernel."""
  return jax.lax.dot_general(
      x, kernel, (((tuple(range(x.ndim - n_in, x.ndim))), tuple(range(n_in))), ((), ())))


class LoRAProjection(nn.Module):
  """A frozen linear projection `in_shape -> out_shape` with an optional LoRA adapter."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  lora: LoRASpec | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    n_in = len(self.in_shape)
    fan_in = math.prod(self.in_shape)
    init = lambda rng, shape, dtype: self.kernel_init(rng, (fan_in, math.prod(self.out_shape)),
                                                      dtype).reshape(shape)
    kernel = self.param("kernel", init, self.in_shape + self.out_shape, self.param_dtype)
    y = _contract(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    if self.lora is None:
      return y
    spec = self.lora
    if self.is_initializing() or self.has_variable(ADAPTER, "lora_a"):
      a_init = lambda rng: nn.initializers.kaiming_uniform()(
          rng, (fan_in, spec.rank), spec.dtype).reshape(self.in_shape + (spec.rank,))
      lora_a = self.variable(ADAPTER, "lora_a", a_init, self.make_rng("params")
                             if self.is_initializing() else None).value
      lora_b = self.variable(ADAPTER, "lora_b", jnp.zeros, (spec.rank,) + self.out_shape,
                             spec.dtype).value
      h = x.astype(spec.dtype)
      if spec.dropout > 0.0:
        h = nn.Dropout(spec.dropout)(h, deterministic=deterministic)
      delta = _contract(_contract(h, lora_a, n_in), lora_b, 1)
      y = y + (spec.scale * delta).astype(y.dtype)
    return y


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


def flatten(tree) -> dict[str, Any]:
  """A nested dict as {"a/b/c": leaf}."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


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
  flat_backbone = flatten(backbone)
  flat_adapter = flatten(adapter)
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
    delta = _contract(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), 1)
    assert delta.shape == kernel.shape, (prefix, delta.shape, kernel.shape)
    merged[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return unflatten(merged)


def without_lora(adapter: dict) -> dict:
  """The adapter tree minus its LoRA leaves (keeps heads), e.g. after merging."""
  return unflatten({p: v for p, v in flatten(adapter).items()
                    if not p.endswith(("/lora_a", "/lora_b"))})


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree
