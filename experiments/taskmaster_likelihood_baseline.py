r"""Does the 270M model's own likelihood of a Taskmaster Coffee response separate the released
reward labels, with no reward training at all?

  python experiments/taskmaster_likelihood_baseline.py \
      --manual_dir=../shared/data/taskmaster-coffee --backbone=RUN_WORKDIR [--split=train]

Reads the released reward examples through the same `taskmaster` builder, chat rendering,
truncation (`batching.truncate_pair`, --max_len) and split as the reward stage of
configs/paper/gemma3_270m.py, and scores each row by log p(response tokens | context) under the
SFT backbone a finished `taskmaster_rl` run saved in RUN_WORKDIR/sft (or the released Gemma 3
270M with --backbone=released): the summed, mean and least token log-probability of the
response (its <end_of_turn> included). Prints each score's ROC AUC against the 0/1 labels with
its Hanley & McNeil standard error. The test split has 36 negatives; the training split (2,876
rows, never seen by this score) measures the same AUC about three times more precisely.
"""
import os
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

_MANUAL_DIR = flags.DEFINE_string("manual_dir", "../shared/data/taskmaster-coffee",
                                  "the TM-4-2024 folder (reward/reward_*.json)")
_BACKBONE = flags.DEFINE_string("backbone", "released",
                                "'released' (the pretrained 270M) or a workdir with sft/backbone")
_SPLIT = flags.DEFINE_string("split", "test", "reward split to score: test or train")
_MAX_LEN = flags.DEFINE_integer("max_len", 384, "tokens per row (as --config.data.max_len)")
_RESPONSE_LEN = flags.DEFINE_integer("response_len", 96,
                                     "response tokens scored per row (longer ones: the first)")
_BATCH = flags.DEFINE_integer("batch", 8, "rows per forward pass")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: a temporary folder)")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from perl_jax import common, roles, sharding as sharding_lib
  from perl_jax import logprobs as logprobs_lib
  from perl_jax import reward as reward_lib
  from perl_jax.data import batching, loader
  from configs.paper import gemma3_270m

  config = gemma3_270m.get_config("task=taskmaster_rm")
  config.data.max_len = length = _MAX_LEN.value
  tok = common.load_tokenizer(config)
  mesh = sharding_lib.make_mesh()
  prefs = loader.load_preferences("taskmaster", _SPLIT.value, _MANUAL_DIR.value,
                                  _DATA_DIR.value or tempfile.mkdtemp(prefix="taskmaster_tfds_"))
  model = common.build_model(config, common.model_cfg(config, tok.vocab_size), lora_rank=0)
  if _BACKBONE.value == "released":
    params = roles.load_released(config, mesh)
  else:
    params = roles.load_backbone(os.path.join(_BACKBONE.value, "sft"), model, mesh)

  rows, starts = [], []
  for prompt, response in zip(prefs.prompts, prefs.chosen):
    p, r = batching.truncate_pair(tok.encode_prompt(prompt), tok.encode_response(response),
                                  length)
    rows.append(p + r)
    starts.append(len(p))
  tokens, mask = batching.pad_rows(rows, length, tok.pad_id)
  labels = np.asarray(prefs.labels) > 0.5
  span = _RESPONSE_LEN.value

  @jax.jit
  def response_logprobs(params, tokens, mask, starts):
    hidden = roles._forward(model, {"params": params}, tokens, mask)["hidden"]
    # Hidden state t predicts token t + 1: the response's tokens are predicted from start - 1 on.
    offsets = starts[:, None] - 1 + jnp.arange(span)[None]
    at = jnp.clip(offsets, 0, length - 2)
    targets = jnp.take_along_axis(tokens, at + 1, axis=1)
    valid = jnp.take_along_axis(mask, at + 1, axis=1) & (offsets <= length - 2)
    logp, _ = logprobs_lib.token_logprobs(
        model.cfg, params, jnp.take_along_axis(hidden, at[..., None], axis=1), targets)
    return logp, valid

  batch, n = _BATCH.value, len(rows)
  logps, valids, t0 = [], [], time.time()
  for i in range(0, n, batch):
    rows_here = slice(i, min(n, i + batch))
    pad = batch - (rows_here.stop - rows_here.start)
    fill = lambda a, v: np.concatenate([a[rows_here], np.full((pad,) + a.shape[1:], v, a.dtype)])
    logp, valid = response_logprobs(params, jnp.asarray(fill(tokens, 0)),
                                    jnp.asarray(fill(mask, False)),
                                    jnp.asarray(fill(np.asarray(starts, np.int32), 1)))
    logps.append(np.asarray(logp)[:batch - pad])
    valids.append(np.asarray(valid)[:batch - pad])
    if (i // batch) % 20 == 0:
      print(f"[likelihood] {i + batch}/{n} rows, {time.time() - t0:.0f} s", flush=True)
  logp, valid = np.concatenate(logps), np.concatenate(valids)
  total = np.where(valid, logp, 0).sum(1)
  scores = {"sum": total, "mean": total / np.maximum(valid.sum(1), 1),
            "min": np.where(valid, logp, 0).min(1)}
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  print(f"\n{_SPLIT.value} split: {n} rows ({n_neg} labelled 0), {length} tokens, backbone "
        f"{_BACKBONE.value}, {time.time() - t0:.0f} s\n\n| response log-prob | ROC AUC | "
        f"standard error |\n|---|---|---|")
  for name, score in scores.items():
    auc = reward_lib.roc_auc(score, labels)
    print(f"| {name} | {auc:.3f} | {reward_lib.roc_auc_standard_error(auc, n_pos, n_neg):.3f} |")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
