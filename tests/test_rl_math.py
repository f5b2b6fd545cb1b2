"""The RL math pinned by hand-computed values: returns, advantages and the terms of the RL loss.

The running example: 2 episodes x 3 completion tokens. Episode 0 uses all three tokens; episode
1 emitted EOS at its 2nd token, so its 3rd is padding (completion mask 0) and carries values that
would show if padding leaked in. beta (rl.kl_coef) = 0.1.

  reward-model scores      r  = [2.0, -1.0]
  policy log-probs            = [[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]
  anchor log-probs            = [[-1.5, -1.0, -0.5], [-1.0, -1.2, -9.0]]
  k1 = policy - anchor        = [[ 0.5, -1.0,  0.0], [-0.5,  1.0, (6.0, padding)]]
  summed k1 KL per episode    = [-0.5, 0.5]
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import config_base
from perl_jax import model as model_lib
from perl_jax import rl
from perl_jax import roles

BETA = 0.1
CMASK = np.asarray([[1, 1, 1], [1, 1, 0]], np.float32)
VALUES = np.asarray([[0.5, 0.4, 0.3], [-0.5, -0.2, 7.0]], np.float32)  # 7.0: padding


def _scored(**extra):
  return {"rm_scores": jnp.asarray([2.0, -1.0]),
          "policy_logprobs": jnp.asarray([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]),
          "anchor_logprobs": jnp.asarray([[-1.5, -1.0, -0.5], [-1.0, -1.2, -9.0]]),
          "values": jnp.asarray(VALUES), **extra}


def _rl_cfg(**overrides):
  rl_cfg = config_base.base_config().rl
  rl_cfg.kl_coef = BETA
  rl_cfg.kl_mode, rl_cfg.whiten_rewards, rl_cfg.whiten_advantages = "reward", False, False
  rl_cfg.samples_per_prompt = 2
  rl_cfg.gamma, rl_cfg.gae_lambda = 1.0, 0.5
  rl_cfg.update(overrides)
  return rl_cfg


def _shape(**overrides):
  returns, token_rewards = rl.shape_returns(_scored(), jnp.asarray(CMASK), _rl_cfg(**overrides))
  return np.asarray(returns), np.asarray(token_rewards)


# ----------------------------------------------------------------------------- returns


def test_kl_in_the_reward_enters_each_token_and_the_task_reward_the_last_real_one():
  returns, token_rewards = _shape(kl_mode="reward")
  # Per token: -beta * k1; plus (1 - beta) * r at each episode's last real token.
  #   episode 0: [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 0.9 * 2.0]  = [-0.05, 0.1, 1.8]
  #   episode 1: [-0.1 * -0.5, -0.1 * 1.0 + 0.9 * -1.0, 0 (padding)] = [0.05, -1.0, 0.0]
  np.testing.assert_allclose(token_rewards, [[-0.05, 0.1, 1.8], [0.05, -1.0, 0.0]],
                             rtol=1e-6, atol=1e-7)
  # The return is the PERL objective (1 - beta) * r - beta * sum KL:
  #   0.9 * 2.0 - 0.1 * (-0.5) = 1.85;  0.9 * -1.0 - 0.1 * 0.5 = -0.95
  np.testing.assert_allclose(returns, [1.85, -0.95], rtol=1e-6)


def test_kl_in_the_loss_leaves_only_the_task_reward_in_the_return():
  returns, token_rewards = _shape(kl_mode="loss")
  np.testing.assert_allclose(token_rewards, [[0.0, 0.0, 1.8], [0.0, -0.9, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(returns, [1.8, -0.9], rtol=1e-6)  # (1 - beta) * r


def test_whitened_rewards_are_standardised_before_the_kl_is_added():
  returns, token_rewards = _shape(whiten_rewards=True)
  # r = [2, -1]: mean 0.5, population std 1.5 -> [1, -1]; (1 - beta) * [1, -1] = [0.9, -0.9]
  np.testing.assert_allclose(token_rewards, [[-0.05, 0.1, 0.9], [0.05, -1.0, 0.0]],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(returns, [0.95, -0.95], rtol=1e-5)


# ----------------------------------------------------------------------------- advantages


def _advantages(algorithm, **overrides):
  rl_cfg = _rl_cfg(algorithm=algorithm, **overrides)
  scored, cmask = _scored(), jnp.asarray(CMASK)
  returns, token_rewards = rl.shape_returns(scored, cmask, rl_cfg)
  return {k: np.asarray(v) for k, v in
          rl.advantages_for(scored, returns, token_rewards, cmask, rl_cfg).items()}


def test_reinforce_advantage_is_the_return_minus_the_prompt_value():
  out = _advantages("reinforce")
  assert set(out) == {"advantages"}
  # returns [1.85, -0.95] minus V(prompt) = values[:, 0] = [0.5, -0.5]
  np.testing.assert_allclose(out["advantages"], [1.35, -0.45], rtol=1e-6)
  # Whitened: mean 0.45, deviations [0.9, -0.9], population std 0.9 -> [1, -1].
  whitened = _advantages("reinforce", whiten_advantages=True)["advantages"]
  np.testing.assert_allclose(whitened, [1.0, -1.0], rtol=1e-5)


def test_reinforce_advantage_with_kl_in_the_loss():
  # returns [1.8, -0.9] (no KL in them) minus [0.5, -0.5]
  out = _advantages("reinforce", kl_mode="loss")
  np.testing.assert_allclose(out["advantages"], [1.3, -0.4], rtol=1e-6)


def test_rloo_advantage_is_the_return_minus_the_other_samples_mean():
  # One prompt, k = 2 samples: A_i = R_i - R_j = [1.85 - (-0.95), -0.95 - 1.85]
  out = _advantages("rloo")
  assert set(out) == {"advantages"}
  np.testing.assert_allclose(out["advantages"], [2.8, -2.8], rtol=1e-6)
  # Four episodes, prompt-major (a prompt's k = 2 samples adjacent): groups [1, 3], [-2, 5].
  rl_cfg = _rl_cfg(algorithm="rloo")
  returns = jnp.asarray([1.0, 3.0, -2.0, 5.0])
  adv = rl.advantages_for({}, returns, None, None, rl_cfg)["advantages"]
  np.testing.assert_allclose(np.asarray(adv), [-2.0, 2.0, -7.0, 7.0], rtol=1e-6)


def test_ppo_gae_advantages_and_value_targets():
  out = _advantages("ppo")  # gamma 1, lambda 0.5, values [[.5, .4, .3], [-.5, -.2, pad]]
  # Token rewards (KL in the reward): [[-0.05, 0.1, 1.8], [0.05, -1.0, 0]].
  # delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last real token:
  #   episode 0: [-0.05 + 0.4 - 0.5, 0.1 + 0.3 - 0.4, 1.8 + 0 - 0.3] = [-0.15, 0.0, 1.5]
  #   episode 1: [0.05 - 0.2 + 0.5, -1.0 + 0 + 0.2]                  = [0.35, -0.8]
  # A_t = delta_t + gamma * lambda * A_{t+1}:
  #   episode 0: A_2 = 1.5, A_1 = 0 + 0.5 * 1.5 = 0.75, A_0 = -0.15 + 0.5 * 0.75 = 0.225
  #   episode 1: A_1 = -0.8, A_0 = 0.35 + 0.5 * -0.8 = -0.05, padding 0
  expected = np.asarray([[0.225, 0.75, 1.5], [-0.05, -0.8, 0.0]])
  np.testing.assert_allclose(out["advantages"], expected, rtol=1e-5, atol=1e-6)
  # Value targets A + V on real tokens, 0 on padding (the 7.0 never enters).
  np.testing.assert_allclose(out["token_returns"], [[0.725, 1.15, 1.8], [-0.55, -1.0, 0.0]],
                             rtol=1e-5, atol=1e-6)
  # Whitened over the five real tokens only (mean 0.325, population variance 0.5955),
  # padding stays 0.
  whitened = _advantages("ppo", whiten_advantages=True)["advantages"]
  real = np.asarray([0.225, 0.75, 1.5, -0.05, -0.8])
  z = (real - 0.325) / np.sqrt(0.5955)
  np.testing.assert_allclose(whitened, [z[:3], [z[3], z[4], 0.0]], rtol=1e-5, atol=1e-6)


def test_ppo_with_kl_in_the_loss_has_only_the_task_reward_in_gae():
  out = _advantages("ppo", kl_mode="loss")
  # Token rewards [[0, 0, 1.8], [0, -0.9, 0]]:
  #   deltas ep 0: [0.4 - 0.5, 0.3 - 0.4, 1.8 - 0.3] = [-0.1, -0.1, 1.5]
  #     A = [-0.1 + 0.5 * 0.65, -0.1 + 0.5 * 1.5, 1.5] = [0.225, 0.65, 1.5]
  #   deltas ep 1: [-0.2 + 0.5, -0.9 + 0.2] = [0.3, -0.7];  A = [0.3 - 0.35, -0.7] = [-0.05, -0.7]
  np.testing.assert_allclose(out["advantages"], [[0.225, 0.65, 1.5], [-0.05, -0.7, 0.0]],
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny():
  """A tiny LoRA model with random non-trivial weights everywhere (policy differs from the
  anchor; value adapter and head non-zero), no init compile; batch: 2 episodes, prompt 4 + 3
  completion tokens, episode 1 padded after its EOS. Also the policy's log-probs and the value
  model's values of that batch, from one jitted forward of each."""
  model = model_lib.build(model_lib.model_config("tiny"), lora_rank=4)
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0),
                                                           score_head=True))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                           shapes)
  value_adapter = variables["adapter"]
  policy_adapter = {k: v for k, v in value_adapter.items() if k != "score_head"}
  trainable = {"policy": {"adapter": policy_adapter}, "value": {"adapter": value_adapter}}
  frozen = {"params": variables["params"]}
  tokens = np.asarray([[2, 11, 12, 13, 40, 41, 42], [2, 21, 22, 23, 50, 1, 0]], np.int32)
  input_mask = np.asarray([[1] * 7, [1] * 6 + [0]], bool)

  @jax.jit
  def forward(trainable, frozen, tokens, input_mask):
    logprobs, _ = roles.token_logprobs(model, rl.policy_variables(trainable, frozen), tokens,
                                       input_mask, 4)
    values = roles.token_values(model, rl.value_variables(trainable, frozen), tokens,
                                input_mask, 4)
    return logprobs, values

  logprobs, values = (np.asarray(x, np.float64) for x in forward(trainable, frozen, tokens,
                                                                   input_mask))
  return model, trainable, frozen, tokens, input_mask, logprobs, values


