"""Tokenised, padded arrays and a deterministic, resumable batch order.

A batch is a pure function of (arrays, step): resuming at step s reads exactly the batches an
uninterrupted run would have read, with no iterator state to save beyond the step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from perl_jax.tokenizer import Tokenizer


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, left: bool = False):
  """Pads id lists to `length`; returns (tokens int32 [N, L], mask bool [N, L])."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ValueError(f"row {i} has {len(row)} tokens, more than the padded length {length}")
    if left:
      tokens[i, length - len(row):] = row
      mask[i, length - len(row):] = True
    else:
      tokens[i, :len(row)] = row
      mask[i, :len(row)] = True
  return tokens, mask


def truncate_prompt(prompt: list[int], budget: int) -> list[int]:
  """Fits a prompt into `budget` tokens by cutting its middle: the first quarter of the budget
  comes from its start (BOS, the task or the request that opened a dialog), the rest from its
  end (the turns the response answers)."""
  if len(prompt) <= budget:
    return prompt
  head = budget // 4
  return prompt[:head] + prompt[len(prompt) - (budget - head):]


def truncate_pair(prompt: list[int], response: list[int], max_len: int) -> tuple[list, list]:
  """Fits prompt + response into max_len. The response keeps up to max_len // 2 tokens from its
  end (where a response's quality shows and where the reward is read) and the prompt the rest,
  cut in the middle (see truncate_prompt)."""
  if len(prompt) + len(response) <= max_len:
    return prompt, response
  keep_response = min(len(response), max(max_len - len(prompt), max_len // 2))
  return (truncate_prompt(prompt, max_len - keep_response),
          response[len(response) - keep_response:])


def encode_sft(tok: Tokenizer, pairs: Sequence[tuple[str, str]], max_len: int) -> dict:
  """BOS prompt response EOS, right-padded; loss on response tokens and EOS only."""
  rows, loss_rows = [], []
  for prompt, response in pairs:
    p, r = truncate_pair(tok.encode_prompt(prompt), tok.encode_response(response), max_len)
    rows.append(p + r)
    loss_rows.append([0] * len(p) + [1] * len(r))
  tokens, input_mask = pad_rows(rows, max_len, tok.pad_id)
  loss_mask, _ = pad_rows(loss_rows, max_len, 0)
  return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask.astype(bool)}


def batch_rows(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the `step`-th batch of a shuffled pass over n rows (reshuffled every epoch)."""
  if n < batch_size:
    raise ValueError(f"dataset has {n} rows, fewer than the batch size {batch_size}")
  per_epoch = n // batch_size
  epoch, index = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[index * batch_size:(index + 1) * batch_size]


def batch_at(arrays: dict, step: int, batch_size: int, seed: int) -> dict:
  """The `step`-th batch of a shuffled pass over `arrays` (reshuffled every epoch)."""
  rows = batch_rows(len(next(iter(arrays.values()))), step, batch_size, seed)
  return {k: v[rows] for k, v in arrays.items()}
