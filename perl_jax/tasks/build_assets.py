"""Rebuilds the shipped tokenizers: `python -m perl_jax.tasks.build_assets
[--taskmaster_dir=TM-4-2024]`.

reviews_sp256.model      256-piece BPE on the review task's generated corpus (seed 0).
taskmaster_sp1024.model  1024-piece BPE on the distinct rendered turns of the Taskmaster Coffee
                         SFT dialogs and reward examples (train splits); built when
                         --taskmaster_dir names the published TM-4-2024 folder.
Both are deterministic (sentencepiece on one input order).
"""
import os
import tempfile

from absl import app
from absl import flags

from perl_jax import tokenizer
from perl_jax.tasks import reviews
from perl_jax.tasks import taskmaster

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def build(corpus, filename: str, vocab_size: int) -> None:
  prefix = os.path.join(ASSETS, filename)[: -len(".model")]
  path = tokenizer.train(corpus, prefix, vocab_size=vocab_size)
  os.remove(prefix + ".vocab")
  print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main(argv):
  del argv
  os.makedirs(ASSETS, exist_ok=True)
  build(reviews.corpus_for_tokenizer(), reviews.TOKENIZER, 256)
  if flags.FLAGS.taskmaster_dir:
    with tempfile.TemporaryDirectory() as data_dir:
      build(taskmaster.corpus_for_tokenizer(flags.FLAGS.taskmaster_dir, data_dir),
            taskmaster.TOKENIZER, 1024)


if __name__ == "__main__":
  flags.DEFINE_string("taskmaster_dir", "", "the published TM-4-2024 folder (data/, reward/)")
  app.run(main)
