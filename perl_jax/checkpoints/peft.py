"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

PEFT computes y = x W^T + (lora_alpha / r) * x A^T B^T with A = `lora_A.weight` (r, in) and
B = `lora_B.weight` (out, r); perl_jax's factors are `lora_a` in_shape + (r,) and `lora_b`
(r,) + out_shape with the same alpha / r scale, so each is a reshape and a transpose:

    adapter/layer_0/attn/q/lora_a (d, r)
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r, d)
    adapter/layer_0/attn/q/lora_b (r, heads, hd)
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (heads * hd, r)

A reward model's scalar head exports as PEFT's SEQ_CLS classifier, in `modules_to_save`:

    adapter/score_head/kernel (d, 1), bias (1,)
        <->  base_model.model.score.weight (1, d), base_model.model.score.bias (1,)

transformers' `*ForSequenceClassification.score` has no bias, so the bias is kept by giving the
base model a biased score layer before the adapter loads (see `load_reward_model_torch`); both
read the score at the last non-padding token. Value heads are not exported.
"""
from __future__ import annotations

import json
import math
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import common
from perl_jax import model as model_lib
from perl_jax.checkpoints import hf

_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def lora_projections(adapter: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """projection path ("layer_0/attn/q") -> (lora_a, lora_b) of an adapter collection."""
  flat = traverse_util.flatten_dict(adapter, sep="/")
  out = {}
  for path, lora_a in flat.items():
    if path.endswith("/lora_a"):
      prefix = path[:-len("/lora_a")]
      if prefix + "/lora_b" not in flat:
        raise KeyError(f"adapter {prefix} has lora_a but no lora_b")
      out[prefix] = (lora_a, flat[prefix + "/lora_b"])
  return out


def save(directory: str, adapter: dict, alpha: float, base_model: str = "",
         dropout: float = 0.0, score_head: dict | None = None) -> dict:
  """Writes the LoRA factors of `adapter` for PEFT; returns the adapter_config written.

  Args:
    adapter: the `adapter` collection (LoRA leaves; heads are skipped).
    alpha: LoRA alpha used in training (the scale is alpha / rank, as in PEFT).
    base_model: `base_model_name_or_path` for PEFT (the HF id or dir of the same backbone).
    score_head: a reward model's {"kernel" (d, 1), "bias" (1,)}: written as the SEQ_CLS
      `score` layer (task_type "SEQ_CLS", modules_to_save ["score"]).
  """
  from safetensors.numpy import save_file
  projections = lora_projections(adapter)
  if not projections:
    raise ValueError("the adapter has no LoRA factors (lora_a / lora_b) to export")
  tensors, ranks, modules = {}, set(), []
  for path, (lora_a, lora_b) in sorted(projections.items()):
    lora_a, lora_b = (np.asarray(jax.device_get(x), np.float32) for x in (lora_a, lora_b))
    rank = lora_a.shape[-1]
    ranks.add(rank)
    module = _PREFIX + hf.hf_module(path)
    tensors[module + ".lora_A.weight"] = np.ascontiguousarray(lora_a.reshape(-1, rank).T)
    tensors[module + ".lora_B.weight"] = np.ascontiguousarray(lora_b.reshape(rank, -1).T)
    modules.append(hf.hf_module(path))
  if len(ranks) != 1:
    raise ValueError(f"adapters of several ranks {sorted(ranks)} are not supported by this export")
  rank = ranks.pop()
  kinds = {m.rsplit(".", 1)[-1] for m in modules}
  every_layer = len(modules) == len(kinds) * len({m.split(".")[2] for m in modules})
  # Short names ("q_proj") when each kind is adapted in every adapted layer, full names otherwise
  # (PEFT matches a target as a suffix of the module name).
  if score_head is not None:
    kernel, bias = (np.asarray(jax.device_get(score_head[k]), np.float32)
                    for k in ("kernel", "bias"))
    tensors[_PREFIX + "score.weight"] = np.ascontiguousarray(kernel.T)
    tensors[_PREFIX + "score.bias"] = bias.reshape(1)
  config = {
      "peft_type": "LORA", "task_type": "SEQ_CLS" if score_head is not None else "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": rank, "lora_alpha": float(alpha), "lora_dropout": float(dropout),
      "target_modules": sorted(kinds) if every_layer else sorted(modules),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
      "use_dora": False, "modules_to_save": ["score"] if score_head is not None else None, "init_lora_weights": True,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {},
  }
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  common.write_json(os.path.join(directory, CONFIG), config)
  return config


def load_reward_model_torch(base_model: str, directory: str, **kwargs):
  """The exported reward model in transformers + PEFT: `base_model` (an HF dir or id of the same
  backbone) as a 1-label sequence classifier with a biased score layer, then the adapter dir.
  Needs torch, transformers and peft (not perl_jax dependencies). kwargs go to from_pretrained."""
  import peft as peft_lib
  import torch
  import transformers
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
      base_model, num_labels=1, **kwargs)
  hidden = base.score.in_features
  base.score = torch.nn.Linear(hidden, 1, bias=True, dtype=base.score.weight.dtype)
  return peft_lib.PeftModel.from_pretrained(base, directory).eval()


def load(directory: str, cfg: model_lib.ModelConfig, dtype: str = "float32"
         ) -> tuple[dict, int, float]:
  """(adapter collection, rank, alpha) of a PEFT LoRA adapter dir, for the model `cfg`."""
  from safetensors import safe_open
  with open(os.path.join(directory, CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{directory}/{CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
  for flag in ("use_rslora", "use_dora"):
    if config.get(flag):
      raise NotImplementedError(f"{directory}/{CONFIG}: {flag}=true is not supported")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise NotImplementedError(f"{directory}/{CONFIG}: per-module rank/alpha patterns are not "
                              f"supported")
  rank = int(config["r"])
  shapes = model_lib.projection_shapes(cfg)
  by_module = {_PREFIX + hf.hf_module(p): p for p in shapes}
  flat = {}
  file = os.path.join(directory, WEIGHTS)
  with safe_open(file, framework="numpy") as f:
    for name in f.keys():
      if name.startswith(_PREFIX + "score."):  # a reward model's head: not a LoRA factor
        continue
      module, _, kind = name.rpartition(".lora_")
      path = by_module.get(module)
      if path is None or kind not in ("A.weight", "B.weight"):
        raise ValueError(f"{file}: unexpected tensor {name} (no such LoRA target in the model)")
      in_shape, out_shape = shapes[path]
      array = f.get_tensor(name)
      if kind == "A.weight":
        want, leaf = (rank, math.prod(in_shape)), array.T.reshape(in_shape + (rank,))
      else:
        want, leaf = (math.prod(out_shape), rank), array.T.reshape((rank,) + out_shape)
      if array.shape != want:
        raise ValueError(f"{file}: tensor {name} has shape {array.shape}, expected {want}")
      flat[f"{path}/lora_{kind[0].lower()}"] = jnp.asarray(leaf, dtype)
  for path in {p.rsplit("/", 1)[0] for p in flat}:
    if f"{path}/lora_a" not in flat or f"{path}/lora_b" not in flat:
      raise ValueError(f"{file}: {hf.hf_module(path)} has only one of lora_A / lora_B")
  return traverse_util.unflatten_dict(flat, sep="/"), rank, float(config["lora_alpha"])


def target_patterns(adapter: dict) -> tuple[str, ...]:
  """lora_targets for model.build that put adapters exactly where `adapter` has them."""
  return tuple(f"^{p}$" for p in sorted(lora_projections(adapter)))
