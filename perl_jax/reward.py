"""The `reward` stage: a reward model (backbone + scalar head at the last real token) trained on
preferences, by LoRA (adapter + head) or, with lora.rank=0, by tuning every weight.

Pairwise data uses the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), with chosen
and rejected scored in one forward pass; pointwise 0/1 data (Taskmaster) uses binary cross-entropy
on the score as a logit.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import common
from perl_jax import distributed
from perl_jax import evaluation
from perl_jax import lora as lora_lib
from perl_jax import losses
from perl_jax import packing
from perl_jax import roles
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib
from perl_jax.data import batching
from perl_jax.progress import Progress


def encode_preferences(tok, prefs, max_len: int) -> dict:
  """{"tokens", "input_mask": [N, K, L], "label": [N]}; K = 2 (chosen, rejected) or 1.

  Each sequence is BOS prompt response EOS, right-padded; long ones keep the start of the prompt
  and the end of the response (see batching.truncate_pair).
  """
  columns = [prefs.chosen] if prefs.kind == "pointwise" else [prefs.chosen, prefs.rejected]
  tokens, masks = [], []
  for responses in columns:
    rows = []
    for prompt, response in zip(prefs.prompts, responses):
      p, r = batching.truncate_pair(tok.encode_prompt(prompt), tok.encode_response(response),
                                    max_len)
      rows.append(p + r)
    t, m = batching.pad_rows(rows, max_len, tok.pad_id)
    tokens.append(t)
    masks.append(m)
  return {"tokens": np.stack(tokens, 1), "input_mask": np.stack(masks, 1),
          "label": np.asarray(prefs.labels, np.float32)}


def reward_loss_fn(model, margin: float):
  def loss_fn(trainable, frozen, batch, rng):
    scores = roles.sequence_scores(model, {**frozen, **trainable}, batch["tokens"],
                                   batch["input_mask"], deterministic=False, rng=rng)
    return losses.preference_loss(scores, batch["label"], margin, batch.get("weight"))
  return loss_fn


def packed_reward_grads_fn(model, margin: float, accum_steps: int = 1):
  """The reward step's loss, metrics and gradients on a packed batch (perl_jax.packing): its
  chunks that hold rows, one at a time (a while loop: the row count varies by step, the shapes
  do not), each adding its examples' weighted losses and their gradients. The padded step's
  loss, metrics and gradients, accum_steps micro-batches included (tests/test_packing.py)."""
  def chunk_loss(trainable, frozen, chunk, rng):
    scores = roles.packed_scores(model, {**frozen, **trainable}, chunk, deterministic=False,
                                 rng=rng)
    terms = losses.preference_terms(scores.reshape(-1, scores.shape[-1]),
                                    chunk["label"].reshape(-1), margin)
    return jnp.sum(terms * chunk["weight"].reshape(-1)), scores

  chunk_grads = jax.value_and_grad(chunk_loss, has_aux=True)

  def grads_fn(trainable, frozen, batch, rng):
    def body(c, carry):
      loss, grads, scores = carry
      chunk = packing.chunk_at(batch, c)
      (chunk_sum, chunk_scores), g = chunk_grads(trainable, frozen, chunk,
                                                 jax.random.fold_in(rng, c))
      return (loss + chunk_sum, jax.tree.map(jnp.add, grads, g),
              jax.lax.dynamic_update_index_in_dim(scores, chunk_scores, c, 1))

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)  # f32 sums
    scores = jnp.zeros(batch["score_index"].shape, jnp.float32)
    loss, grads, scores = jax.lax.fori_loop(0, batch["chunk_count"][0], body,
                                            (jnp.zeros((), jnp.float32), zeros, scores))
    flat = lambda x: x.reshape((-1,) + x.shape[3:])
    # The padded step averages its micro-batches' metrics; so does this one.
    per_micro = [losses.preference_loss(flat(scores), flat(batch["label"]), margin,
                                        mask=flat(batch["block_mask"] & (batch["micro"] == j)))[1]
                 for j in range(accum_steps)]
    metrics = jax.tree.map(lambda *m: sum(m) / accum_steps, *per_micro)
    return (loss, metrics), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
  return grads_fn


def class_balancing_weights(labels: np.ndarray) -> np.ndarray:
  """Per-row weights giving each 0/1 label half of the total: n / (2 * count of its label)."""
  positive = labels > 0.5
  counts = {True: positive.sum(), False: (~positive).sum()}
  if not counts[True] or not counts[False]:
    raise ValueError("reward.balance_classes needs both labels in the training split, got only "
                     f"{'1' if counts[True] else '0'}")
  return np.where(positive, len(labels) / (2 * counts[True]),
                  len(labels) / (2 * counts[False])).astype(np.float32)


def evaluate(scores_of, trainable, arrays: dict, margin: float) -> dict:
  """Metrics over every held-out row; scores_of(trainable, arrays) -> scores [N, K]."""
  scores = scores_of(trainable, arrays)
  loss, metrics = losses.preference_loss(jnp.asarray(scores), jnp.asarray(arrays["label"]),
                                         margin)
  metrics = {k: float(v) for k, v in metrics.items()}
  metrics["loss"] = float(loss)
  if scores.shape[1] == 1:  # pointwise labels are imbalanced: report balanced accuracy too
    predicted, labels = scores[:, 0] > 0, arrays["label"] > 0.5
    recalls = [np.mean(predicted[labels == c] == c) for c in (True, False) if np.any(labels == c)]
    metrics["balanced_accuracy"] = float(np.mean(recalls))
    metrics["auc"] = roc_auc(scores[:, 0], labels)
  return metrics


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative), ties half: the Mann-Whitney U
  statistic over n_pos * n_neg; NaN unless both classes are present. RL needs the ranking, not
  the threshold."""
  positives, negatives = scores[labels], scores[~labels]
  if not len(positives) or not len(negatives):
    return float("nan")
  u = scipy.stats.mannwhitneyu(positives, negatives, alternative="two-sided").statistic
  return float(u / (len(positives) * len(negatives)))


