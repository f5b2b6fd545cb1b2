"""The shared training loop: exact resume, NaN stop, optimizer, accumulation."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib


def _cfgs(steps=6, accum=1):
  train_cfg = ml_collections.ConfigDict(dict(
      steps=steps, batch_size=8, accum_steps=accum, log_every=2, eval_every=0,
      checkpoint_every=3, keep_checkpoints=5))
  optim_cfg = ml_collections.ConfigDict(dict(
      lr=0.05, schedule="cosine", warmup_steps=2, final_lr_fraction=0.1, weight_decay=0.01,
      b1=0.9, b2=0.99, clip_norm=1.0))
  return train_cfg, optim_cfg


def _problem(noise_scale=0.01):
  """Noisy linear regression with dropout-like randomness, so rng handling matters too."""
  w_true = jnp.arange(4.0)

  def loss_fn(trainable, frozen, batch, rng):
    noise = noise_scale * jax.random.normal(rng, batch["x"].shape[:1])
    pred = batch["x"] @ (trainable["w"]["scale"] + frozen["offset"]["scale"]) + noise
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"][0]
    return loss, {"pred_mean": jnp.mean(pred)}

  def batch_at(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": x @ np.asarray(w_true), "scale": np.ones((8,), np.float32)}

  # Leaf names follow the model's (".../scale") so the sharding rules place them.
  return loss_fn, batch_at, {"w": {"scale": jnp.zeros(4)}}, {"offset": {"scale": jnp.zeros(4)}}


def _fit(workdir, batch_at, steps=6, accum=1, **kw):
  loss_fn, _, trainable, frozen = _problem()
  train_cfg, optim_cfg = _cfgs(steps, accum)
  return train_lib.fit(name="t", workdir=str(workdir), train_cfg=train_cfg, optim_cfg=optim_cfg,
                       seed=0, mesh=sharding_lib.make_mesh({"data": 1}, jax.devices()[:1]),
                       loss_fn=loss_fn, trainable=trainable, frozen=frozen, batch_at=batch_at,
                       **kw)


def test_resume_after_interruption_continues_exactly(tmp_path):
  _, batch_at, _, _ = _problem()
  straight = _fit(tmp_path / "a", batch_at)

  def crashing(step):
    if step == 4:
      raise KeyboardInterrupt("simulated preemption")
    return batch_at(step)

  with pytest.raises(KeyboardInterrupt):
    _fit(tmp_path / "b", crashing)
  assert checkpoint_lib.Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 3
  resumed = _fit(tmp_path / "b", batch_at)
  assert resumed["resumed_from"] == 3
  losses = lambda r: [h["loss"] for h in r["history"]]
  np.testing.assert_allclose(losses(resumed), losses(straight)[3:], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(resumed["state"]["trainable"]["w"]["scale"]),
                             np.asarray(straight["state"]["trainable"]["w"]["scale"]), atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _, batch_at, _, _ = _problem()

  def poisoned(step):
    batch = batch_at(step)
    if step == 4:
      batch["scale"] = np.full((8,), np.nan, np.float32)
    return batch

  with pytest.raises(FloatingPointError, match=r"non-finite loss.* at step 5.*last good "
                     r"checkpoint is step 3"):
    _fit(tmp_path, poisoned)
  assert checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3


def test_training_reduces_loss_and_logs(tmp_path):
  _, batch_at, _, _ = _problem()
  result = _fit(tmp_path, batch_at, steps=60)
  losses = [h["loss"] for h in result["history"]]
  assert losses[-1] < 0.2 * losses[0], losses
  assert result["train_step_compilations"] == 1
  assert os.path.exists(tmp_path / "metrics.jsonl")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_gradient_accumulation_matches_one_big_batch():
  """Over 8 distinct rows, 4 micro-batches of 2 give the full batch's gradient (and loss)."""
  deterministic, batch_at, trainable, frozen = _problem(noise_scale=0.0)
  sgd = optax.sgd(1.0)  # after one step at w = 0 the weights are minus the gradient itself
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": sgd.init(trainable)}
  host = batch_at(0)
  assert len({tuple(row) for row in host["x"]}) == 8  # distinct rows
  batch = jax.tree.map(jnp.asarray, host)
  step = lambda accum, b: train_lib.make_train_step(deterministic, sgd, accum)(
      state, frozen, b, jax.random.key(1))
  one, four = step(1, batch), step(4, batch)
  # By hand at w = 0: loss = mean(y^2); gradient of mean((x w - y)^2) = -(2 / n) x^T y.
  x, y = host["x"].astype(np.float64), host["y"].astype(np.float64)
  expected_w, expected_loss = 2 / 8 * x.T @ y, np.mean(y ** 2)
  for out in (one, four):
    np.testing.assert_allclose(np.asarray(out[0]["trainable"]["w"]["scale"]), expected_w,
                               rtol=1e-5, atol=1e-5)
    assert float(out[1]["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert float(out[1]["grad_norm"]) == pytest.approx(np.linalg.norm(expected_w), rel=1e-5)
  # One micro-batch alone (a quarter of the rows) has another gradient and loss: accumulation
  # that dropped the other three would fail the checks above.
  quarter = step(1, jax.tree.map(lambda a: a[:2], batch))
  assert np.abs(np.asarray(quarter[0]["trainable"]["w"]["scale"]) - expected_w).max() > 0.1
  assert abs(float(quarter[1]["loss"]) - expected_loss) > 0.1


def _learning_rates(optim_cfg, total_steps, n):
  """The step size of make_optimizer at steps 0 .. n-1. With a constant unit gradient, Adam's
  bias-corrected moments are m = 1 and v = 1, so (weight decay 0, the norm 1 unclipped) each
  update is exactly -lr(step) * 1 / (1 + eps)."""
  optimizer = train_lib.make_optimizer(optim_cfg, total_steps)
  params = {"w": jnp.zeros(1)}
  update = jax.jit(optimizer.update)
  opt_state, rates = optimizer.init(params), []
  for _ in range(n):
    updates, opt_state = update({"w": jnp.ones(1)}, opt_state, params)
    rates.append(-float(updates["w"][0]))
  return rates


def _schedule_cfg(schedule, warmup_steps):
  _, optim_cfg = _cfgs()
  optim_cfg.update(lr=0.5, schedule=schedule, warmup_steps=warmup_steps, weight_decay=0.0)
  return optim_cfg


def test_cosine_schedule_values():
  rates = _learning_rates(_schedule_cfg("cosine", 2), 10, 12)
  # Linear warm-up from 0 to the peak 0.5 over 2 steps, then cosine decay over the remaining
  # 10 - 2 = 8 steps to final_lr_fraction * lr = 0.05:
  #   lr(s) = 0.05 + (0.5 - 0.05) * (1 + cos(pi * (s - 2) / 8)) / 2, and 0.05 after step 10.
  expected = {0: 0.0, 1: 0.25, 2: 0.5, 4: 0.05 + 0.225 * (1 + math.cos(math.pi / 4)),
              6: 0.05 + 0.225, 8: 0.05 + 0.225 * (1 - math.cos(math.pi / 4)), 10: 0.05,
              11: 0.05}
  for step, lr in expected.items():
    assert rates[step] == pytest.approx(lr, rel=1e-5, abs=1e-7), step


def test_constant_schedule_values():
  rates = _learning_rates(_schedule_cfg("constant", 4), 10, 12)
  # Linear warm-up over 4 steps (0, 0.125, 0.25, 0.375), then 0.5 for good.
  np.testing.assert_allclose(rates, [0.0, 0.125, 0.25, 0.375] + [0.5] * 8, rtol=1e-5, atol=1e-7)
  # No warm-up: the full rate from the first step.
  rates = _learning_rates(_schedule_cfg("constant", 0), 10, 3)
  np.testing.assert_allclose(rates, [0.5] * 3, rtol=1e-5)


def test_cosine_schedule_without_warmup_starts_at_the_peak():
  rates = _learning_rates(_schedule_cfg("cosine", 0), 10, 2)
  assert rates[0] == pytest.approx(0.5, rel=1e-5)  # lr(0) = 0.05 + 0.45 * (1 + cos 0) / 2


def test_unknown_schedule_is_an_error():
  _, optim_cfg = _cfgs()
  optim_cfg.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule must be"):
    train_lib.make_optimizer(optim_cfg, 10)


def test_full_finetuning_trains_at_its_own_learning_rate():
  from perl_jax import common, config_base
  optim_cfg = config_base.base_config().reward.optim
  lora_lr = optim_cfg.lr
  assert common.optim_for(optim_cfg, full_finetune=False) is optim_cfg
  full = common.optim_for(optim_cfg, full_finetune=True)
  assert optim_cfg.lr == lora_lr  # the LoRA setting is left as it was
  assert 0 < optim_cfg.full_lr < lora_lr
  # The optimisers built from them step at their own rates once warmed up (read with a
  # constant schedule, so the step size after warm-up is the rate itself).
  warm = optim_cfg.warmup_steps
  for cfg, lr in ((optim_cfg, lora_lr), (full, optim_cfg.full_lr)):
    cfg = cfg.copy_and_resolve_references()
    cfg.schedule, cfg.weight_decay = "constant", 0.0
    assert _learning_rates(cfg, 100, warm + 1)[warm] == pytest.approx(lr, rel=1e-5)


def test_the_train_loop_refuses_hidden_host_device_copies(tmp_path):
  """Batches on device pass through untouched; an implicit host->device copy inside the loop
  (here a Python scalar multiplied into a device batch) is an error, not a silent slowdown."""
  batch_at = _problem()[1]
  on_device = lambda step: jax.device_put(batch_at(step))  # explicit: allowed
  assert _fit(tmp_path / "ok", on_device, steps=2)["steps"] == 2
  hidden_copy = lambda step: {**on_device(step), "scale": on_device(step)["scale"] * 2.0}
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    _fit(tmp_path / "bad", hidden_copy, steps=2)


def test_bf16_weights_get_float32_adam_moments_and_stay_bf16():
  _, optim_cfg = _cfgs()
  optimizer = train_lib.make_optimizer(optim_cfg, 10)
  params = {"w": {"scale": jnp.ones(4, jnp.bfloat16)}}
  state = optimizer.init(params)
  dtypes = lambda tree: [x.dtype for x in jax.tree_util.tree_leaves(tree)]
  assert jnp.bfloat16 not in dtypes(state) and jnp.float32 in dtypes(state)
  updates, new_state = optimizer.update({"w": {"scale": jnp.full(4, 0.5, jnp.bfloat16)}}, state,
                                        params)
  assert dtypes(new_state) == dtypes(state)  # the jitted step's state keeps its dtypes
  assert optax.apply_updates(params, updates)["w"]["scale"].dtype == jnp.bfloat16
