"""OpenAI summarize-from-feedback (Stiennon et al. 2020): the builder of its human comparisons of
Reddit TL;DR summaries."""
from __future__ import annotations

import os
from typing import Any, Callable

from perl_jax.data import reading

_TLDR_SPLITS = {"train": ("train",), "validation": ("valid1", "valid2")}
_CNNDM_FILES = ("batch0_cnndm.json",)


class TldrComparisons(reading.PreferenceBuilder, skip_registration=True):
  """Human comparisons of Reddit TL;DR summaries (Stiennon et al. 2020)."""

  name = "tldr_comparisons"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Copy the comparisons of github.com/openai/summarize-from-feedback (batch*.json under
  https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/)
  into <manual_dir>/comparisons/. Each file is JSON lines: {info: {id, post, title, subreddit},
  summaries: [{text, policy, note}, {...}], choice, split: train|valid1|valid2, worker, batch}.
  batch0_cnndm.json (CNN/DM news articles, not Reddit posts) is not read.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    folder = "comparisons" if os.path.isdir(os.path.join(manual_dir, "comparisons")) else ""
    names = sorted(
        os.path.join(folder, f) if folder else f
        for f in os.listdir(os.path.join(manual_dir, folder))
        if f.startswith("batch") and f.endswith(".json") and f not in _CNNDM_FILES)
    if not names:
      raise cls._missing(manual_dir, config, ["comparisons/batch*.json"])
    return {split: names for split in _TLDR_SPLITS}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names, keep=self._keep(split))
            for split, names in files.items()}

  @staticmethod
  def _keep(split: str) -> Callable[[str, Any], bool]:
    """Rows whose split field cannot be read are reported with the train split."""
    def keep(source, row):
      value = row.get("split") if isinstance(row, dict) else None
      if not any(value in names for names in _TLDR_SPLITS.values()):
        return split == "train"
      return value in _TLDR_SPLITS[split]
    return keep

  def _parse(self, row):
    value = row.get("split") if isinstance(row, dict) else None
    if not any(value in names for names in _TLDR_SPLITS.values()):
      raise reading.MalformedRow(f"field 'split' is {value!r}, not one of train, valid1, valid2")
    info = reading.field(row, "info", dict)
    if info.get("post") is None and info.get("article") is not None:
      raise reading.MalformedRow("a CNN/DM article, not a Reddit post")
    post, title, subreddit = (reading.field(info, key) for key in ("post", "title", "subreddit"))
    summaries = reading.field(row, "summaries", list)
    if len(summaries) != 2:
      raise reading.MalformedRow(f"{len(summaries)} summaries, not 2")
    texts = [reading.field(summary, "text") for summary in summaries]
    choice = int(reading.binary_label(reading.field(row, "choice", int), "choice"))
    prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
    conversation_id = info.get("id") if isinstance(info.get("id"), str) else ""
    return reading.pairwise_example(prompt, texts[choice], texts[1 - choice], conversation_id)
