"""The demo task: short café reviews whose gold score is their sentiment.

Prompts name an item ("Review of the oat latte:"); responses are one or two short sentences that
praise or pan aspects of it. The SFT corpus mixes every sentiment, so the anchor model writes good
and bad reviews alike. The gold judge scores the sentiment a reader sees in the text: it counts
positive and negative words (negations flip them) and penalises text that is not a well-formed
review. A reward model only sees preference pairs, so it has to discover which words carry
sentiment; the policy then has to learn to write positive reviews without breaking the grammar.
"""
from __future__ import annotations

import dataclasses
import random
import re

ITEMS = ("espresso", "latte", "oat latte", "cappuccino", "flat white", "mocha", "cold brew",
         "americano", "macchiato", "chai", "hot chocolate", "croissant", "muffin", "bagel",
         "scone", "cheesecake", "brownie", "sandwich", "matcha", "cortado")
ASPECTS = ("taste", "price", "service", "foam", "staff", "music", "cup", "smell", "texture",
           "portion", "wait", "table", "milk", "crust")
POSITIVE = ("great", "lovely", "delicious", "perfect", "friendly", "rich", "smooth", "fresh",
            "excellent", "warm", "cozy", "tasty", "fair", "quick")
NEGATIVE = ("awful", "bitter", "bland", "stale", "rude", "cold", "burnt", "soggy", "slow",
            "weak", "dirty", "noisy", "sour", "greasy")
NEUTRAL = ("okay", "average", "fine", "plain", "usual", "standard")
POSITIVE_ENDINGS = ("I will be back.", "Highly recommended.", "Loved it.", "Worth every penny.")
NEGATIVE_ENDINGS = ("Never again.", "Not worth it.", "Avoid it.", "What a waste.")
NEUTRAL_ENDINGS = ("It was fine.", "Nothing special.", "Maybe next time.")

_WORD = re.compile(r"[a-z]+")
_SENTENCE = re.compile(r"^(The [a-z]+ was (not )?[a-z]+( and the [a-z]+ was (not )?[a-z]+)?\. ?)+"
                       r"([A-Z][a-z ]+\.)?$")


def prompt_for(item: str) -> str:
  return f"Review of the {item}:"


def _clause(rng: random.Random, polarity: float) -> tuple[str, int]:
  """One 'the A was X' clause; returns (text, its sentiment in -1/0/+1)."""
  aspect = rng.choice(ASPECTS)
  roll = rng.random()
  if roll < 0.15:
    return f"the {aspect} was {rng.choice(NEUTRAL)}", 0
  positive = rng.random() < polarity
  negate = rng.random() < 0.12
  word = rng.choice(POSITIVE if positive else NEGATIVE)
  sign = (1 if positive else -1) * (-1 if negate else 1)
  return f"the {aspect} was {'not ' if negate else ''}{word}", sign


def sample_review(rng: random.Random) -> str:
  """A review whose overall leaning is drawn uniformly, so the corpus covers every sentiment."""
  polarity = rng.random()
  sentences, total = [], 0
  for _ in range(rng.choice((1, 1, 2))):
    first, s1 = _clause(rng, polarity)
    text = first[0].upper() + first[1:]
    total += s1
    if rng.random() < 0.6:
      second, s2 = _clause(rng, polarity)
      text += f" and {second}"
      total += s2
    sentences.append(text + ".")
  if rng.random() < 0.7:
    endings = (POSITIVE_ENDINGS if total > 0 else NEGATIVE_ENDINGS if total < 0
               else NEUTRAL_ENDINGS)
    sentences.append(rng.choice(endings))
  return " ".join(sentences)


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str
  response: str


def make_examples(n: int, seed: int) -> list[Example]:
  rng = random.Random(seed)
  return [Example(prompt_for(rng.choice(ITEMS)), sample_review(rng)) for _ in range(n)]


# Reward-model and RL training prompts name these items; held-out prompts name the others. (The
# SFT corpus covers all items, so the anchor can write about held-out ones too.)
TRAIN_ITEMS, HELD_OUT_ITEMS = ITEMS[:16], ITEMS[16:]


def train_prompts(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  return [prompt_for(rng.choice(TRAIN_ITEMS)) for _ in range(n)]


def eval_prompts(n: int, seed: int = 10_001) -> list[str]:
  """Held-out prompts: items that no reward-model or RL training prompt names."""
  rng = random.Random(seed)
  return [prompt_for(rng.choice(HELD_OUT_ITEMS)) for _ in range(n)]


def corpus_for_tokenizer(n: int = 20_000, seed: int = 0) -> list[str]:
  return [f"{e.prompt} {e.response}" for e in make_examples(n, seed)]


_ENDING_SCORE = {**{e: 1 for e in POSITIVE_ENDINGS}, **{e: -1 for e in NEGATIVE_ENDINGS},
                 **{e: 0 for e in NEUTRAL_ENDINGS}}


def is_well_formed(response: str) -> bool:
  """True if the text is a review in the task's grammar with only the task's sentiment words."""
  text = response.strip()
  if not text or not _SENTENCE.match(text):
    return False
  words = re.findall(r"was (?:not )?([a-z]+)", text)
  return all(w in POSITIVE + NEGATIVE + NEUTRAL for w in words)


def gold_reward(response: str) -> float:
  """Sentiment of a review in [-1, 1]; malformed or empty text scores -1.

  Each clause "the A was [not] X" adds +1 for a positive X, -1 for a negative one (flipped by
  "not"); a closing phrase adds its own sentiment. The sum is squashed by the number of clauses so
  that repeating praise does not pay more than meaning it.
  """
  text = response.strip()
  if not text or not _SENTENCE.match(text):
    return -1.0
  score, clauses = 0, 0
  for negation, word in re.findall(r"was (not )?([a-z]+)", text):
    clauses += 1
    sign = 1 if word in POSITIVE else -1 if word in NEGATIVE else 0
    if word not in POSITIVE + NEGATIVE + NEUTRAL:
      return -1.0
    score += -sign if negation else sign
  for ending, sign in _ENDING_SCORE.items():
    if text.endswith(ending):
      score += sign
      clauses += 1
  if clauses > 5:
    return -1.0
  return score / max(clauses, 1)


# ----------------------------------------------------------------------------- the task interface
# (see perl_jax/tasks/__init__.py)

TOKENIZER = "reviews_sp256.model"


def sft_pairs(config, workdir):
  del workdir
  pairs = lambda n, seed: [(e.prompt, e.response) for e in make_examples(n, seed)]
  return pairs(config.sft.num_train, 1), pairs(config.sft.num_eval, 2)


def rl_prompts(config, workdir):
  del workdir
  return train_prompts(config.rl.num_train_prompts, seed=config.seed + 5)


def eval_set(config, workdir, n: int | None = None):
  del workdir
  import numpy as np
  judge = lambda texts: {"gold_reward": np.asarray([gold_reward(t) for t in texts], np.float32)}
  return eval_prompts(config.rl.num_eval_prompts if n is None else n), judge
