"""The `prefs` stage: preference pairs sampled from the anchor, labelled by the task's gold judge.

Two responses per prompt are sampled from the SFT backbone. Training labels are Bradley-Terry
draws from the gold scores (so they disagree with the gold order as human labels do); held-out
labels follow the gold order exactly, with ties dropped, so reward-model accuracy on them is
accuracy against the gold judge. Pairs are written as `train.jsonl` / `test.jsonl` in
WORKDIR/prefs, the manual dir of the `jsonl_preferences` TFDS builder.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from perl_jax import common
from perl_jax import distributed
from perl_jax import roles
from perl_jax import tasks


def _pairs(model, backbone, tok, prompts, config, rng):
  first, second = (roles.sample_texts(model, {"params": backbone}, tok, prompts, config,
                                      jax.random.fold_in(rng, i), config.prefs.temperature)
                   for i in (0, 1))
  return [(p, a, b) for (p, a), (_, b) in zip(first, second)]


def label_pairs(pairs, gold_reward, bt_scale: float, rng: np.random.Generator | None):
  """Rows {prompt, chosen, rejected, gold_chosen, gold_rejected}.

  With `rng`, the first response is chosen with probability sigmoid((g_a - g_b) / bt_scale);
  without, the gold order decides and ties are dropped. Identical responses are dropped.
  """
  rows = []
  for prompt, a, b in pairs:
    if a.strip() == b.strip() or not a.strip() or not b.strip():
      continue
    g_a, g_b = gold_reward(a), gold_reward(b)
    if rng is None:
      if g_a == g_b:
        continue
      a_first = g_a > g_b
    else:
      a_first = rng.random() < 1.0 / (1.0 + np.exp(-(g_a - g_b) / bt_scale))
    chosen, rejected = (a, b) if a_first else (b, a)
    rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                 "gold_chosen": max(g_a, g_b) if rng is None else (g_a if a_first else g_b),
                 "gold_rejected": min(g_a, g_b) if rng is None else (g_b if a_first else g_a)})
  return rows


def _write_jsonl(path, rows):
  if not distributed.is_primary():
    return
  with open(path + ".tmp", "w") as f:
    for row in rows:
      f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
  os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, workdir: str, mesh, writer) -> dict:
  del writer
  if not tasks.has_gold_judge(config.task):
    raise ValueError(f"the prefs stage labels pairs with the task's gold judge; task "
                     f"{config.task!r} has none: take 'prefs' out of config.stages and point "
                     f"config.reward.data at published preference data")
  task = tasks.get(config.task)
  prefs_cfg = config.prefs
  out_dir = os.path.join(workdir, "prefs")
  # A finished prefs stage of the same identity is skipped by main (perl_jax.identity); here the
  # pairs are (re)sampled.
  os.makedirs(out_dir, exist_ok=True)
  tok = common.load_tokenizer(config)
  model = common.build_model(config, common.model_cfg(config, tok.vocab_size), lora_rank=0)
  backbone = roles.backbone_for(config, workdir, model, mesh)
  rng = jax.random.key(config.seed + 100)
  train_prompts = task.train_prompts(prefs_cfg.num_train_prompts, seed=config.seed + 3)
  eval_prompts = task.eval_prompts(prefs_cfg.num_eval_prompts)
  train_rows = label_pairs(_pairs(model, backbone, tok, train_prompts, config,
                                  jax.random.fold_in(rng, 0)),
                           task.gold_reward, prefs_cfg.bt_scale, np.random.default_rng(config.seed))
  eval_rows = label_pairs(_pairs(model, backbone, tok, eval_prompts, config,
                                 jax.random.fold_in(rng, 1)), task.gold_reward, prefs_cfg.bt_scale,
                          None)
  _write_jsonl(os.path.join(out_dir, "train.jsonl"), train_rows)
  _write_jsonl(os.path.join(out_dir, "test.jsonl"), eval_rows)
  agree = np.mean([r["gold_chosen"] > r["gold_rejected"] for r in train_rows])
  stats = {"train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
           "train_labels_agreeing_with_gold": float(agree),
           "anchor_gold_reward": float(np.mean([r["gold_chosen"] + r["gold_rejected"]
                                                for r in eval_rows]) / 2)}
  print(f"[prefs] {len(train_rows)} train / {len(eval_rows)} held-out pairs in {out_dir}; "
        f"{100 * agree:.0f}% of train labels agree with the gold judge", flush=True)
  common.write_json(os.path.join(out_dir, "stats.json"), stats)
  return stats