def test_missing_eos_penalty_lowers_the_reward_of_episodes_without_eos(tiny):
  model, trainable, frozen, _, _, _, _ = tiny
  # The anchor keeps the policy's adapter (an SFT start): policy = anchor, KL exactly 0.
  frozen = dict(frozen, anchor_adapter=trainable["policy"]["adapter"])
  eos = 1
  completion = np.asarray([[40, 41, eos], [40, 41, 42]], np.int32)  # episode 1 never ends
  prompt = np.asarray([[2, 11, 12, 13]] * 2, np.int32)
  rollout = {"tokens": jnp.asarray(np.concatenate([prompt, completion], 1)),
             "input_mask": jnp.ones((2, 7), bool), "completion": jnp.asarray(completion),
             "completion_mask": jnp.ones((2, 3), bool)}
  reward_fn = lambda variables, tokens, input_mask: jnp.asarray([2.0, -1.0])
  rl_cfg = _rl_cfg(missing_eos_penalty=1.5)
  scored = rl.make_scorer(model, reward_fn, rl_cfg, 4, False, eos)(trainable, frozen, {}, rollout)
  # r - penalty * (no EOS in the completion): [2.0, -1.0 - 1.5]
  np.testing.assert_allclose(np.asarray(scored["rm_scores"]), [2.0, -2.5], rtol=1e-6)
  assert float(jnp.abs(scored["kl"]).max()) == 0.0
  # The penalised score is the task reward of the objective: (1 - beta) * r, KL 0 here.
  returns, _ = rl.shape_returns(scored, rollout["completion_mask"].astype(jnp.float32), rl_cfg)
  np.testing.assert_allclose(np.asarray(returns), [0.9 * 2.0, 0.9 * -2.5], rtol=1e-6)


