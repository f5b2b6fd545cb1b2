"""Packed reward-model batches: several examples per row, each pair's shared prompt once.

The chosen and rejected sequences of a preference pair begin with the same tokens (the prompt).
Unpacked, each is its own row padded to max_len and the prompt runs twice. Packed, an example
becomes one block [shared prefix, suffix of sequence 1, suffix of sequence 2, ...] and blocks
sit back to back in rows of `row_len` tokens. Positions restart at each block and every suffix
continues from the prefix's last position; a token attends to the earlier tokens of its own
block except those of the other suffixes (`attention_mask`). Every sequence so sees exactly the
tokens, at exactly the positions, it sees alone: the scores, the loss and its gradients are the
unpacked ones (tests/test_packing.py) while the prefix runs once and padding is mostly gone.
Pointwise data (one sequence per example) loses its padding only.

How many rows a step's examples fill varies from step to step. Shapes stay static and the
step compiles once: the rows are laid out as [chunk_rows, max_chunks, ...] (chunk c is
[:, c], so each chunk splits over the data-parallel devices like a batch), and the step runs
only the chunks that hold rows (`chunk_count`), accumulating their gradients
(reward.packed_reward_grads_fn). Each example carries the weight that makes the sum over
chunks the padded step's loss, gradient accumulation (accum_steps micro-batches, each its own
mean) included.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax.data import batching


@dataclasses.dataclass(frozen=True)
class Plan:
  row_len: int  # tokens per packed row
  chunk_rows: int  # rows per chunk (a multiple of the data-parallel devices)
  max_chunks: int  # chunks the step with the most rows needs
  blocks_per_row: int  # most examples any row holds
  token_share: float  # token slots the planned steps run, as a share of the padded steps'

  @property
  def rows(self) -> int:
    return self.chunk_rows * self.max_chunks


def shared_blocks(tokens: np.ndarray, input_mask: np.ndarray):
  """For examples tokens/input_mask [N, K, L] (K right-padded sequences each): the length of
  the prefix all K share [N] and each sequence's length after it [N, K]."""
  lengths = input_mask.sum(-1)
  if np.any(lengths < 1):
    raise ValueError(f"example {int(np.argwhere(lengths < 1)[0, 0])} has an empty sequence")
  same = np.all(tokens == tokens[:, :1], axis=1) & np.all(input_mask, axis=1)
  prefix = np.cumprod(same, axis=1).sum(1)
  return prefix, lengths - prefix[:, None]


def block_lengths(tokens: np.ndarray, input_mask: np.ndarray) -> np.ndarray:
  """Tokens each example takes packed: its shared prefix once plus every suffix."""
  prefix, suffix = shared_blocks(tokens, input_mask)
  return prefix + suffix.sum(1)


def first_fit(lengths: np.ndarray, row_len: int) -> list[list[int]]:
  """Rows of indices into `lengths`: first fit, longest first (ties in order; deterministic)."""
  rows, free = [], []
  for i in np.argsort(-lengths, kind="stable"):
    size = int(lengths[i])
    for r, room in enumerate(free):
      if size <= room:
        rows[r].append(int(i))
        free[r] -= size
        break
    else:
      rows.append([int(i)])
      free.append(row_len - size)
  return rows


