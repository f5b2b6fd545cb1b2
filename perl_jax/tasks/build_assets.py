"""Rebuilds the shipped demo tokenizer: `python -m perl_jax.tasks.build_assets`.

Trains a 256-piece BPE sentencepiece model on the review task's corpus (deterministic: seed 0) and writes
it to perl_jax/assets/reviews_sp256.model.
"""
import os

from absl import app

from perl_jax import tokenizer
from perl_jax.tasks import reviews

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
REVIEWS_TOKENIZER = os.path.join(ASSETS, "reviews_sp256.model")


def main(argv):
  del argv
  os.makedirs(ASSETS, exist_ok=True)
  prefix = REVIEWS_TOKENIZER[: -len(".model")]
  path = tokenizer.train(reviews.corpus_for_tokenizer(), prefix, vocab_size=256)
  os.remove(prefix + ".vocab")
  print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
  app.run(main)
