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

Shapes are static: `plan` goes through every step of a run and sizes the batch for the step
that needs the most rows, so the train step compiles once. Each gradient-accumulation
micro-batch is packed on its own, so it holds the examples its unpacked twin holds.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from perl_jax.data import batching


@dataclasses.dataclass(frozen=True)
class Plan:
  row_len: int  # tokens per packed row
  rows_per_micro: int  # packed rows per micro-batch (a multiple of the data-parallel devices)
  blocks_per_row: int  # most examples any row holds
  accum_steps: int

  @property
  def rows(self) -> int:
    return self.rows_per_micro * self.accum_steps


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


def plan(arrays: dict, steps: int, batch_size: int, seed: int, row_len: int,
         accum_steps: int = 1, row_multiple: int = 1) -> Plan:
  """The packed shape that fits every step 0..steps-1 of `batching.batch_rows` over `arrays`
  ({"tokens", "input_mask"} [N, K, L]); rows per micro-batch rounded up to `row_multiple`."""
  lengths = block_lengths(arrays["tokens"], arrays["input_mask"])
  if lengths.max() > row_len:
    i = int(np.argmax(lengths))
    raise ValueError(f"reward.pack_row_len={row_len} is shorter than training example {i}, "
                     f"which takes {int(lengths[i])} tokens packed: raise it (0 = K x max_len "
                     f"always fits)")
  if batch_size % accum_steps:
    raise ValueError(f"batch size {batch_size} is not divisible by accum_steps {accum_steps}")
  micro, rows, blocks = batch_size // accum_steps, 1, 1
  for step in range(steps):
    index = batching.batch_rows(len(lengths), step, batch_size, seed)
    for j in range(accum_steps):
      packed = first_fit(lengths[index[j * micro:(j + 1) * micro]], row_len)
      rows, blocks = max(rows, len(packed)), max(blocks, max(map(len, packed)))
  return Plan(row_len, -(-rows // row_multiple) * row_multiple, blocks, accum_steps)


def pack(arrays: dict, index: np.ndarray, plan_: Plan) -> dict:
  """The examples arrays[index] as one packed batch of plan_.rows rows:
  tokens, positions, segment (block number from 1; 0 = padding), branch (0 = shared prefix,
  k + 1 = sequence k's suffix) [R, row_len]; score_index [R, M, K] (each sequence's last token);
  block_mask, label (and weight when arrays has one) [R, M], M = plan_.blocks_per_row."""
  tokens, input_mask = arrays["tokens"][index], arrays["input_mask"][index]
  prefix, suffix = shared_blocks(tokens, input_mask)
  lengths = prefix + suffix.sum(1)
  num_seqs, shape = tokens.shape[1], (plan_.rows, plan_.row_len)
  out = {"tokens": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
         "segment": np.zeros(shape, np.int32), "branch": np.zeros(shape, np.int32),
         "score_index": np.zeros((plan_.rows, plan_.blocks_per_row, num_seqs), np.int32),
         "block_mask": np.zeros((plan_.rows, plan_.blocks_per_row), bool),
         "label": np.zeros((plan_.rows, plan_.blocks_per_row), np.float32)}
  if "weight" in arrays:
    out["weight"] = np.zeros((plan_.rows, plan_.blocks_per_row), np.float32)
  micro = len(index) // plan_.accum_steps
  for j in range(plan_.accum_steps):
    packed = first_fit(lengths[j * micro:(j + 1) * micro], plan_.row_len)
    if len(packed) > plan_.rows_per_micro or max(map(len, packed)) > plan_.blocks_per_row:
      raise ValueError(f"these examples need {len(packed)} packed rows, more than the plan's "
                       f"{plan_.rows_per_micro}: plan() was made for other data or steps")
    for r, members in enumerate(packed):
      row, at = j * plan_.rows_per_micro + r, 0
      for b, member in enumerate(members):
        e = j * micro + member
        p = prefix[e]
        put = lambda start, seq, lo, hi, branch: _put(out, row, start, tokens[e, seq, lo:hi],
                                                      np.arange(lo, hi), b + 1, branch)
        put(at, 0, 0, p, 0)
        end = at + p
        for k in range(num_seqs):
          s = suffix[e, k]
          put(end, k, p, p + s, k + 1)
          out["score_index"][row, b, k] = end + s - 1 if s else at + p - 1
          end += s
        out["block_mask"][row, b] = True
        out["label"][row, b] = arrays["label"][index[e]]
        if "weight" in arrays:
          out["weight"][row, b] = arrays["weight"][index[e]]
        at = end
  return out


def _put(out, row, start, tokens, positions, segment, branch):
  stop = start + len(tokens)
  out["tokens"][row, start:stop] = tokens
  out["positions"][row, start:stop] = positions
  out["segment"][row, start:stop] = segment
  out["branch"][row, start:stop] = branch


def attention_mask(segment, branch):
  """[R, T, T] bool: query t sees key s <= t of its own block, unless s is another sequence's
  suffix. Padding (segment 0) is no query's key."""
  length = segment.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))[None]
  same_block = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] > 0)
  visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
  return causal & same_block & visible


def token_share(arrays: dict, plan_: Plan, batch_size: int) -> float:
  """Token slots a packed step runs, as a share of the unpacked step's."""
  _, num_seqs, length = arrays["tokens"].shape
  return plan_.rows * plan_.row_len / (batch_size * num_seqs * length)
