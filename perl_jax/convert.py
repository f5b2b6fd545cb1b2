r"""Checkpoint conversion: released checkpoints in, merged weights and PEFT adapters out.

  # transformers dir / .gguf / GGUF package / Gemma Flax -> a converted dir (orbax; fast to load)
  python -m perl_jax.convert to-orbax --src=/ckpt/gemma-3-1b-pt --out=/ckpt/gemma3-1b \
      --dtype=bfloat16

  # backbone (+ a LoRA adapter merged in) -> transformers safetensors + config.json
  python -m perl_jax.convert to-hf --src=/ckpt/gemma3-1b --adapter=WORKDIR/rl/checkpoints/90/state \
      --lora_alpha=16 --out=/export/gemma3-1b-rl

  # LoRA adapter alone -> PEFT (adapter_model.safetensors + adapter_config.json)
  python -m perl_jax.convert to-peft --adapter=WORKDIR/rl/checkpoints/90/state --lora_alpha=16 \
      --base_model=google/gemma-3-1b-pt --out=/export/gemma3-1b-rl-lora

  # a reward model (LoRA + score head) -> PEFT SEQ_CLS adapter; in transformers:
  # perl_jax.checkpoints.peft.load_reward_model_torch(HF_BASE_DIR, OUT)
  python -m perl_jax.convert to-peft --adapter=WORKDIR/reward/best --lora_alpha=8 --score_head \
      --base_model=google/gemma-3-270m --out=/export/gemma3-270m-rm

--src takes anything `checkpoints.load_checkpoint` does, or an orbax backbone tree (e.g.
WORKDIR/sft/backbone) with --preset naming its architecture. --adapter takes an orbax tree holding
an adapter collection (a saved adapter, or a training checkpoint's `state` item, where
trainable/policy/adapter is used; --adapter_key picks another subtree) or a PEFT dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from flax import traverse_util
import jax
import numpy as np

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import checkpoints
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.checkpoints import hf
from perl_jax.checkpoints import peft

_ADAPTER_KEYS = ("trainable/policy/adapter", "policy/adapter", "adapter", "")


# ----------------------------------------------------------------------------- inputs


def _latest_state(path: str) -> str:
  """A training checkpoint dir (numbered steps) -> its latest step's `state` item."""
  steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
  if steps and os.path.isdir(os.path.join(path, str(max(steps)), "state")):
    return os.path.join(path, str(max(steps)), "state")
  return path


