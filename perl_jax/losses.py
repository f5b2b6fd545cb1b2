"""Pure loss functions: reward modelling, KL estimators, REINFORCE / RLOO / PPO, GAE.

Shapes: B sequences, T completion tokens; `mask` [B, T] is True on real completion tokens
(up to and including EOS). Everything is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_MAX_LOG_RATIO = 20.0  # exp(20) is finite in bf16 and f32; larger log-ratios are clipped


# ----------------------------------------------------------------------------- reward models


def preference_terms(scores, labels, margin: float = 0.0):
  """Each example's loss [B] (what preference_loss averages): from scores [B, 2]
  -log sigmoid(r_chosen - r_rejected - margin), from scores [B, 1] the BCE of the 0/1 label."""
  scores = scores.astype(jnp.float32)
  if scores.shape[1] == 2:
    return jax.nn.softplus(-(scores[:, 0] - scores[:, 1] - margin))
  return optax.sigmoid_binary_cross_entropy(scores[:, 0], labels)


def preference_loss(scores, labels, margin: float = 0.0, weights=None, mask=None):
  """Loss and metrics from scores [B, 2] (pairwise: chosen, rejected) or [B, 1] (pointwise).

  Pairwise: Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin).
  Pointwise: binary cross-entropy with the score as the logit of a 0/1 label, averaged with
  `weights` [B] when given (e.g. class-balancing weights).
  mask [B]: only the True rows count (a packed batch's empty block slots).
  """
  scores = scores.astype(jnp.float32)
  if mask is None:
    mean = jnp.mean
  else:
    valid = mask.astype(jnp.float32)
    mean = lambda x: (jnp.sum(x * (valid if x.ndim == 1 else valid[:, None]))
                      / jnp.maximum(jnp.sum(valid) * (1 if x.ndim == 1 else x.shape[1]), 1.0))
  std = jnp.std if mask is None else lambda x: jnp.sqrt(mean((x - mean(x)) ** 2))
  if scores.shape[1] == 2:
    diff = scores[:, 0] - scores[:, 1]
    loss = mean(jax.nn.softplus(-(diff - margin)))
    return loss, {"accuracy": mean(diff > 0), "margin": mean(diff),
                  "reward_mean": mean(scores), "reward_std": std(scores)}
  logits = scores[:, 0]
  per_example = optax.sigmoid_binary_cross_entropy(logits, labels)
  if weights is None and mask is None:
    loss = jnp.mean(per_example)
  else:
    weights = (jnp.ones_like(per_example) if weights is None else weights) * (
        1.0 if mask is None else valid)
    loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1e-6)
  return loss, {"accuracy": mean((logits > 0) == (labels > 0.5)),
                "reward_mean": mean(logits), "reward_std": std(logits)}


# ----------------------------------------------------------------------------- KL estimators


def log_ratio(policy_logprobs, anchor_logprobs):
  return jnp.clip(policy_logprobs.astype(jnp.float32) - anchor_logprobs.astype(jnp.float32),
                  -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def kl_k1(policy_logprobs, anchor_logprobs):
  """log pi/pi_anchor on tokens sampled from pi: unbiased for KL(pi || anchor), can be < 0."""
  return log_ratio(policy_logprobs, anchor_logprobs)


def kl_k2(policy_logprobs, anchor_logprobs):
  """(log pi/pi_anchor)^2 / 2: low variance, biased, >= 0."""
  return 0.5 * log_ratio(policy_logprobs, anchor_logprobs) ** 2


def kl_k3(policy_logprobs, anchor_logprobs):
  """r - 1 - log r with r = pi_anchor/pi: unbiased, >= 0, low variance (Schulman's k3)."""
  neg = -log_ratio(policy_logprobs, anchor_logprobs)
  return jnp.expm1(neg) - neg


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def masked_sum(x, mask):
  return jnp.sum(x * mask, axis=-1)


def masked_mean(x, mask, axis=None):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x, mask=None):
  """Zero mean, unit variance over the (masked) entries."""
  mask = jnp.ones_like(x) if mask is None else mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  return (x - mean) * jax.lax.rsqrt(var + 1e-8)


# ----------------------------------------------------------------------------- policy gradients


def reinforce_loss(logprobs, mask, advantages):
  """-E[A * sum_t log pi(a_t)]: REINFORCE with a per-sequence advantage A = R - baseline.

  logprobs [B, T] of the sampled tokens under the current policy; advantages [B] (no gradient).
  """
  return -jnp.mean(jax.lax.stop_gradient(advantages) * masked_sum(logprobs, mask))


def rloo_advantages(rewards, num_samples: int):
  """Leave-one-out baseline: A_i = R_i - mean_{j != i} R_j over the k samples of a prompt.

  rewards [B] ordered prompt-major (the k samples of a prompt are adjacent).
  """
  grouped = rewards.reshape(-1, num_samples)
  baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_samples - 1)
  return (grouped - baseline).reshape(-1)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation over completion tokens.

  rewards, values [B, T]; values past the last real token count as 0.
  Returns (advantages, returns), both [B, T], zero on padding.
  """
  mask = mask.astype(jnp.float32)
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = (rewards + gamma * next_values - values) * mask

  def step(carry, xs):
    delta, m = xs
    adv = delta + gamma * lam * carry * m
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0]), (deltas.T[::-1], mask.T[::-1]))
  advantages = adv[::-1].T * mask
  return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2):
  """Clipped surrogate: -E_t[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)], r_t = pi/pi_old."""
  ratio = jnp.exp(log_ratio(logprobs, jax.lax.stop_gradient(old_logprobs)))
  advantages = jax.lax.stop_gradient(advantages)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  loss = -masked_mean(jnp.minimum(unclipped, clipped), mask)
  clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask)
  return loss, clip_fraction


def value_loss(values, returns, mask=None, old_values=None, clip_eps: float | None = None):
  """Squared error to the returns (optionally PPO's clipped value loss)."""
  returns = jax.lax.stop_gradient(returns)
  err = (values - returns) ** 2
  if old_values is not None and clip_eps is not None:
    clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err = jnp.maximum(err, (clipped - returns) ** 2)
  if mask is None:
    return 0.5 * jnp.mean(err)
  return 0.5 * masked_mean(err, mask)
