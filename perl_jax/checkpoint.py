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

    Without `step`, the latest readable checkpoint: when the latest fails to restore (cut by a
    kill or a full disk) and an older one restores, the newer ones are moved to
    DIRECTORY.corrupt/ with a warning. When none restores (e.g. another LoRA rank), nothing is
    moved and the error says so.
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
    failures = []
    for candidate in steps:
      try:
        restored = self.manager.restore(candidate, args=args)
      except Exception as e:  # orbax raises many kinds for a damaged step
        failures.append((candidate, e))
        continue
      # An older step restores, so the newer ones are damaged (not the wrong shape for this run):
      # set them aside, so that the run goes on from here and overwrites nothing it needs.
      for step, e in failures:
        reason = " ".join(str(e).split())[:200]
        moved = self._set_aside(step)
        print(f"WARNING: checkpoint step {step} in {self.directory} cannot be read "
              f"({type(e).__name__}: {reason}); moved to {moved}, resuming from step "
              f"{candidate}", flush=True)
      return restored["state"], restored["meta"]
    reason = " ".join(str(failures[0][1]).split())[:300]
    raise errors.WorkdirMismatch(
        f"no checkpoint in {self.directory} restores onto this run's state (steps {steps}; "
        f"latest: {type(failures[0][1]).__name__}: {reason}): a different model, LoRA or "
        f"algorithm setting, or damaged files; nothing was moved. Use a new --workdir")

  def _set_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
    if jax.process_index() == 0:  # one process moves it (the directory may be shared)
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
