"""Stanford Human Preferences (Ethayarajh et al.): the builder of its Reddit comment pairs ranked by
score."""
from __future__ import annotations

import os

from perl_jax.data import reading

_SHP_SPLITS = ("train", "validation", "test")


class Shp(reading.PreferenceBuilder, skip_registration=True):
  """Stanford Human Preferences: pairs of Reddit comments ranked by score (Ethayarajh et al.)."""

  name = "shp"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Clone https://huggingface.co/datasets/stanfordnlp/SHP and pass its root as the manual dir: one
  folder per subreddit (askacademia/, askhr/, ...), each with train.json, validation.json and
  test.json in JSON lines (post_id, history, human_ref_A, human_ref_B, labels, ...).
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    subreddits = sorted(
        d for d in os.listdir(manual_dir)
        if any(os.path.isfile(os.path.join(manual_dir, d, f"{s}.json")) for s in _SHP_SPLITS))
    files = {split: [f"{d}/{split}.json" for d in subreddits] for split in _SHP_SPLITS}
    missing = [name for names in files.values() for name in names
               if not os.path.isfile(os.path.join(manual_dir, name))]
    if not subreddits or missing:
      raise cls._missing(manual_dir, config,
                         missing or ["<subreddit>/train.json, validation.json, test.json"])
    return files

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names)
            for split, names in files.items()}

  def _parse(self, row):
    history, ref_a, ref_b = (reading.field(row, key)
                             for key in ("history", "human_ref_A", "human_ref_B"))
    a_preferred = reading.binary_label(reading.field(row, "labels", (int, float)), "labels") == 1.0
    chosen, rejected = (ref_a, ref_b) if a_preferred else (ref_b, ref_a)
    post_id = row.get("post_id") if isinstance(row.get("post_id"), str) else ""
    return reading.pairwise_example(history, chosen, rejected, post_id)