def _loss_batch(tokens, input_mask, **extra):
  batch = {"tokens": tokens, "input_mask": input_mask, "completion_mask": input_mask[:, 4:],
           "rm_scores": np.asarray([2.0, -1.0], np.float32),
           "kl": np.asarray([-0.5, 0.5], np.float32), "length": np.asarray([3.0, 2.0], np.float32),
           "returns": np.asarray([1.0, -2.0], np.float32), **extra}
  return batch, input_mask[:, 4:].astype(np.float64)


def _rl_loss(model, rl_cfg, trainable, frozen, batch):
  loss, metrics = jax.jit(rl.rl_loss_fn(model, rl_cfg, 4))(trainable, frozen, batch,
                                                         jax.random.key(0))
  return float(loss), {k: float(v) for k, v in metrics.items()}


def _k3(logprobs, anchor, mask):
  """Schulman's k3 with r = anchor / policy: r - 1 - log r, summed per episode, batch mean."""
  log_r = anchor - logprobs
  return np.mean(np.sum((np.exp(log_r) - 1 - log_r) * mask, axis=1))


def test_reinforce_loss_terms_and_k3_penalty(tiny):
  model, trainable, frozen, tokens, input_mask, lp, values = tiny
  batch, mask = _loss_batch(tokens, input_mask, advantages=np.asarray([1.5, -0.5], np.float32))
  anchor = lp + np.asarray([[0.3, -0.2, 0.1], [-0.4, 0.25, 5.0]])  # 5.0 on padding
  batch.update(policy_logprobs=lp.astype(np.float32), anchor_logprobs=anchor.astype(np.float32))
  rl_cfg = _rl_cfg(algorithm="reinforce", kl_mode="loss")
  loss, metrics = _rl_loss(model, rl_cfg, trainable, frozen, batch)
  # pg = -mean_b(A_b * sum_t logpi); value = 1/2 mean_b (V(prompt)_b - R_b)^2
  pg = -np.mean(np.asarray([1.5, -0.5]) * np.sum(lp * mask, axis=1))
  v = 0.5 * np.mean((values[:, 0] - np.asarray([1.0, -2.0])) ** 2)
  k3 = _k3(lp, anchor, mask)
  assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-5)
  assert metrics["value_loss"] == pytest.approx(v, rel=1e-5)
  assert metrics["kl_k3"] == pytest.approx(k3, rel=1e-5)
  assert k3 > 0.01  # the penalty is not trivially 0 here
  assert loss == pytest.approx(pg + rl_cfg.value_coef * v + BETA * k3, rel=1e-5)


