"""orbax checkpoints: the resumable training state, and single finished trees.

`Checkpointer` keeps the training state of a running stage: each checkpoint holds `state` (step,
trainable leaves, optimizer state; frozen leaves are never saved there) and `meta` (JSON: the
data position, the base model's identity, anything else a stage wants to find again).

`save_tree` / `load_tree` write and read one pytree: a finished stage's result (the reward
stage's best adapter, the SFT stage's fine-tuned backbone) or a converted checkpoint's backbone.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from perl_jax import errors


class Checkpointer:

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of `abstract_state`.

    Without `step`, the latest readable checkpoint: one that fails to restore (cut by a kill or
    a full disk) is moved to DIRECTORY.corrupt/ with a warning and the previous one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              meta=ocp.args.JsonRestore())
    if step is not None:
      restored = self.manager.restore(step, args=args)
      return restored["state"], restored["meta"]
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    for candidate in steps:
      try:
        restored = self.manager.restore(candidate, args=args)
        return restored["state"], restored["meta"]
      except Exception as e:  # orbax raises many kinds for a damaged step
        reason = " ".join(str(e).split())[:200]
        moved = self._set_aside(candidate)
        print(f"WARNING: checkpoint step {candidate} in {self.directory} cannot be read "
              f"({type(e).__name__}: {reason}); moved to {moved}, trying the previous one",
              flush=True)
    raise errors.WorkdirMismatch(f"no readable checkpoint in {self.directory} (steps {steps} "
                                 f"were damaged and moved to {self.directory}.corrupt)")

  def _set_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()


def save_tree(path: str, tree: Any) -> None:
  """A single pytree (e.g. a finished stage's backbone or best adapter) at `path`."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree, force=True)


def load_tree(path: str, abstract_tree: Any) -> Any:
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no saved tree at {path}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)