def roc_auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
  """Standard error of an ROC AUC measured on n_pos positives and n_neg negatives (Hanley &
  McNeil 1982): how far apart two AUCs on the same rows must be to differ measurably."""
  q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
  var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
  return float(np.sqrt(var / (n_pos * n_neg)))


def _data_dirs(config, workdir):
  dcfg = config.reward.data
  manual_dir = dcfg.manual_dir or (os.path.join(workdir, "prefs")
                                   if dcfg.name == "jsonl_preferences" else "")
  if not manual_dir:
    raise ValueError(f"config.reward.data.manual_dir is required for dataset {dcfg.name!r}")
  return manual_dir, dcfg.data_dir or os.path.join(workdir, "tfds")


def _collapsed(metrics: dict) -> bool:
  """Every row scored alike: a saturated reward model (its pairs all tie)."""
  return float(metrics["reward_std"]) <= 1e-6 * max(1.0, abs(float(metrics["reward_mean"])))


def load_data(config, workdir, tok):
  # Imported here: TFDS is slow to import and only stages that read preference data need it.
  from perl_jax.data import loader
  dcfg = config.reward.data
  manual_dir, data_dir = _data_dirs(config, workdir)
  load = lambda split: loader.load_preferences(
      dcfg.name, split=split, manual_dir=manual_dir, data_dir=data_dir, config=dcfg.config or None,
      allow_partial=dcfg.allow_partial)
  train_prefs, eval_prefs = load(dcfg.train_split), load(dcfg.eval_split)
  for split, prefs in ((dcfg.train_split, train_prefs), (dcfg.eval_split, eval_prefs)):
    if prefs.rows_skipped:
      shown = "\n  ".join(prefs.skipped[:10])
      print(f"[reward] {dcfg.name}/{split}: skipped {prefs.rows_skipped} malformed rows:\n  "
            f"{shown}", flush=True)
  if train_prefs.kind not in ("pairwise", "pointwise"):
    raise ValueError(f"{dcfg.name} holds {train_prefs.kind}, not preference pairs or 0/1 "
                     f"reward labels: the reward stage cannot train on it")
  max_len = dcfg.max_len or config.data.max_len
  train_arrays = encode_preferences(tok, train_prefs, max_len)
  if config.reward.balance_classes:
    if train_prefs.kind != "pointwise":
      raise ValueError("reward.balance_classes applies to pointwise 0/1 data only; "
                       f"{dcfg.name} is {train_prefs.kind}")
    train_arrays["weight"] = class_balancing_weights(train_arrays["label"])
  eval_arrays = encode_preferences(tok, eval_prefs, max_len)
  eval_arrays = {k: v[:dcfg.max_eval_rows] for k, v in eval_arrays.items()}
  return train_prefs, eval_prefs, train_arrays, eval_arrays


