"""Reward modelling end to end on a learnable preference set (jsonl fixtures in the published
generic format): LoRA and full tuning both learn it, and the saved head comes back."""
import json
import os

import jax
import numpy as np
import pytest

from perl_jax import config_base
from perl_jax import main
from perl_jax import reward as reward_lib
from perl_jax import roles
from perl_jax import sharding as sharding_lib
from perl_jax import common
from perl_jax.tasks import reviews


def _write_pairs(path, n, seed):
  """Review pairs whose chosen side has the clearly higher gold sentiment."""
  rows, examples = [], reviews.make_examples(4 * n, seed)
  for a, b in zip(examples[::2], examples[1::2]):
    ga, gb = reviews.gold_reward(a.response), reviews.gold_reward(b.response)
    if abs(ga - gb) < 0.5:
      continue
    chosen, rejected = (a, b) if ga > gb else (b, a)
    rows.append({"prompt": a.prompt, "chosen": chosen.response, "rejected": rejected.response})
  with open(path, "w") as f:
    for row in rows[:n]:
      f.write(json.dumps(row) + "\n")
    f.write('{"prompt": "Review of the latte:", "chosen": ""}\n')  # malformed: must be reported


def _config(tmp_path, rank):
  data_dir = tmp_path / "data"
  data_dir.mkdir(exist_ok=True)
  _write_pairs(data_dir / "train.jsonl", 512, seed=1)
  _write_pairs(data_dir / "test.jsonl", 128, seed=2)
  c = config_base.base_config()
  c.stages = ("reward",)
  c.model.backbone = "random"
  c.lora.rank = rank
  c.reward.data.manual_dir = str(data_dir)
  c.reward.train.steps, c.reward.train.batch_size = 20, 16  # ~0.85 held-out accuracy either way
  c.reward.train.eval_every = c.reward.train.checkpoint_every = 10
  c.reward.optim.lr = 3e-3 if rank else 1e-3
  c.reward.optim.warmup_steps = 5
  c.reward.pack = bool(rank)  # LoRA trains on packed rows, full tuning on padded ones
  return c


@pytest.mark.parametrize("rank", [8, 0], ids=["lora", "full"])
def test_reward_model_learns_preferences(tmp_path, rank):
  config = _config(tmp_path, rank)
  summary = main.run(config, str(tmp_path / "run"))
  result = summary["stages"]["reward"]
  assert result["eval_accuracy"] > 0.75, result
  assert result["rows_skipped"] == 2  # the malformed row of each file, reported not dropped
  assert result["pairs_used"] == 512
  assert result["train_step_compilations"] == 1  # 20 steps, one compilation
  assert (result["train_token_share"] < 0.8) if config.reward.pack else (
      result["train_token_share"] == 1.0)
  step_memory = result["train_step_memory"]  # per device, from the compiled step
  assert step_memory["peak_bytes"] > step_memory["temp_bytes"] > 0
  for key in ("eval_loss", "trainable_params", "total_params", "steps", "step_time_s"):
    assert key in summary, key
  if rank:
    assert result["trainable_percent"] < 5
    # The head is trained and saved with the adapter, and loads back onto the backbone.
    tok = common.load_tokenizer(config)
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    _, variables = roles.load_reward_model(config, str(tmp_path / "run"), tok, mesh)
    head = np.asarray(variables["adapter"]["score_head"]["kernel"])
    assert np.abs(head).max() > 0
    assert os.path.exists(tmp_path / "run" / "reward" / "best.json")
  else:
    assert result["trainable_percent"] == 100.0


def test_reward_data_max_len_sets_the_reward_stage_length(tmp_path):
  config = _config(tmp_path, rank=8)
  tok = common.load_tokenizer(config)
  *_, eval_arrays = reward_lib.load_data(config, str(tmp_path / "run"), tok)
  assert eval_arrays["tokens"].shape[-1] == config.data.max_len  # 0: the data's length
  config.reward.data.max_len = 2 * config.data.max_len
  *_, eval_arrays = reward_lib.load_data(config, str(tmp_path / "run"), tok)
  assert eval_arrays["tokens"].shape[-1] == 2 * config.data.max_len


def test_roc_auc_is_the_pairwise_ranking_probability():
  from perl_jax.reward import roc_auc
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=60), 1)  # rounded: ties count half
  labels = rng.random(60) < 0.7
  pos, neg = scores[labels], scores[~labels]
  pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
  assert abs(roc_auc(scores, labels) - pairwise) < 1e-12
  assert np.isnan(roc_auc(scores, np.ones(60, bool)))


def test_balanced_bce_gives_each_label_half_the_loss():
  import jax.numpy as jnp
  from perl_jax import losses
  from perl_jax.reward import class_balancing_weights
  labels = np.array([1, 1, 1, 0], np.float32)
  weights = class_balancing_weights(labels)
  np.testing.assert_allclose(weights, [2 / 3, 2 / 3, 2 / 3, 2.0])
  scores = jnp.array([[2.0], [1.0], [0.5], [0.3]])
  loss, _ = losses.preference_loss(scores, jnp.asarray(labels), weights=jnp.asarray(weights))
  per_row = np.log1p(np.exp(-np.array([2.0, 1.0, 0.5]))).mean(), np.log1p(np.exp(0.3))
  np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-6)
  with pytest.raises(ValueError, match="both labels"):
    class_balancing_weights(np.ones(3, np.float32))
