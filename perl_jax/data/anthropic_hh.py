"""Anthropic HH-RLHF (Bai et al. 2022): the builder of its helpfulness/harmlessness pairs and the
split of a pair into shared prompt and two responses."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from perl_jax.data import reading

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman:"


def split_hh_dialog(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of one HH-RLHF pair.

  The prompt is the shared text up to and including its last "\n\nAssistant:"; the responses are
  what follows, stripped. Raises MalformedRow for identical pairs, pairs without a shared
  "\n\nAssistant:", and pairs that differ before the final assistant turn.
  """
  if chosen == rejected:
    raise reading.MalformedRow("identical chosen and rejected")
  shared = os.path.commonprefix([chosen, rejected])
  cut = shared.rfind(_ASSISTANT)
  if cut < 0:
    raise reading.MalformedRow("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
  end = cut + len(_ASSISTANT)
  chosen_response, rejected_response = chosen[end:].strip(), rejected[end:].strip()
  if _HUMAN in chosen_response or _HUMAN in rejected_response:
    raise reading.MalformedRow("chosen and rejected differ before the final assistant turn")
  return chosen[:end], chosen_response, rejected_response


class AnthropicHh(reading.PreferenceBuilder, skip_registration=True):
  """Anthropic HH-RLHF helpfulness/harmlessness pairs (Bai et al. 2022)."""

  name = "anthropic_hh"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=subset, description=f"the {subset} subset")
                     for subset in SUBSETS] + [
                         tfds.core.BuilderConfig(name="all", description="all four subsets")]
  DEFAULT_BUILDER_CONFIG_NAME = "all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Clone https://huggingface.co/datasets/Anthropic/hh-rlhf (or github.com/anthropics/hh-rlhf) and
  pass its root as the manual dir: it holds harmless-base/, helpful-base/, helpful-online/ and
  helpful-rejection-sampled/, each with train.jsonl.gz and test.jsonl.gz (gunzipped .jsonl also
  accepted). red-team-attempts/ is not preference data and is not read.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    found = {(subset, split): reading.first_file(manual_dir, f"{subset}/{split}.jsonl.gz",
                                                 f"{subset}/{split}.jsonl")
             for subset in SUBSETS for split in ("train", "test")}
    subsets = SUBSETS if config == "all" else (config,)
    missing = []
    for subset in subsets:
      if not os.path.isdir(os.path.join(manual_dir, subset)):
        missing.append(f"{subset}/")
      else:
        missing += [f"{subset}/{split}.jsonl.gz" for split in ("train", "test")
                    if not found[subset, split]]
    if missing:
      complete = [subset for subset in SUBSETS
                  if found[subset, "train"] and found[subset, "test"]]
      flag = reading.config_flag(cls.name, "config")
      fix = (f"read the subset{'s' if len(complete) > 1 else ''} present with "
             + " or ".join(f"{flag}={subset}" for subset in complete) if complete else
             f"point {reading.config_flag(cls.name, 'manual_dir')} at a clone of "
             "huggingface.co/datasets/Anthropic/hh-rlhf (each subset folder holds train.jsonl.gz "
             "and test.jsonl.gz)")
      raise cls._missing(manual_dir, config, missing, fix)
    return {split: [found[subset, split] for subset in subsets] for split in ("train", "test")}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names)
            for split, names in files.items()}

  def _parse(self, row):
    prompt, chosen, rejected = split_hh_dialog(reading.field(row, "chosen"),
                                               reading.field(row, "rejected"))
    return reading.pairwise_example(prompt, chosen, rejected)
