"""orbax checkpoints of the training state: what is trained, never the frozen backbone.

Each checkpoint holds `state` (step, trainable leaves, optimizer state) and `meta` (JSON: the data
position, the base model's identity, anything else a stage wants to find again).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    """Restores onto the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self):
    self.manager.close()


def load_state(directory: str, abstract_state: Any) -> tuple[Any, dict]:
  """The latest state saved in `directory` (e.g. a finished stage's workdir)."""
  ckpt = Checkpointer(directory)
  try:
    return ckpt.restore(abstract_state)
  finally:
    ckpt.close()


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
