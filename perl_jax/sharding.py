"""Device meshes and shardings.

The mesh has up to three axes, ("data", "fsdp", "tensor"); their sizes come from the config and -1
takes the remaining devices. Batches are split over data x fsdp.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: dict | None = None, devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axis sizes from `shape` ({"data": -1, ...})."""
  devices = jax.devices() if devices is None else devices
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {AXES}")
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a batch on the mesh, split over the batch axes: host arrays are copied in, device
  arrays (an RL rollout) are resharded on device if they are not split that way already."""
  div = batch_divisor(mesh)
  for name, value in batch.items():
    if value.shape[0] % div:
      raise ValueError(f"batch field {name!r} has {value.shape[0]} rows, not divisible by the "
                       f"{div} data-parallel devices of the mesh")
  return put(batch, batch_sharding(mesh))


def put(tree, shardings):
  """jax.device_put(tree, shardings) that also works when the shardings span several processes:
  a leaf already on the global mesh is resharded on device; a host value or a leaf on this
  process's devices (every process holds the same value) gives each device its shard."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(_put_global, tree, shardings)


def _put_global(leaf, sharding):
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return jax.device_put(leaf, sharding)
  with jax.transfer_guard("allow"):  # an explicit transfer, as device_put is
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      data = _put_global(jax.random.key_data(leaf), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    value = np.asarray(jax.device_get(leaf))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ----------------------------------------------------------------------------- parameter rules

# Ordered (regex over the leaf path, logical axes per dimension); the first match wins, and a
# leaf no rule matches is an error. Optimizer states reuse their parameter's rule (their paths
# end with the parameter's path). LoRA factors are small: only their large side is sharded.
PARAM_RULES = (
    (r"embedder/input_embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"embedder/scale$", ("vocab", "embed")),  # a quantised output embedding's scales
    (r"lm_head/scale$", ("embed", "vocab")),
    (r"attn/(q|k|v)/kernel$", ("embed", "heads", None)),
    (r"attn/o/kernel$", ("heads", None, "embed")),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
    (r"attn/(q|k|v)/lora_a$", ("embed", None)),
    (r"attn/(q|k|v)/lora_b$", (None, "heads", None)),
    (r"attn/o/lora_a$", ("heads", None, None)),
    (r"attn/o/lora_b$", (None, "embed")),
    (r"mlp/(gate|up)/lora_a$", ("embed", None)),
    (r"mlp/(gate|up)/lora_b$", (None, "mlp")),
    (r"mlp/down/lora_a$", ("mlp", None)),
    (r"mlp/down/lora_b$", (None, "embed")),
    # Scales of quantised kernels (perl_jax.quant) have their kernel's rank and sharding.
    (r"attn/(q|k|v)/(scale|high|offset)$", ("embed", "heads", None)),
    (r"attn/o/(scale|high|offset)$", ("heads", None, "embed")),
    (r"mlp/(gate|up)/(scale|high|offset)$", ("embed", "mlp")),
    (r"mlp/down/(scale|high|offset)$", ("mlp", "embed")),
    (r"(scale|score_head/kernel|score_head/bias)$", None),  # small: replicated
    (r"(^|/)(count|step|mu|nu)$|^step$", None),  # optimizer counters and scalars
)

# Logical axis -> mesh axes (the t5x-style table); batch goes over data x fsdp.
LOGICAL_TO_MESH = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "mlp": "tensor"}


def spec_for(path: str, shape: tuple, mesh: Mesh, rules=PARAM_RULES,
             logical_to_mesh=LOGICAL_TO_MESH) -> P:
  """PartitionSpec of one leaf; a dimension the mesh axis does not divide stays unsharded.

  Leaves of scanned layers (`layers/...`, model.scan_layers) have a leading layer axis: it stays
  unsharded and the rest follows the per-layer rule."""
  if len(shape) == 0:
    return P()
  if re.search(r"(^|/)layers/", path):
    return P(None, *spec_for(re.sub(r"(^|/)layers/", r"\1", path), shape[1:], mesh, rules,
                             logical_to_mesh))
  for pattern, logical in rules:
    if re.search(pattern, path):
      if logical is None:
        return P()
      if len(logical) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {len(logical)} axes for {path} of "
                         f"shape {shape}")
      axes = []
      for dim, name in zip(shape, logical):
        mesh_axis = logical_to_mesh.get(name) if name else None
        if mesh_axis and mesh.shape[mesh_axis] > 1 and dim % mesh.shape[mesh_axis] == 0:
          axes.append(mesh_axis)
        else:
          axes.append(None)
      return P(*axes)
  raise ValueError(f"no sharding rule matches parameter {path} (shape {shape}); add one to "
                   f"perl_jax.sharding.PARAM_RULES")


def tree_shardings(tree, mesh: Mesh):
  """NamedSharding for every leaf of a params / train-state tree, by PARAM_RULES.

  A leaf's path is its keys joined by "/" (dict keys, optimizer-state field names and tuple
  indices alike: "opt_state/1/0/mu/adapter/layer_0/attn/q/lora_a"), the form the rules match."""
  path_of = lambda keys: jax.tree_util.keystr(keys, simple=True, separator="/")
  return jax.tree_util.tree_map_with_path(
      lambda keys, leaf: NamedSharding(mesh, spec_for(path_of(keys), tuple(leaf.shape), mesh)),
      tree)