def packed_scores_fn(model, frozen):
  """jit of (trainable, packed batch) -> scores [r, C, M, K] of every chunk that holds rows."""
  def scores_of(trainable, frozen, batch):
    def body(c, scores):
      chunk = packing.chunk_at(batch, c)
      return jax.lax.dynamic_update_index_in_dim(
          scores, roles.packed_scores(model, {**frozen, **trainable}, chunk), c, 1)
    return jax.lax.fori_loop(0, batch["chunk_count"][0], body,
                             jnp.zeros(batch["score_index"].shape, jnp.float32))
  jitted = jax.jit(scores_of)
  return lambda trainable, batch: jitted(trainable, frozen, batch)  # frozen: an argument


def eval_scores_fn(config, eval_arrays: dict, model, frozen, mesh):
  """scores_of(trainable, arrays) -> [N, K] for `evaluate`: held-out examples in order, in
  batches of reward.eval_batch_size, packed like training (reward.pack) or padded."""
  reward_cfg = config.reward
  if not reward_cfg.pack:
    jitted = jax.jit(lambda t, f, b: roles.sequence_scores(model, {**f, **t}, b["tokens"],
                                                           b["input_mask"]))
    return lambda trainable, arrays: evaluation.per_row(
        lambda batch: {"scores": jitted(trainable, frozen, batch)}, arrays,
        reward_cfg.eval_batch_size, mesh, "reward")["scores"]
  _, num_seqs, length = eval_arrays["tokens"].shape
  n, size = len(eval_arrays["label"]), reward_cfg.eval_batch_size
  batches = [np.arange(start, min(start + size, n)) for start in range(0, n, size)]
  plan = packing.plan(eval_arrays, batches, reward_cfg.pack_row_len or num_seqs * length,
                      reward_cfg.pack_chunk_rows, sharding_lib.batch_divisor(mesh))
  score = packed_scores_fn(model, frozen)

  def scores_of(trainable, arrays):
    progress, out = Progress("reward", "evaluating", n, "rows"), []
    for index in batches:
      packed = packing.pack(arrays, index, plan)
      scores = distributed.to_host(score(trainable, sharding_lib.put_batch(packed, mesh)))
      out.append(packing.unpack_scores(np.asarray(scores), packed, len(index)))
      progress.update(index[-1] + 1)
    return np.concatenate(out)
  return scores_of


def train_batches(config, train_arrays: dict, model, mesh):
  """How the reward step trains: {"loss_fn" or "grads_fn", "batch_at"} for train.fit and the
  share of the padded step's token slots it runs; packed rows (reward.pack) or padded ones,
  over the same examples in the same order."""
  reward_cfg, train_cfg = config.reward, config.reward.train
  if not reward_cfg.pack:
    return {"loss_fn": reward_loss_fn(model, reward_cfg.margin),
            "batch_at": lambda s: batching.batch_at(train_arrays, s, train_cfg.batch_size,
                                                    config.seed)}, 1.0
  _, num_seqs, length = train_arrays["tokens"].shape
  plan = packing.train_plan(train_arrays, train_cfg.steps, train_cfg.batch_size, config.seed,
                            reward_cfg.pack_row_len or num_seqs * length,
                            reward_cfg.pack_chunk_rows, sharding_lib.batch_divisor(mesh))
  print(f"[reward] packed: rows of {plan.row_len} tokens (at most {plan.blocks_per_row} "
        f"examples each), run {plan.chunk_rows} at a time, up to {plan.rows} a step, in place "
        f"of {train_cfg.batch_size * num_seqs} rows of {length}: {plan.token_share:.0%} of the "
        f"token slots over the {train_cfg.steps} steps", flush=True)
  n = len(train_arrays["label"])
  return {"loss_fn": None,
          "grads_fn": packed_reward_grads_fn(model, reward_cfg.margin, train_cfg.accum_steps),
          "batch_at": lambda s: packing.pack(
              train_arrays, batching.batch_rows(n, s, train_cfg.batch_size, config.seed), plan,
              train_cfg.accum_steps)}, plan.token_share