def test_rloo_loss_is_the_policy_gradient_alone(tiny):
  model, trainable, frozen, tokens, input_mask, lp, _ = tiny
  batch, mask = _loss_batch(tokens, input_mask, advantages=np.asarray([2.8, -2.8], np.float32))
  anchor = lp + np.asarray([[0.3, -0.2, 0.1], [-0.4, 0.25, 5.0]])  # in the reward: unused here
  batch.update(policy_logprobs=lp.astype(np.float32), anchor_logprobs=anchor.astype(np.float32))
  rloo_trainable = {"policy": trainable["policy"]}  # no value model at all
  loss, metrics = _rl_loss(model, _rl_cfg(algorithm="rloo", kl_mode="reward"), rloo_trainable,
                           frozen, batch)
  pg = -np.mean(np.asarray([2.8, -2.8]) * np.sum(lp * mask, axis=1))
  assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-5)
  assert metrics["value_loss"] == 0.0
  assert "kl_k3" not in metrics  # KL in the reward: no k3 term in the loss
  assert loss == pytest.approx(pg, rel=1e-5)


def test_ppo_loss_clips_the_ratio_and_the_values(tiny):
  model, trainable, frozen, tokens, input_mask, lp, values = tiny
  adv = np.asarray([[1.0, 1.0, -1.0], [-1.0, 2.0, 0.0]])
  batch, mask = _loss_batch(tokens, input_mask, advantages=adv.astype(np.float32))
  # log(pi / pi_old) = [[0.5, -0.5, 0.05], [-0.3, 0.02, .]]: the ratios e^0.5 = 1.65 (A > 0)
  # and e^-0.3 = 0.74 (A < 0) are clipped to 1.2 and 0.8; e^-0.5 = 0.61 leaves [0.8, 1.2] too,
  # but with A > 0 the min keeps the unclipped 0.61.
  old = lp - np.asarray([[0.5, -0.5, 0.05], [-0.3, 0.02, 0.0]])
  old_values = values + np.asarray([[0.5, -0.1, 0.0], [0.3, -0.4, 0.0]])
  token_returns = np.asarray([[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]])
  anchor = lp + np.asarray([[0.3, -0.2, 0.1], [-0.4, 0.25, 5.0]])
  batch.update(policy_logprobs=old.astype(np.float32), anchor_logprobs=anchor.astype(np.float32),
               values=old_values.astype(np.float32),
               token_returns=token_returns.astype(np.float32))
  rl_cfg = _rl_cfg(algorithm="ppo", kl_mode="loss")
  loss, metrics = _rl_loss(model, rl_cfg, trainable, frozen, batch)
  ratio = np.exp(lp - old)
  # per real token: min(r A, clip(r, 0.8, 1.2) A)
  #   [min(1.65, 1.2), min(0.61, 0.8), min(-1.05, -1.05)], [min(-0.74, -0.8), min(2.04, 2.04)]
  surrogate = np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  pg = -np.sum(surrogate * mask) / 5
  assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-5)
  # |r - 1| > 0.2 on tokens 0, 1 of episode 0 and token 0 of episode 1: 3 of 5
  assert metrics["clip_fraction"] == pytest.approx(3 / 5)
  # value: 1/2 masked mean of max((V - R)^2, (V_old + clip(V - V_old, +-0.2) - R)^2)
  clipped = old_values + np.clip(values - old_values, -0.2, 0.2)
  err = np.maximum((values - token_returns) ** 2, (clipped - token_returns) ** 2)
  v = 0.5 * np.sum(err * mask) / 5
  assert np.any((clipped - token_returns) ** 2 > (values - token_returns) ** 2)  # clip bites
  assert metrics["value_loss"] == pytest.approx(v, rel=1e-5)
  k3 = _k3(lp, anchor, mask)
  assert metrics["kl_k3"] == pytest.approx(k3, rel=1e-5)
  assert loss == pytest.approx(pg + rl_cfg.value_coef * v + BETA * k3, rel=1e-5)