def plan(arrays: dict, batches: Sequence[np.ndarray], row_len: int, chunk_rows: int,
         row_multiple: int = 1) -> Plan:
  """The packed layout that fits each of `batches` (index arrays into `arrays`, whose
  "tokens" and "input_mask" are [N, K, L]); chunk_rows rounded up to `row_multiple`."""
  lengths = block_lengths(arrays["tokens"], arrays["input_mask"])
  if lengths.max() > row_len:
    i = int(np.argmax(lengths))
    raise ValueError(f"reward.pack_row_len={row_len} is shorter than example {i}, which takes "
                     f"{int(lengths[i])} tokens packed: raise it (0 = K x max_len always fits)")
  chunk_rows = -(-chunk_rows // row_multiple) * row_multiple
  chunks, blocks, run, padded = 1, 1, 0, 0
  _, num_seqs, length = arrays["tokens"].shape
  for index in batches:
    packed = first_fit(lengths[index], row_len)
    needed = -(-len(packed) // chunk_rows)
    chunks, blocks, run = max(chunks, needed), max(blocks, max(map(len, packed))), run + needed
    padded += len(index) * num_seqs * length
  return Plan(row_len, chunk_rows, chunks, blocks, run * chunk_rows * row_len / max(padded, 1))


def train_plan(arrays: dict, steps: int, batch_size: int, seed: int, row_len: int,
               chunk_rows: int, row_multiple: int = 1) -> Plan:
  """`plan` for the batches of steps 0..steps-1 of `batching.batch_rows` over `arrays`."""
  n = len(arrays["tokens"])
  return plan(arrays, [batching.batch_rows(n, step, batch_size, seed) for step in range(steps)],
              row_len, chunk_rows, row_multiple)


def example_weights(arrays: dict, index: np.ndarray, accum_steps: int) -> np.ndarray:
  """Each example's share of the padded step's loss: within each of the accum_steps
  micro-batches its weight (arrays["weight"], else 1) over the micro-batch's total, over
  accum_steps (the padded step averages the micro-batches' means)."""
  weight = (arrays["weight"][index] if "weight" in arrays
            else np.ones(len(index), np.float32)).astype(np.float64)
  if len(index) % accum_steps:
    raise ValueError(f"batch of {len(index)} is not divisible by accum_steps {accum_steps}")
  micro = weight.reshape(accum_steps, -1)
  return (micro / np.maximum(micro.sum(1, keepdims=True), 1e-12) / accum_steps).reshape(-1)


def pack(arrays: dict, index: np.ndarray, plan_: Plan, accum_steps: int = 1) -> dict:
  """The examples arrays[index] as one packed batch, rows laid out [chunk_rows, max_chunks]:
  tokens, positions, segment (block number from 1; 0 = padding), branch (0 = shared prefix,
  k + 1 = sequence k's suffix) [r, C, row_len]; score_index [r, C, M, K] (each sequence's last
  token); block_mask, label, weight (see example_weights), example (the block's position in
  `index`, -1 for none), micro (its micro-batch of accum_steps) [r, C, M]; chunk_count [r] (chunks holding rows, the same in every
  row)."""
  tokens, input_mask = arrays["tokens"][index], arrays["input_mask"][index]
  prefix, suffix = shared_blocks(tokens, input_mask)
  packed = first_fit(prefix + suffix.sum(1), plan_.row_len)
  if len(packed) > plan_.rows or max(map(len, packed)) > plan_.blocks_per_row:
    raise ValueError(f"these examples need {len(packed)} packed rows, more than the plan's "
                     f"{plan_.rows}: plan() was made for other data or steps")
  weight = example_weights(arrays, index, accum_steps)
  num_seqs, r, c, m = tokens.shape[1], plan_.chunk_rows, plan_.max_chunks, plan_.blocks_per_row
  out = {"tokens": np.zeros((r, c, plan_.row_len), np.int32),
         "score_index": np.zeros((r, c, m, num_seqs), np.int32),
         "block_mask": np.zeros((r, c, m), bool), "label": np.zeros((r, c, m), np.float32),
         "weight": np.zeros((r, c, m), np.float32),
         "example": np.full((r, c, m), -1, np.int32), "micro": np.full((r, c, m), -1, np.int32),
         "chunk_count": np.full((r,), -(-len(packed) // r), np.int32)}
  for name in ("positions", "segment", "branch"):
    out[name] = np.zeros_like(out["tokens"])
  for j, members in enumerate(packed):
    at, slot = 0, (j % r, j // r)
    for b, e in enumerate(members):
      p = prefix[e]
      _put(out, slot, at, tokens[e, 0, :p], np.arange(p), b + 1, 0)
      end = at + p
      for k in range(num_seqs):
        s = suffix[e, k]
        _put(out, slot, end, tokens[e, k, p:p + s], np.arange(p, p + s), b + 1, k + 1)
        out["score_index"][slot + (b, k)] = end + s - 1 if s else at + p - 1
        end += s
      out["block_mask"][slot + (b,)] = True
      out["example"][slot + (b,)] = e
      out["micro"][slot + (b,)] = e // (len(index) // accum_steps)
      out["label"][slot + (b,)] = arrays["label"][index[e]]
      out["weight"][slot + (b,)] = weight[e]
      at = end
  return out


def _put(out, slot, start, tokens, positions, segment, branch):
  where = slot + (slice(start, start + len(tokens)),)
  out["tokens"][where] = tokens
  out["positions"][where] = positions
  out["segment"][where] = segment
  out["branch"][where] = branch


def chunk_at(batch: dict, c):
  """Chunk c of a packed batch (inside jit, c may be traced): the fields the model and loss
  read, [chunk_rows, ...] each."""
  return {k: jax.lax.dynamic_index_in_dim(v, c, 1, keepdims=False) for k, v in batch.items()
          if k not in ("chunk_count", "example", "micro")}


def attention_mask(segment, branch):
  """[R, T, T] bool: query t sees key s <= t of its own block, unless s is another sequence's
  suffix. Padding (segment 0) is no query's key."""
  length = segment.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))[None]
  same_block = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0)
  visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
  return causal & same_block & visible


def unpack_scores(scores: np.ndarray, packed: dict, count: int) -> np.ndarray:
  """Scores [r, C, M, K] of a packed batch back in example order: [count, K]."""
  out = np.zeros((count, scores.shape[-1]), np.float32)
  where = packed["example"] >= 0
  out[packed["example"][where]] = scores[where]
  return out
