"""perl_jax.data.batching by hand: padding, the truncation rules, the SFT loss mask, batch order."""
import numpy as np
import pytest

from perl_jax import tokenizer
from perl_jax.data import batching

PROMPT = list(range(10))  # 0 .. 9: the start is 0, 1, ..., the end ..., 8, 9
RESPONSE = list(range(100, 110))  # 100 .. 109


def test_pad_rows_right_and_left():
  tokens, mask = batching.pad_rows([[5, 6, 7], [8]], 4, pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  tokens, mask = batching.pad_rows([[5, 6, 7], [8]], 4, pad_id=9, left=True)
  np.testing.assert_array_equal(tokens, [[9, 5, 6, 7], [9, 9, 9, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert tokens.dtype == np.int32 and mask.dtype == bool
  with pytest.raises(ValueError, match="row 1 has 5 tokens"):
    batching.pad_rows([[1], [1, 2, 3, 4, 5]], 4, 0)


def test_truncate_prompt_keeps_a_quarter_from_the_start_and_the_rest_from_the_end():
  assert batching.truncate_prompt(PROMPT, 10) == PROMPT  # fits: untouched
  assert batching.truncate_prompt(PROMPT, 12) == PROMPT
  # budget 8: head 8 // 4 = 2 tokens from the start, 6 from the end; the middle 2, 3 go
  assert batching.truncate_prompt(PROMPT, 8) == [0, 1, 4, 5, 6, 7, 8, 9]
  # budget 4: head 1 (BOS survives), 3 from the end
  assert batching.truncate_prompt(PROMPT, 4) == [0, 7, 8, 9]
  # budget 3: head 0, everything from the end
  assert batching.truncate_prompt(PROMPT, 3) == [7, 8, 9]


def test_truncate_pair_keeps_the_prompts_start_and_the_responses_end():
  # Fits (10 + 10 <= 20): untouched.
  assert batching.truncate_pair(PROMPT, RESPONSE, 20) == (PROMPT, RESPONSE)
  # Both long, max_len 8: the response keeps max_len // 2 = 4 from its end, the prompt the
  # other 4, cut in the middle (head 4 // 4 = 1, then 3 from its end).
  assert batching.truncate_pair(PROMPT, RESPONSE, 8) == ([0, 7, 8, 9], [106, 107, 108, 109])
  # Short prompt (2), long response, max_len 8: the response takes all the room the prompt
  # leaves (8 - 2 = 6 > 4), the prompt is whole.
  assert batching.truncate_pair([0, 1], RESPONSE, 8) == ([0, 1], list(range(104, 110)))
  # Long prompt, short response (2), max_len 8: the response stays whole, the prompt gets
  # 8 - 2 = 6: head 6 // 4 = 1 plus 5 from its end.
  assert batching.truncate_pair(PROMPT, [100, 101], 8) == ([0, 5, 6, 7, 8, 9], [100, 101])
  # Odd max_len 9 with both long: response 9 // 2 = 4, prompt 5 (head 1 + 4 from the end).
  assert batching.truncate_pair(PROMPT, RESPONSE, 9) == ([0, 6, 7, 8, 9],
                                                         [106, 107, 108, 109])


class _FakeTokenizer:
  """One id per character: 'a' -> 10, 'b' -> 11, ...; BOS 2, EOS 1, pad 0."""
  bos_id, eos_id, pad_id = 2, 1, 0
  chat_template = ""
  encode_prompt = tokenizer.Tokenizer.encode_prompt
  encode_response = tokenizer.Tokenizer.encode_response

  def encode(self, text):
    return [10 + ord(c) - ord("a") for c in text]


def test_encode_sft_masks_the_prompt_and_keeps_the_response_and_eos():
  out = batching.encode_sft(_FakeTokenizer(), [("ab", "cd"), ("abcdefghij", "klmnopqr")], 8)
  # Row 0: BOS a b | c d EOS, padded to 8; the loss is on c, d and EOS.
  np.testing.assert_array_equal(out["tokens"][0], [2, 10, 11, 12, 13, 1, 0, 0])
  np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["input_mask"][0], [1, 1, 1, 1, 1, 1, 0, 0])
  # Row 1: prompt BOS a..j (11 ids), response k..r EOS (9 ids), max_len 8: the response keeps
  # its last 4 (p q r EOS), the prompt BOS and its last 3 (h i j).
  np.testing.assert_array_equal(out["tokens"][1], [2, 17, 18, 19, 25, 26, 27, 1])
  np.testing.assert_array_equal(out["loss_mask"][1], [0, 0, 0, 0, 1, 1, 1, 1])
  assert out["loss_mask"].dtype == bool


def test_batch_at_is_a_deterministic_reshuffled_pass_per_epoch():
  arrays = {"x": np.arange(10), "y": np.arange(10) * 10}
  batch = lambda step, seed=0: batching.batch_at(arrays, step, 3, seed)
  # Rows stay aligned across the arrays.
  for step in range(7):
    np.testing.assert_array_equal(batch(step)["y"], batch(step)["x"] * 10)
  # A pure function of (step, seed): asking again (e.g. after a resume) gives the same batch.
  for step in (0, 4, 11):
    np.testing.assert_array_equal(batch(step)["x"], batch(step)["x"])
  assert any(not np.array_equal(batch(s)["x"], batch(s, seed=1)["x"]) for s in range(3))
  # 10 rows, batch 3: an epoch is 10 // 3 = 3 batches of distinct rows (9 of the 10 rows; the
  # leftover row differs between epochs), and the next epoch is another shuffle.
  epochs = [np.concatenate([batch(e * 3 + i)["x"] for i in range(3)]) for e in range(4)]
  for rows in epochs:
    assert len(set(rows.tolist())) == 9
  assert len({tuple(rows) for rows in epochs}) == 4  # each epoch in its own order
  assert len(set(np.concatenate(epochs).tolist())) == 10  # over epochs, every row is seen
  with pytest.raises(ValueError, match="fewer than the batch size"):
    batching.batch_at(arrays, 0, 11, 0)
