"""Device meshes and shardings.

The mesh has up to three axes, ("data", "fsdp", "tensor"); their sizes come from the config and -1
takes the remaining devices. Batches are split over data x fsdp.
"""
from __future__ import annotations

import math

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
  """Places a host batch on the mesh, split over the batch axes."""
  div = batch_divisor(mesh)
  for name, value in batch.items():
    if value.shape[0] % div:
      raise ValueError(f"batch field {name!r} has {value.shape[0]} rows, not divisible by the "
                       f"{div} data-parallel devices of the mesh")
  return jax.device_put(batch, batch_sharding(mesh))
