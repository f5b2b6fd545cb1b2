"""The shared training loop: exact resume, NaN stop, optimizer, accumulation."""
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
  deterministic, batch_at, trainable, frozen = _problem(noise_scale=0.0)
  _, optim_cfg = _cfgs()
  optimizer = train_lib.make_optimizer(optim_cfg, 10)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  batch = jax.tree.map(jnp.asarray, batch_at(0))
  batch["x"] = batch["x"] * 0 + batch["x"][:1]  # identical rows: micro-batch means are equal
  batch["y"] = batch["y"] * 0 + batch["y"][:1]
  one = train_lib.make_train_step(deterministic, optimizer, 1)(state, frozen, batch,
                                                               jax.random.key(1))
  four = train_lib.make_train_step(deterministic, optimizer, 4)(state, frozen, batch,
                                                                jax.random.key(1))
  np.testing.assert_allclose(np.asarray(one[0]["trainable"]["w"]["scale"]),
                             np.asarray(four[0]["trainable"]["w"]["scale"]), atol=1e-6)
  np.testing.assert_allclose(float(one[1]["loss"]), float(four[1]["loss"]), rtol=1e-6)


def test_unknown_schedule_is_an_error():
  _, optim_cfg = _cfgs()
  optim_cfg.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule must be"):
    train_lib.make_optimizer(optim_cfg, 10)


def test_full_finetuning_trains_at_its_own_learning_rate():
  from perl_jax import common, config_base
  optim_cfg = config_base.base_config().reward.optim
  assert common.optim_for(optim_cfg, full_finetune=False) is optim_cfg
  full = common.optim_for(optim_cfg, full_finetune=True)
  assert full.lr == optim_cfg.full_lr < optim_cfg.lr
  assert optim_cfg.lr == 3e-3  # the LoRA setting is left as it was


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