def load_adapter(path: str, key: str | None = None, cfg: model_lib.ModelConfig | None = None
                 ) -> tuple[dict, float | None]:
  """(adapter collection as host arrays, alpha if the source records it) from `path`."""
  if os.path.exists(os.path.join(path, peft.CONFIG)):
    if cfg is None:
      raise ValueError(f"{path} is a PEFT adapter: loading it needs the model (--src)")
    adapter, _, alpha = peft.load(path, cfg)
    return adapter, alpha
  path = _latest_state(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no adapter at {path}")
  leaves = checkpoints.orbax_leaves(path)
  lora_paths = [p for p in leaves if p.endswith(("/lora_a", "/lora_b"))]
  keys = [key] if key is not None else _ADAPTER_KEYS
  for prefix in keys:
    prefix = prefix.strip("/")
    chosen = {p[len(prefix) + 1:] if prefix else p: leaves[p][0] for p in lora_paths
              if not prefix or p.startswith(prefix + "/")}
    if chosen:
      arrays = checkpoints.restore_orbax_leaves(path, chosen)
      # A run's adapter in the scanned layout (model.scan_layers) -> the per-layer one.
      return model_lib.unstack_layers(traverse_util.unflatten_dict(arrays, sep="/")), None
  raise ValueError(f"{path} holds no LoRA factors (lora_a / lora_b) under "
                   f"{' or '.join(repr(k or '<root>') for k in keys)}; its arrays look like "
                   f"{', '.join(list(leaves)[:5])}")


def load_score_head(path: str) -> dict:
  """{"kernel", "bias"} of the reward model's score head in an orbax tree or training state."""
  path = _latest_state(path)
  leaves = checkpoints.orbax_leaves(path)
  heads = sorted(p[:-len("/kernel")] for p in leaves if p.endswith("score_head/kernel"))
  if len(heads) != 1:
    raise ValueError(f"{path} holds {len(heads)} score heads ({heads}): --score_head needs a "
                     "reward model's tree (e.g. WORKDIR/reward/best)")
  arrays = checkpoints.restore_orbax_leaves(
      path, {name: leaves[f"{heads[0]}/{name}"][0] for name in ("kernel", "bias")})
  return {name: np.asarray(a) for name, a in arrays.items()}


def load_backbone(src: str, preset: str | None, dtype: str | None):
  """(cfg, params, tokenizer, hf_config to start an export from) of --src."""
  if preset:  # an orbax params tree with no config beside it
    leaves = checkpoints.orbax_leaves(src)
    vocab = leaves["embedder/input_embedding"][1][0] if "embedder/input_embedding" in leaves \
        else None
    if vocab is None:
      raise ValueError(f"{src} has no embedder/input_embedding: is it a perl_jax backbone tree?")
    cfg = model_lib.model_config(preset, vocab_size=vocab, param_dtype=dtype or "float32")
    abstract = hf.abstract_params(cfg)
    scanned = any(p.startswith(model_lib.SCANNED + "/") for p in leaves)
    if scanned:  # a run's backbone in the scanned layout (model.scan_layers): unstacked below
      scanned_model = model_lib.build(dataclasses.replace(cfg, scan_layers=True))
      abstract = traverse_util.flatten_dict(jax.eval_shape(
          lambda: model_lib.init_variables(scanned_model, jax.random.key(0)))["params"], sep="/")
    expected, found = set(abstract), set(leaves)
    if expected != found:
      raise ValueError(f"{src} does not match preset {preset!r}: missing "
                       f"{sorted(expected - found)[:10]}, "
                       f"unexpected {sorted(found - expected)[:10]}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device) for p, s in abstract.items()},
        sep="/")
    return cfg, model_lib.unstack_layers(checkpoint_lib.load_tree(src, target)), None, None
  cfg, params, tokenizer = checkpoints.load_checkpoint(src, dtype=dtype)
  base = None
  if os.path.isdir(src):
    base = (checkpoints.read_hf_config(src) if os.path.exists(os.path.join(
        src, checkpoints.MODEL_CONFIG)) else _json_or_none(os.path.join(src, "config.json")))
  return cfg, params, tokenizer, base


def _json_or_none(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- commands


def to_orbax(args) -> None:
  cfg, params, tokenizer = checkpoints.load_checkpoint(args.src, dtype=args.dtype)
  base = _json_or_none(os.path.join(args.src, "config.json")) if os.path.isdir(args.src) else None
  checkpoints.save_converted(args.out, cfg, params, tokenizer, base)
  print(f"[convert] {args.src} -> {args.out}: {lora_lib.count_params(params):,} params "
        f"({cfg.param_dtype}), tokenizer: {'yes' if tokenizer else 'none'}")


def to_hf(args) -> None:
  cfg, params, tokenizer, base = load_backbone(args.src, args.preset, args.dtype)
  if args.adapter:
    adapter, alpha = load_adapter(args.adapter, args.adapter_key, cfg)
    alpha = args.lora_alpha if args.lora_alpha is not None else alpha
    if alpha is None:
      raise ValueError("--lora_alpha is required with an orbax adapter (scale = alpha / rank, "
                       "as in training: config.lora.alpha, or the rank when that is 0)")
    ranks = {a.shape[-1] for a, _ in peft.lora_projections(adapter).values()}
    if len(ranks) != 1:
      raise ValueError(f"adapter has several ranks {sorted(ranks)}")
    params = lora_lib.merge_adapters(params, adapter, alpha / ranks.pop())
  if args.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(args.tokenizer)
  hf.save(args.out, cfg, params, tokenizer=tokenizer, base_config=base, dtype=args.dtype,
          max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
  print(f"[convert] wrote {hf.architecture_of(cfg)} checkpoint to {args.out}"
        + (f" with adapter {args.adapter} merged" if args.adapter else ""))


def to_peft(args) -> None:
  adapter, alpha = load_adapter(args.adapter, args.adapter_key)
  alpha = args.lora_alpha if args.lora_alpha is not None else alpha
  if alpha is None:
    raise ValueError("--lora_alpha is required (scale = alpha / rank, as in training)")
  score_head = load_score_head(args.adapter) if args.score_head else None
  config = peft.save(args.out, adapter, alpha, base_model=args.base_model, score_head=score_head)
  print(f"[convert] wrote PEFT LoRA r={config['r']} alpha={config['lora_alpha']} on "
        f"{config['target_modules']}{' + score head (SEQ_CLS)' if score_head else ''} to "
        f"{args.out}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m perl_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("to-orbax", aliases=["hf-to-orbax"],
                          help="any supported checkpoint -> a perl_jax converted dir")
  p.add_argument("--src", required=True, help="transformers dir, .gguf, GGUF package, Gemma Flax")
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default="float32", help="backbone storage dtype, e.g. bfloat16")
  p.set_defaults(run=to_orbax)
  p = commands.add_parser("to-hf", help="backbone (+ merged adapter) -> transformers safetensors")
  p.add_argument("--src", required=True, help="converted dir, transformers dir, .gguf, or an "
                 "orbax backbone tree with --preset")
  p.add_argument("--preset", default=None, help="model.PRESETS name for a bare backbone tree")
  p.add_argument("--adapter", default=None, help="orbax adapter tree / training state, or PEFT dir")
  p.add_argument("--adapter_key", default=None, help="subtree of --adapter holding the adapter")
  p.add_argument("--lora_alpha", type=float, default=None)
  p.add_argument("--dtype", default=None, help="dtype of the written weights (default: as loaded)")
  p.add_argument("--tokenizer", default=None, help="sentencepiece .model to ship (default: the "
                 "source's)")
  p.add_argument("--max_shard_gb", type=float, default=4.0)
  p.add_argument("--out", required=True)
  p.set_defaults(run=to_hf)
  p = commands.add_parser("to-peft", help="LoRA adapter -> PEFT adapter dir")
  p.add_argument("--adapter", required=True)
  p.add_argument("--adapter_key", default=None)
  p.add_argument("--lora_alpha", type=float, default=None)
  p.add_argument("--base_model", default="", help="base_model_name_or_path for PEFT")
  p.add_argument("--score_head", action="store_true", help="a reward model: also write its "
                 "score head (task SEQ_CLS; load with perl_jax.checkpoints.peft."
                 "load_reward_model_torch)")
  p.add_argument("--out", required=True)
  p.set_defaults(run=to_peft)
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except (ValueError, KeyError, FileNotFoundError, NotImplementedError, ImportError) as e:
    sys.exit(f"[convert] error: {e}")


if __name__ == "__main__":
  main()
