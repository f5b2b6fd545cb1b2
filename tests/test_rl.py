"""RL: roles over one backbone, KL at the start, and learning a programmatic reward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import config_base
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import rl
from perl_jax import roles
from perl_jax import sampling
from perl_jax import sharding as sharding_lib
from perl_jax.data import batching

GOOD_TOKENS = 64  # the reward is the fraction of completion tokens with id < 64 (1/8 of vocab)


def _reward_fn(variables, tokens, input_mask, prompt_len=4):
  del variables
  completion = tokens[:, prompt_len:]
  real = input_mask[:, prompt_len:]
  return jnp.sum((completion < GOOD_TOKENS) & real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)


def _setup(algorithm, steps=40, full_finetune=False):
  config = config_base.base_config()
  config.rl.algorithm = algorithm
  config.rl.prompts_per_step, config.rl.samples_per_prompt = 8, 4
  config.rl.train.steps, config.rl.train.batch_size = steps, 32
  config.rl.train.eval_every, config.rl.train.log_every = 0, 10
  config.rl.train.checkpoint_every = steps
  config.rl.optim.lr, config.rl.optim.warmup_steps = 1e-2, 2
  config.rl.kl_coef = 0.01
  config.rl.missing_eos_penalty = 0.0
  if algorithm == "ppo":
    config.rl.train.updates_per_batch = 2
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=0 if full_finetune else 8,
                          lora_targets=("attn/", "mlp/"))
  backbone = model_lib.init_variables(model, jax.random.key(0))["params"]
  trainable, frozen = rl.init_roles(model, backbone, full_finetune, 0,
                                    with_value=algorithm != "rloo")
  rows = [[2, 10 + i, 20 + i, 30 + i] for i in range(16)]
  tokens, mask = batching.pad_rows(rows, 4, 0, left=True)
  sample_cfg = sampling.SamplingConfig(8, temperature=1.0, eos_id=-1)  # fixed-length completions
  return config, model, trainable, frozen, {"tokens": tokens, "mask": mask}, sample_cfg


def test_policy_equals_anchor_at_start_and_kl_is_zero():
  config, model, trainable, frozen, prompts, sample_cfg = _setup("reinforce")
  rollout = sampling.sample(model, rl.policy_variables(trainable, frozen),
                            jnp.asarray(prompts["tokens"]), jnp.asarray(prompts["mask"]),
                            jax.random.key(0), sample_cfg)
  score = rl.make_scorer(model, _reward_fn, config.rl, 4, True, -1)
  scored = score(trainable, frozen, {}, rollout)
  np.testing.assert_array_equal(np.asarray(scored["policy_logprobs"]),
                                np.asarray(scored["anchor_logprobs"]))
  np.testing.assert_array_equal(np.asarray(scored["kl"]), 0.0)
  # Roles share the backbone: the anchor and policy variables hold the very same arrays.
  assert rl.anchor_variables(frozen)["params"] is rl.policy_variables(trainable, frozen)["params"]
  assert "params" not in trainable["policy"]
  leaves = lora_lib.flatten(trainable)
  assert all(p.endswith(("lora_a", "lora_b")) or "score_head" in p for p in leaves)
  # The evaluator reuses the anchor's samples for the policy exactly while this holds.
  assert bool(rl.policy_is_anchor(trainable, frozen))
  moved = jax.tree.map(lambda x: x + 0.01, trainable)  # lora_b no longer zero
  assert not bool(rl.policy_is_anchor(moved, frozen))
  full_trainable, full_frozen = _setup("reinforce", full_finetune=True)[2:4]
  assert bool(rl.policy_is_anchor(full_trainable, full_frozen))
  full_trainable["policy"]["params"] = jax.tree.map(lambda x: x * 1.5,
                                                    full_trainable["policy"]["params"])
  assert not bool(rl.policy_is_anchor(full_trainable, full_frozen))


def test_policy_started_from_an_sft_adapter_keeps_it_as_the_anchor():
  config, model, _, _, prompts, sample_cfg = _setup("reinforce")
  backbone = model_lib.init_variables(model, jax.random.key(0))["params"]
  fresh = model_lib.init_variables(model, jax.random.key(4))[lora_lib.ADAPTER]
  sft_adapter = jax.tree.map(lambda x: x + 0.05, fresh)  # a non-trivial SFT adapter
  trainable, frozen = rl.init_roles(model, backbone, False, 0, True, sft_adapter=sft_adapter)
  assert frozen["params"] is backbone  # the adapter is copied, never the backbone
  rollout = sampling.sample(model, rl.policy_variables(trainable, frozen),
                            jnp.asarray(prompts["tokens"]), jnp.asarray(prompts["mask"]),
                            jax.random.key(0), sample_cfg)
  scored = rl.make_scorer(model, _reward_fn, config.rl, 4, True, -1)(trainable, frozen, {},
                                                                      rollout)
  np.testing.assert_array_equal(np.asarray(scored["kl"]), 0.0)  # anchor = SFT adapter
  assert bool(rl.policy_is_anchor(trainable, frozen))  # its lora_b are not zero, yet it is
  trainable["policy"] = jax.tree.map(lambda x: x * 0.5, trainable["policy"])
  assert not bool(rl.policy_is_anchor(trainable, frozen))
  bare, _ = roles.token_logprobs(model, {"params": backbone}, rollout["tokens"],
                                 rollout["input_mask"], 4)
  assert float(jnp.abs(bare - scored["anchor_logprobs"]).max()) > 1e-3  # not the bare backbone


def test_nothing_after_eos_counts():
  config, model, trainable, frozen, prompts, _ = _setup("reinforce")
  adapter = jax.tree.map(lambda x: x + 0.05, trainable)  # a policy that differs from the anchor
  sample_cfg = sampling.SamplingConfig(8, temperature=1.0, eos_id=5)
  rollout = sampling.sample(model, rl.policy_variables(adapter, frozen),
                            jnp.asarray(prompts["tokens"]), jnp.asarray(prompts["mask"]),
                            jax.random.key(0), sample_cfg)
  cmask = rollout["completion_mask"]
  # Change every token after EOS (and their mask stays False): KL and loss must not move.
  tampered = dict(rollout)
  tampered["tokens"] = jnp.where(jnp.concatenate([jnp.ones((16, 4), bool), cmask], 1),
                                 rollout["tokens"], 77)
  score = rl.make_scorer(model, _reward_fn, config.rl, 4, True, 5)
  a, b = score(adapter, frozen, {}, rollout), score(adapter, frozen, {}, tampered)
  np.testing.assert_allclose(np.asarray(a["kl"]), np.asarray(b["kl"]), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["reinforce", "rloo", "ppo"])
def test_short_rl_run_raises_reward_with_bounded_kl(tmp_path, algorithm):
  config, model, trainable, frozen, prompts, sample_cfg = _setup(algorithm)
  mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
  result = rl.train_policy(name="rl", stage_dir=str(tmp_path), config=config, mesh=mesh,
                           writer=None, model=model, trainable=trainable, frozen=frozen,
                           reward_fn=_reward_fn, reward_variables={}, prompt_arrays=prompts,
                           sample_cfg=sample_cfg)
  rewards = [h["reward"] for h in result["history"]]
  kls = [h["kl"] for h in result["history"]]
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert first < 0.25  # about 1/8 by chance
  assert last > first + 0.15, rewards
  assert np.isfinite(kls).all() and max(kls) < 20.0


def test_rl_loss_honours_lora_dropout():
  b, p, n = 4, 4, 6
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(3, 512, (b, p + n)).astype(np.int32),
           "input_mask": np.ones((b, p + n), bool), "completion_mask": np.ones((b, n), bool),
           "returns": rng.normal(size=b).astype(np.float32),
           "rm_scores": np.zeros(b, np.float32), "kl": np.zeros(b, np.float32),
           "policy_logprobs": -np.ones((b, n), np.float32), "length": np.full(b, n, np.float32),
           "anchor_logprobs": -np.ones((b, n), np.float32)}
  build = lambda dropout: model_lib.build(model_lib.model_config("tiny"), lora_rank=4,
                                          lora_dropout=dropout)
  variables = jax.jit(lambda r: model_lib.init_variables(build(0.0), r, score_head=True))(
      jax.random.key(0))
  value_adapter = jax.tree.map(lambda x: x + 0.05, variables["adapter"])  # non-zero B and head
  policy_adapter = {k: v for k, v in value_adapter.items() if k != "score_head"}
  trainable = {"policy": {"adapter": policy_adapter}, "value": {"adapter": value_adapter}}
  frozen = {"params": variables["params"]}
  config = config_base.base_config()
  config.rl.algorithm = "reinforce"  # policy and value forwards in the loss (ppo: the same ones)
  batch["advantages"] = rng.normal(size=b).astype(np.float32)

  def metrics_for(dropout):
    loss_fn = jax.jit(rl.rl_loss_fn(build(dropout), config.rl, p))
    return [loss_fn(trainable, frozen, batch, jax.random.key(seed))[1] for seed in (0, 1)]

  first, second = metrics_for(0.0)  # no dropout: the rng plays no part
  for key in ("pg_loss", "value_loss"):
    assert float(first[key]) == float(second[key]), key
  first, second = metrics_for(0.3)  # the policy and the value forwards both drop out
  for key in ("pg_loss", "value_loss"):
    assert abs(float(first[key]) - float(second[key])) > 1e-6, key
