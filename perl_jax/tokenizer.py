"""Sentencepiece tokenizers: loading, training, and encoding / decoding one text.

`encode_prompt` / `encode_response` are the one place a prompt and a response become ids (BOS,
the chat template if any, EOS); batches (truncation, padding and the masks that keep padding out
of the model) are built from them by data/batching.py and roles.encode_prompts.

Special ids follow Gemma: pad 0, eos 1, bos 2, unk 3.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm

from perl_jax import chat

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
  """A sentencepiece model with the pad/bos/eos ids the model uses.

  chat_template="gemma" (see perl_jax.chat) renders prompts as Gemma chat turns and makes
  <end_of_turn> the end of a response (eos_id): the model must have those pieces.
  """

  def __init__(self, model_path: str, pad_id: int | None = None, bos_id: int | None = None,
               eos_id: int | None = None, chat_template: str = ""):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    if chat_template not in chat.TEMPLATES:
      raise ValueError(f"unknown chat template {chat_template!r} (config.tokenizer."
                       f"chat_template); known: {chat.TEMPLATES}")
    self.path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)
    self.pad_id = self.sp.pad_id() if pad_id is None else pad_id
    self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
    self.eos_id = self.sp.eos_id() if eos_id is None else eos_id
    for name in ("pad_id", "bos_id", "eos_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"tokenizer {model_path} defines no {name}; pass it explicitly")
    self.chat_template = chat_template
    if chat_template == "gemma":
      markers = [self.sp.piece_to_id(m) for m in (chat.START_OF_TURN, chat.END_OF_TURN)]
      if any(self.sp.id_to_piece(i) != m for i, m in zip(markers,
                                                         (chat.START_OF_TURN, chat.END_OF_TURN))):
        raise ValueError(f"chat_template='gemma' needs the pieces {chat.START_OF_TURN} and "
                         f"{chat.END_OF_TURN}; tokenizer {model_path} has neither (a Gemma "
                         "tokenizer has them): set config.tokenizer.chat_template=''")
      self.start_of_turn_id, self.end_of_turn_id = markers
      self.eos_id = self.end_of_turn_id  # a model turn ends there

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_prompt(self, text: str) -> list[int]:
    """BOS + the prompt; with a chat template, its turns and an open model turn."""
    if self.chat_template == "gemma":
      return chat.gemma_prompt(text, self.encode, self.bos_id, self.start_of_turn_id,
                               self.end_of_turn_id)
    return [self.bos_id] + self.encode(text)

  def encode_response(self, text: str) -> list[int]:
    """The response + EOS (<end_of_turn> with a chat template)."""
    return self.encode(text) + [self.eos_id]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to the first EOS, skipping padding and BOS."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        out.append(i)
    return self.sp.decode(out)


def train(texts: Iterable[str], model_prefix: str, vocab_size: int) -> str:
  """Trains a BPE sentencepiece model on `texts`; returns the .model path."""
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type="bpe", normalization_rule_name="identity", character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID,
      unk_id=UNK_ID, num_threads=2, minloglevel=2, split_digits=True)
  return model_prefix + ".model"
