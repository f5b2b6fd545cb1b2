r"""How far can a Taskmaster Coffee reward model be from a bag of words, and how precisely does the
test split measure it?

  pip install scikit-learn       # this script only; perl_jax never needs it
  python experiments/taskmaster_rm_baseline.py --manual_dir=../shared/data/taskmaster-coffee \
      --auc=0.644,0.649          # ~20 s

Reads the released reward examples through the same `taskmaster` builder, rendering and split
as the reward stage (`reward.data.name=taskmaster`), fits TF-IDF + logistic regression (classes
balanced, as `reward.balance_classes`) on the training split, and scores the test split:
  - on the response alone, on the last context turn + the response, and on the whole rendered
    prompt + response (word 1-2-grams; the response's words marked apart from the prompt's);
  - the test split's ROC AUC standard error (Hanley & McNeil 1982) and a bootstrap 95% interval
    of each baseline's AUC, for the class counts the split holds;
  - with --auc, the same standard error for reward models' AUCs measured elsewhere (e.g. the
    270M LoRA reward models in experiments/README.md): a difference smaller than two of them is
    not a measured difference.
"""
import os
import sys
import tempfile

from absl import app, flags
import numpy as np

_MANUAL_DIR = flags.DEFINE_string("manual_dir", "../shared/data/taskmaster-coffee",
                                  "the TM-4-2024 folder (reward/reward_*.json)")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: a temporary folder)")
_AUC = flags.DEFINE_list("auc", [], "reward-model AUCs to put error bars on")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "bootstrap resamples of the test split")
_SEED = flags.DEFINE_integer("seed", 0, "bootstrap seed")


def bootstrap_interval(scores, labels, resamples: int, seed: int) -> tuple[float, float]:
  from sklearn.metrics import roc_auc_score
  rng = np.random.default_rng(seed)
  pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
  aucs = []
  for _ in range(resamples):  # resample each class on its own: both are always present
    rows = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
    aucs.append(roc_auc_score(labels[rows], scores[rows]))
  return tuple(np.percentile(aucs, [2.5, 97.5]))


def views(prefs) -> dict[str, list[str]]:
  """Text each baseline reads, per row. Response words get a prefix so that "Mocha" asked for
  and "Mocha" answered are different features."""
  response = [" ".join("R_" + w for w in r.split()) for r in prefs.chosen]
  # A prompt ends "...\nUser: {turn}\nAgent:": its last turn is the line before the cue.
  last_turn = ["\n".join(p.rstrip().split("\n")[-2:]) for p in prefs.prompts]
  return {"response": response,
          "last turn + response": [t + " " + r for t, r in zip(last_turn, response)],
          "prompt + response": [p + " " + r for p, r in zip(prefs.prompts, response)]}


def main(argv):
  del argv
  try:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
  except ImportError:
    raise SystemExit("this script needs scikit-learn: pip install scikit-learn")
  from perl_jax.data import loader
  from perl_jax.reward import roc_auc_standard_error

  data_dir = _DATA_DIR.value or tempfile.mkdtemp(prefix="taskmaster_tfds_")
  load = lambda split: loader.load_preferences("taskmaster", split, _MANUAL_DIR.value, data_dir)
  train, test = load("train"), load("test")
  y_train, y_test = train.labels > 0.5, test.labels > 0.5
  n_pos, n_neg = int(y_test.sum()), int((~y_test).sum())
  print(f"train {len(y_train)} rows ({int((~y_train).sum())} labelled 0), test {len(y_test)} rows "
        f"({n_neg} labelled 0)")
  print(f"\n| baseline (TF-IDF 1-2-grams + logistic regression) | test AUC | bootstrap 95% "
        f"| balanced accuracy |\n|---|---|---|---|")
  train_views, test_views = views(train), views(test)
  for name in train_views:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, token_pattern=r"[^\s\"{}\[\],:]+")
    x_train = vectorizer.fit_transform(train_views[name])
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
    model.fit(x_train, y_train)
    scores = model.decision_function(vectorizer.transform(test_views[name]))
    low, high = bootstrap_interval(scores, y_test, _BOOTSTRAP.value, _SEED.value)
    print(f"| {name} | {roc_auc_score(y_test, scores):.3f} | {low:.3f}-{high:.3f} | "
          f"{balanced_accuracy_score(y_test, scores > 0):.3f} |")
  print(f"\nROC AUC standard error on this test split ({n_pos} positives, {n_neg} negatives; "
        "Hanley & McNeil):")
  for auc in [0.65, 0.75, 0.85] + [float(a) for a in _AUC.value]:
    print(f"  AUC {auc:.3f}: +/- {roc_auc_standard_error(auc, n_pos, n_neg):.3f}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
