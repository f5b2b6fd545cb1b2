"""Your own preference data as JSON lines: the builder of pairwise {prompt, chosen, rejected} or
pointwise {prompt, response, label} rows (the prefs stage writes them)."""
from __future__ import annotations

import os
from typing import Any

from perl_jax.data import reading


def _row_kind(row: Any) -> str | None:
  if not isinstance(row, dict):
    return None
  pairwise, pointwise = "chosen" in row or "rejected" in row, "response" in row or "label" in row
  return None if pairwise == pointwise else reading.PAIRWISE if pairwise else reading.POINTWISE


class JsonlPreferences(reading.PreferenceBuilder, skip_registration=True):
  """Your own data: pairwise {prompt, chosen, rejected} or pointwise {prompt, response, label}."""

  name = "jsonl_preferences"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put train.jsonl (and optionally test.jsonl; .jsonl.gz also accepted) in the manual dir, one JSON
  object per line, all of one kind: pairwise {"prompt", "chosen", "rejected"} or pointwise
  {"prompt", "response", "label" (0 or 1)}. The kind is that of the first train row that has one.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    train = reading.first_file(manual_dir, "train.jsonl", "train.jsonl.gz")
    if train is None:
      raise cls._missing(manual_dir, config, ["train.jsonl (or train.jsonl.gz)"])
    test = reading.first_file(manual_dir, "test.jsonl", "test.jsonl.gz")
    return {"train": [train], **({"test": [test]} if test else {})}

  def _split_generators(self, dl_manager):
    manual_dir, names = self._split_files(dl_manager)
    files = {split: split_names[0] for split, split_names in names.items()}
    kind = None
    try:
      train = os.path.join(manual_dir, files["train"])
      for _, row, _ in reading.read_json_lines(train, files["train"]):
        kind = _row_kind(row)
        if kind:
          break
    except reading.FileCut:
      pass  # _generate_examples reports the cut
    if kind is None:
      raise ValueError(f"{self.name}: no row of {os.path.join(manual_dir, files['train'])} is "
                       "pairwise {prompt, chosen, rejected} or pointwise {prompt, response, label}")
    self.info.metadata["kind"] = kind
    return {split: self._generate_examples(split, manual_dir, [name])
            for split, name in files.items()}

  def _parse(self, row):
    kind, expected = _row_kind(row), self.info.metadata["kind"]
    if kind != expected:
      found = "neither or both of chosen/rejected and response/label" if kind is None else kind
      raise reading.MalformedRow(f"{found} row in a {expected} file")
    prompt = reading.field(row, "prompt")
    if kind == reading.PAIRWISE:
      return reading.pairwise_example(prompt, reading.field(row, "chosen"),
                                      reading.field(row, "rejected"))
    label = reading.binary_label(reading.field(row, "label", (int, float)), "label")
    return reading.pointwise_example(prompt, reading.field(row, "response"), label)
