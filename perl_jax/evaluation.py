"""Held-out evaluation in batches, shared by the stages: every row exactly once (the last batch
padded with copies of its last row, which are then dropped), with progress lines."""
from __future__ import annotations

from typing import Callable

import numpy as np

from perl_jax import distributed
from perl_jax import sharding as sharding_lib
from perl_jax.progress import Progress


def per_row(fn: Callable[[dict], dict], arrays: dict, batch_size: int, mesh, name: str) -> dict:
  """{key: [N, ...]} of `fn(batch)` (a dict of per-row device arrays) over all N rows of
  `arrays`, batch by batch on `mesh`."""
  n = len(next(iter(arrays.values())))
  progress = Progress(name, "evaluating", n, "rows")
  outputs = []
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    real = len(next(iter(batch.values())))
    if real < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - real, 0)])
               for k, v in batch.items()}
    out = distributed.to_host(fn(sharding_lib.put_batch(batch, mesh)))
    outputs.append({k: np.asarray(v)[:real] for k, v in out.items()})
    progress.update(start + real)
  return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