def run(config: ml_collections.ConfigDict, workdir: str, mesh, writer) -> dict:
  reward_cfg = config.reward
  tok = common.load_tokenizer(config)
  model = common.build_model(config, common.model_cfg(config, tok.vocab_size))
  train_prefs, eval_prefs, train_arrays, eval_arrays = load_data(config, workdir, tok)
  variables = roles.reward_model_variables(config, workdir, model, mesh)
  full_finetune = config.lora.rank == 0
  trainable, frozen = lora_lib.split_variables(variables, full_finetune)
  report = common.param_report(trainable, frozen)
  print(f"[reward] {train_prefs.kind} data: {len(train_prefs.prompts)} train / "
        f"{len(eval_arrays['label'])} eval rows; training "
        f"{'every weight' if full_finetune else f'LoRA rank {config.lora.rank} + head'}: "
        f"{report['trainable_params']:,} of {report['total_params']:,} params "
        f"({report['trainable_percent']:.3f}%)", flush=True)

  stage_dir = os.path.join(workdir, "reward")
  # The best-validation model is kept by hand, not by orbax's best_fn: it is chosen at each
  # evaluation (eval_every), which need not be a checkpoint step, and later stages load only its
  # adapter (+ head) as a plain tree.
  best_path, best_info_path = os.path.join(stage_dir, "best"), os.path.join(stage_dir, "best.json")
  # Pairs: held-out pair accuracy. Pointwise 0/1 labels: ROC AUC, the ranking RL uses (accuracy
  # there mostly counts the majority class: a model calling every row 1 scores 86% on Taskmaster).
  select_by = "auc" if train_prefs.kind == "pointwise" else "accuracy"
  best = json.load(open(best_info_path)) if os.path.exists(best_info_path) else {}
  best.setdefault("accuracy", -1.0)
  scores_of = eval_scores_fn(config, eval_arrays, model, frozen, mesh)

  def eval_fn(trainable):
    metrics = evaluate(scores_of, trainable, eval_arrays, reward_cfg.margin)
    # Keep the best-validation reward model; never one that scores every row alike (collapsed).
    # AUC is undefined (NaN) on a held-out slice with one class: then accuracy decides.
    key = select_by if np.isfinite(metrics[select_by]) else "accuracy"
    if metrics[key] > best.get(key, -1.0) and not _collapsed(metrics):
      checkpoint_lib.save_tree(best_path, trainable)
      best.update(metrics, selected_by=key)
      common.write_json(best_info_path, best)
    return metrics

  step_fns, token_share = train_batches(config, train_arrays, model, mesh)
  result = train_lib.fit(
      name="reward", workdir=stage_dir, train_cfg=reward_cfg.train,
      optim_cfg=common.optim_for(reward_cfg.optim, full_finetune),
      seed=config.seed, mesh=mesh, trainable=trainable, frozen=frozen, **step_fns,
      eval_fn=eval_fn, meta={"stage": "reward", "model": config.model.to_dict(),
                             "lora": config.lora.to_dict()}, writer=writer,
      collapsed=_collapsed)
  final_eval = {k[len("eval_"):]: v for k, v in result["history"][-1].items()
                if k.startswith("eval_")} if result["history"] else evaluate(
                    scores_of, result["state"]["trainable"], eval_arrays, reward_cfg.margin)
  summary = {f"eval_{k}": v for k, v in final_eval.items()}
  summary.update({"best_eval_accuracy": best["accuracy"], "best_selected_by": select_by,
                  **({"best_eval_auc": best.get("auc")} if select_by == "auc" else {}),
                  "steps": result["steps"],
                  "step_time_s": result["step_time_s"], "pairs_used": len(train_prefs.prompts),
                  "rows_skipped": train_prefs.rows_skipped + eval_prefs.rows_skipped,
                  "train_loss": result["final_metrics"].get("loss"), "data_kind": train_prefs.kind,
                  "train_step_compilations": result["train_step_compilations"],
                  "train_token_share": token_share,
                  "train_step_memory": result["step_memory"],
                  **report})
  print(f"[reward] eval accuracy {summary['eval_accuracy']:.3f} (best by {select_by}: "
        f"{best.get(select_by, float('nan')):.3f}), eval loss {summary['eval_loss']:.4f}",
        flush=True)
  return summary
