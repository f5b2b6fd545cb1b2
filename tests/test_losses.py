"""Loss functions against values computed by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import losses


def test_bradley_terry_loss_and_margin():
  scores = jnp.asarray([[2.0, 0.0], [0.0, 1.0]])
  loss, metrics = losses.preference_loss(scores, jnp.ones(2))
  expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["accuracy"]) == 0.5
  assert float(metrics["margin"]) == pytest.approx(0.5)
  with_margin, _ = losses.preference_loss(scores, jnp.ones(2), margin=1.0)
  expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
  assert float(with_margin) == pytest.approx(expected, rel=1e-6)


def test_pointwise_binary_cross_entropy():
  scores = jnp.asarray([[0.0], [2.0], [-1.0]])
  labels = jnp.asarray([1.0, 0.0, 0.0])
  loss, metrics = losses.preference_loss(scores, labels)
  sig = lambda x: 1 / (1 + math.exp(-x))
  expected = -(math.log(sig(0.0)) + math.log(1 - sig(2.0)) + math.log(1 - sig(-1.0))) / 3
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(1 / 3)  # 0.0 is not > 0: counts as "0"


def test_kl_estimators():
  policy, anchor = jnp.log(jnp.asarray([0.5, 0.2])), jnp.log(jnp.asarray([0.25, 0.4]))
  np.testing.assert_allclose(losses.kl_k1(policy, anchor), [math.log(2), math.log(0.5)],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.kl_k2(policy, anchor),
                             [0.5 * math.log(2) ** 2, 0.5 * math.log(0.5) ** 2], rtol=1e-6)
  r = np.asarray([0.5, 2.0])  # anchor / policy
  np.testing.assert_allclose(losses.kl_k3(policy, anchor), r - 1 - np.log(r), rtol=1e-5)
  # Equal distributions: every estimator is exactly 0.
  for est in losses.KL_ESTIMATORS.values():
    assert float(jnp.abs(est(policy, policy)).max()) == 0.0


def test_kl_estimators_finite_in_bfloat16_at_extreme_ratios():
  policy = jnp.asarray([0.0, -80.0], jnp.bfloat16)
  anchor = jnp.asarray([-80.0, 0.0], jnp.bfloat16)
  for est in losses.KL_ESTIMATORS.values():
    assert bool(jnp.isfinite(est(policy, anchor)).all())


def test_k3_is_an_unbiased_kl_estimate():
  p, q = np.asarray([0.7, 0.2, 0.1]), np.asarray([0.3, 0.3, 0.4])
  true_kl = float(np.sum(p * np.log(p / q)))
  # E_{x~p}[k3] and E_{x~p}[k1], computed exactly as a p-weighted sum.
  k3 = np.asarray(losses.kl_k3(jnp.log(p), jnp.log(q)))
  k1 = np.asarray(losses.kl_k1(jnp.log(p), jnp.log(q)))
  assert float(np.sum(p * k3)) == pytest.approx(true_kl, rel=1e-5)
  assert float(np.sum(p * k1)) == pytest.approx(true_kl, rel=1e-5)


def test_reinforce_loss_uses_masked_sequence_logprob():
  logprobs = jnp.asarray([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]])
  mask = jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32)
  adv = jnp.asarray([2.0, -1.0])
  # -(2 * (-3) + (-1) * (-1.5)) / 2 = (6 - 1.5) / 2
  assert float(losses.reinforce_loss(logprobs, mask, adv)) == pytest.approx(2.25)


def test_rloo_baseline_leaves_one_out():
  rewards = jnp.asarray([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])  # two prompts, k = 3
  adv = losses.rloo_advantages(rewards, 3)
  np.testing.assert_allclose(adv, [1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 13, 10 - 13, 16 - 10])


def test_ppo_clipping():
  old = jnp.log(jnp.asarray([[0.5, 0.5]]))
  new = jnp.log(jnp.asarray([[0.75, 0.25]]))  # ratios 1.5 and 0.5
  mask = jnp.ones((1, 2))
  adv = jnp.asarray([[1.0, 1.0]])
  loss, clip_fraction = losses.ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
  # min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 -> -(1.2 + 0.5) / 2
  assert float(loss) == pytest.approx(-0.85, rel=1e-6)
  assert float(clip_fraction) == 1.0
  loss_neg, _ = losses.ppo_policy_loss(new, old, -adv, mask, clip_eps=0.2)
  # min(-1.5, -1.2) = -1.5 and min(-0.5, -0.8) = -0.8 -> (1.5 + 0.8) / 2
  assert float(loss_neg) == pytest.approx(1.15, rel=1e-6)


def test_gae_by_hand():
  rewards = jnp.asarray([[0.0, 0.0, 1.0, 0.0]])
  values = jnp.asarray([[0.5, 0.4, 0.3, 9.0]])  # the 4th token is padding
  mask = jnp.asarray([[1, 1, 1, 0]], jnp.float32)
  gamma, lam = 0.9, 0.8
  d2 = 1.0 - 0.3
  d1 = 0.0 + gamma * 0.3 - 0.4
  d0 = 0.0 + gamma * 0.4 - 0.5
  a2 = d2
  a1 = d1 + gamma * lam * a2
  a0 = d0 + gamma * lam * a1
  adv, returns = losses.gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, [[a0, a1, a2, 0.0]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(returns, [[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]], rtol=1e-6, atol=1e-7)


def test_gae_with_lambda_one_gives_monte_carlo_returns():
  rewards = jnp.asarray([[0.1, -0.2, 1.0]])
  values = jnp.asarray([[0.3, 0.1, 0.7]])
  adv, returns = losses.gae(rewards, values, jnp.ones((1, 3)), 1.0, 1.0)
  np.testing.assert_allclose(returns, [[0.9, 0.8, 1.0]], rtol=1e-6)


def test_value_loss_clipping():
  values, old, returns = jnp.asarray([1.0]), jnp.asarray([0.0]), jnp.asarray([2.0])
  assert float(losses.value_loss(values, returns)) == pytest.approx(0.5)
  # clipped value 0.2 is further from the return: max((1-2)^2, (0.2-2)^2) = 3.24
  assert float(losses.value_loss(values, returns, None, old, 0.2)) == pytest.approx(0.5 * 3.24)


def test_whiten_by_hand_over_the_masked_entries():
  x = jnp.asarray([[1.0, 3.0, 100.0], [5.0, 7.0, -50.0]])
  mask = jnp.asarray([[1, 1, 0], [1, 1, 0]], jnp.float32)
  # Real entries 1, 3, 5, 7: mean 4, population variance (9 + 1 + 1 + 9) / 4 = 5.
  z = np.asarray([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5.0)
  out = np.asarray(losses.whiten(x, mask))
  np.testing.assert_allclose(out[:, :2], z.reshape(2, 2), rtol=1e-6)
  # Unmasked: [2, 4, 6] -> mean 4, variance 8 / 3.
  np.testing.assert_allclose(losses.whiten(jnp.asarray([2.0, 4.0, 6.0])),
                             np.asarray([-2.0, 0.0, 2.0]) / math.sqrt(8 / 3), rtol=1e-6)


def test_value_loss_per_token_mask_and_clip():
  values = jnp.asarray([[1.0, 0.5, 9.0]])
  old = jnp.asarray([[0.0, 0.4, 0.0]])
  returns = jnp.asarray([[2.0, 0.0, 0.0]])
  mask = jnp.asarray([[1, 1, 0]], jnp.float32)  # the 9.0 is padding
  # Unclipped: 1/2 * mean((1 - 2)^2, (0.5 - 0)^2) = 1/2 * (1 + 0.25) / 2
  assert float(losses.value_loss(values, returns, mask)) == pytest.approx(0.3125)
  # Clipped (eps 0.2): token 0: max(1, (0.2 - 2)^2 = 3.24); token 1: 0.5 - 0.4 = 0.1 is inside
  # the clip, so max(0.25, 0.25). 1/2 * (3.24 + 0.25) / 2
  assert float(losses.value_loss(values, returns, mask, old, 0.2)) == pytest.approx(0.8725)


def test_ppo_loss_ignores_padding_and_averages_over_real_tokens():
  old = jnp.log(jnp.asarray([[0.5, 0.5, 0.5]]))
  new = jnp.log(jnp.asarray([[0.55, 0.45, 0.01]]))  # ratios 1.1, 0.9, and 0.02 on padding
  adv = jnp.asarray([[2.0, -1.0, 100.0]])
  mask = jnp.asarray([[1, 1, 0]], jnp.float32)
  loss, clip_fraction = losses.ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
  # Inside the clip: -(1.1 * 2 + 0.9 * -1) / 2
  assert float(loss) == pytest.approx(-0.65, rel=1e-5)
  assert float(clip_fraction) == 0.0


# ----------------------------------------------------------------------------- the SFT loss mask


def _sft_batch():
  # Row 0: BOS, 2 prompt tokens, 2 response tokens + EOS, right padding.
  # Row 1: BOS, 3 prompt tokens, 3 response tokens + EOS.
  tokens = np.asarray([[2, 10, 11, 12, 13, 1, 0, 0], [2, 17, 18, 19, 25, 26, 27, 1]], np.int32)
  loss_mask = np.asarray([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], bool)
  input_mask = np.asarray([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], bool)
  return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}


def test_sft_loss_counts_only_response_targets(monkeypatch):
  """With log p(target) = -target / 10 whatever the context, the loss is a hand sum."""
  import jax
  from perl_jax import roles, sft

  def fake_logprobs(model, variables, tokens, input_mask, **kw):
    return -jnp.asarray(tokens[:, 1:], jnp.float32) / 10, None  # position t predicts t + 1

  monkeypatch.setattr(roles, "token_logprobs", fake_logprobs)
  loss_fn = sft.sft_loss(model=None)
  loss_of = lambda batch: loss_fn({}, {}, batch, jax.random.key(0))
  batch = _sft_batch()
  loss, metrics = loss_of(batch)
  # Response targets (loss_mask 1): row 0: 12, 13, EOS 1; row 1: 25, 26, 27, EOS 1.
  # NLL = (1.2 + 1.3 + 0.1 + 2.5 + 2.6 + 2.7 + 0.1) / 7 targets = 10.5 / 7, pooled over the
  # batch (the mean of the rows' means would be (2.6 / 3 + 7.9 / 4) / 2 = 1.421...).
  assert float(loss) == pytest.approx(1.5, rel=1e-6)
  assert float(metrics["tokens"]) == 7
  prompt_changed = {**batch, "tokens": batch["tokens"].copy()}
  prompt_changed["tokens"][0, 2] = 90  # a prompt token: its target is masked out
  prompt_changed["tokens"][1, 0] = 90  # BOS is never a target
  assert float(loss_of(prompt_changed)[0]) == pytest.approx(1.5, rel=1e-6)
  response_changed = {**batch, "tokens": batch["tokens"].copy()}
  response_changed["tokens"][1, 5] = 46  # a response token: 2.6 -> 4.6
  assert float(loss_of(response_changed)[0]) == pytest.approx(12.5 / 7, rel=1e-6)


def test_sft_loss_of_a_real_model_is_the_mean_response_nll():
  import jax
  from perl_jax import model as model_lib
  from perl_jax import roles, sft
  model = model_lib.build(model_lib.model_config("tiny"))
  shapes = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                        shapes)
  batch = _sft_batch()

  @jax.jit
  def both(batch):
    logprobs, _ = roles.token_logprobs(model, {"params": params}, batch["tokens"],
                                       batch["input_mask"])
    return logprobs, sft.sft_loss(model)({"params": params}, {}, batch, jax.random.key(0))[0]

  logprobs, loss = both(batch)
  logprobs = np.asarray(logprobs, np.float64)
  # The targets of positions 2, 3, 4 (row 0) and 3, 4, 5, 6 (row 1): tokens[:, t + 1] with
  # loss_mask[:, t + 1] set.
  expected = -(logprobs[0, 2:5].sum() + logprobs[1, 3:7].sum()) / 7
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  changed = {**batch, "tokens": batch["tokens"].copy()}
  changed["tokens"][0, 5] = 40  # row 0's EOS, its last response target: the loss moves
  assert abs(float(both(changed)[1]) - float(loss)) > 1e-4
  changed = {**batch, "tokens": batch["tokens"].copy()}
  changed["tokens"][0, 6] = 40  # padding after row 0's EOS: nothing moves
  assert float(both(changed)[1]) == pytest.approx(float(loss), rel=1e-6)
