"""Several processes, one mesh: start-up, who writes, and waiting for one another.

One process runs per host (a TPU VM worker, a GPU node, or a local CPU process in tests); together
their devices form one global mesh. Every process runs the same program on the same data: each
builds every global batch on the host and transfers only the shards its own devices hold
(sharding.put_batch). Files are written by process 0 only (`is_primary`); orbax checkpoints are
written by all processes together. `barrier` is where the others wait for process 0's files.
"""
from __future__ import annotations

import os
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 30) -> None:
  """jax.distributed.initialize; with no arguments the cluster (TPU VM, SLURM, ...) is detected.

  The arguments also come from $JAX_COORDINATOR_ADDRESS, $PERL_JAX_NUM_PROCESSES and
  $PERL_JAX_PROCESS_ID (what launch.multiprocess sets). CPU processes talk over gloo. A process
  that stops sending heartbeats for heartbeat_timeout_s is declared dead, and the others stop.
  """
  env = lambda name: int(os.environ[name]) if os.environ.get(name) else None
  num_processes = num_processes if num_processes is not None else env("PERL_JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env("PERL_JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; else a no-op
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)


def is_primary() -> bool:
  """Whether this process writes files (summaries, logs, TensorBoard, identities): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_first(fn, name: str):
  """fn() on process 0, then on the others once it is done: for work that writes shared files
  (preparing a dataset, recording an identity) that the others then only read."""
  if jax.process_count() == 1:
    return fn()
  if is_primary():
    try:
      out = fn()
    finally:
      barrier(name)
    return out
  barrier(name)
  return fn()


def to_host(tree):
  """numpy copies of device arrays, gathered from every process when a leaf is split across
  processes (a batch-sharded output); fully replicated and local leaves are read directly."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def live_processes(timeout_s: float = 5.0) -> list[int] | None:
  """The process ids the coordination service still sees alive, None when it cannot say (no
  distributed run, or no answer within timeout_s: the coordinator itself may be gone)."""
  from jax._src import distributed as jax_distributed  # the only public-enough handle on it
  client = jax_distributed.global_state.client
  if client is None:
    return None
  answer = []

  def ask():
    try:
      answer.append(sorted(client.get_live_nodes(list(range(jax.process_count())))))
    except Exception:  # the coordinator is gone: there is no one left to ask
      pass

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return answer[0] if answer else None


PEER_LOST = ("gloo", "connection reset", "connection refused", "broken pipe", "unhealthy",
             "heartbeat", "coordination", "unavailable", "socket closed")


def lost_process_message(error: BaseException) -> str | None:
  """One line naming the processes that died when `error` (raised by a failed collective) came
  from a lost peer; None when it looks like an ordinary error of this process."""
  me, count = jax.process_index(), jax.process_count()
  live = live_processes()
  text = str(error).lower()
  if live is not None and len(live) < count:
    lost = ", ".join(str(i) for i in range(count) if i not in live)
    who = f"process(es) {lost} of {count} stopped"
  elif not any(word in text for word in PEER_LOST):
    return None
  elif live is None and me != 0:
    who = f"process 0 of {count} (the coordinator) cannot be reached"
  else:
    who = f"another of the {count} processes stopped"
  reason = " ".join(str(error).split())[:200]
  return (f"process {me}: {who}; this process stops too ({type(error).__name__}: {reason}). "
          f"Rerun the same command to resume from the last complete checkpoint")
