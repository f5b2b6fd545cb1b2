"""Taskmaster-4 Coffee (released with PERL): an agent that takes coffee orders through API calls.

The whole pipeline runs on the published data (config.data.manual_dir = the TM-4-2024 folder):
  sft     the dialogs' agent turns (replies and API calls) given the dialog so far
          (TFDS `taskmaster_dialogs`, split "train": 70% of the dialogs),
  reward  a binary classifier on the published reward examples (TFDS `taskmaster`, BCE),
  rl      PERL on contexts of dialogs SFT never saw (split "rl", 20%), evaluated on the test
          dialogs (10%, the same dialog keys the reward examples' test split holds out).
Turns are rendered as the reward examples' are: "User: ...", "Agent: ...",
"Agent: [call] name {json}", "API: [result] name {json}"; a prompt ends with "Agent:".

There is no gold judge. The held-out judge compares a sample with the turn the dialog's writer
published next: `act_match` (same act: a reply, or a call of the same API), `call_exact_match`
(for published API calls: the same name and the same arguments) and `well_formed` (a reply, or
a call whose arguments parse as JSON).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

TOKENIZER = "taskmaster_sp1024.model"
_CALL = re.compile(r"^\[call\] ([A-Za-z_]+) (.*)$", re.S)


def _dirs(config, workdir):
  manual_dir = config.data.manual_dir
  if not manual_dir:
    raise ValueError("task 'taskmaster' reads the published TM-4-2024 folder (data/ and reward/ "
                     "of github.com/google-research-datasets/Taskmaster): set "
                     "--config.data.manual_dir")
  return manual_dir, config.reward.data.data_dir or os.path.join(workdir, "tfds")


def demonstrations(config, workdir, split: str):
  """The `taskmaster_dialogs` split as Preferences (prompts, chosen = the published turn)."""
  from perl_jax.data import loader  # TFDS is slow to import; only data readers need it
  manual_dir, data_dir = _dirs(config, workdir)
  demos = loader.load_preferences("taskmaster_dialogs", split, manual_dir, data_dir,
                                  allow_partial=config.data.allow_partial)
  if demos.rows_skipped:
    shown = "\n  ".join(demos.skipped[:5])
    print(f"[taskmaster] dialogs/{split}: skipped {demos.rows_skipped} malformed or unreadable "
          f"dialogs:\n  {shown}", flush=True)
  return demos


def _shuffled(n_rows: int, limit: int, seed: int) -> np.ndarray:
  order = np.random.default_rng(seed).permutation(n_rows)
  return order[:limit] if limit else order


def sft_pairs(config, workdir):
  train, test = (demonstrations(config, workdir, split) for split in ("train", "test"))
  pairs = lambda d, rows: [(d.prompts[i], d.chosen[i]) for i in rows]
  return (pairs(train, _shuffled(len(train.prompts), config.sft.num_train, 1)),
          pairs(test, _shuffled(len(test.prompts), config.sft.num_eval, 2)))


def rl_prompts(config, workdir):
  demos = demonstrations(config, workdir, "rl")
  return [demos.prompts[i] for i in _shuffled(len(demos.prompts), config.rl.num_train_prompts,
                                              config.seed + 5)]


def eval_set(config, workdir, n: int | None = None):
  demos = demonstrations(config, workdir, "test")
  rows = _shuffled(len(demos.prompts), config.rl.num_eval_prompts if n is None else n, 3)
  references = [demos.chosen[i] for i in rows]
  return [demos.prompts[i] for i in rows], lambda texts: judge(texts, references)


def parse_turn(text: str):
  """("reply", None, text), ("call", name, args) or ("malformed", name, None)."""
  text = text.strip()
  match = _CALL.match(text)
  if not match:
    return ("malformed", None, None) if text.startswith("[") or not text else ("reply", None,
                                                                               text)
  try:
    return "call", match.group(1), json.loads(match.group(2))
  except json.JSONDecodeError:
    return "malformed", match.group(1), None


def is_well_formed(text: str) -> bool:
  return parse_turn(text)[0] != "malformed"


def judge(texts, references) -> dict:
  """Per sample: act_match, call_exact_match (NaN where the published turn is a reply) and
  well_formed, all 0/1."""
  act_match, exact, well_formed = [], [], []
  for text, reference in zip(texts, references):
    kind, name, args = parse_turn(text)
    ref_kind, ref_name, ref_args = parse_turn(reference)
    act_match.append(float(kind == ref_kind and name == ref_name))
    exact.append(float(kind == "call" and (name, args) == (ref_name, ref_args))
                 if ref_kind == "call" else np.nan)
    well_formed.append(float(kind != "malformed"))
  as_array = lambda xs: np.asarray(xs, np.float32)
  return {"act_match": as_array(act_match), "call_exact_match": as_array(exact),
          "well_formed": as_array(well_formed)}


def corpus_for_tokenizer(manual_dir: str, data_dir: str, allow_partial: bool = False) -> list[str]:
  """Every distinct rendered turn of the SFT dialogs and of the reward examples' train split."""
  from perl_jax.data import loader
  lines = set()
  for name, split in (("taskmaster_dialogs", "train"), ("taskmaster", "train")):
    rows = loader.load_preferences(name, split, manual_dir, data_dir,
                                   allow_partial=allow_partial)
    for prompt, response in zip(rows.prompts, rows.chosen):
      lines.update(prompt.split("\n"))
      lines.add(response)
  return sorted(lines)
