"""Sharded steps on simulated 8-device meshes equal the single-device step (conftest sets 8 CPU
devices). Tolerance: 1e-5 absolute on losses and updated adapters, float32 (reductions run in a
different order when split across devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import config_base
from perl_jax import lora as lora_lib
from perl_jax import model as model_lib
from perl_jax import reward as reward_lib
from perl_jax import rl
from perl_jax import sharding as sharding_lib
from perl_jax import train as train_lib

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]
ATOL = 1e-5


def _mesh(shape):
  n = int(np.prod(shape))
  return sharding_lib.make_mesh(dict(zip(sharding_lib.AXES, shape)), jax.devices()[:n])


def _reward_problem():
  cfg = model_lib.model_config("tiny")  # d 64, 4 heads, 2 kv heads, mlp 128: divisible
  model = model_lib.build(cfg, lora_rank=4, lora_targets=("attn/", "mlp/"))
  variables = model_lib.init_variables(model, jax.random.key(0), score_head=True)
  variables[lora_lib.ADAPTER] = jax.tree.map(  # non-zero B so every factor gets gradients
      lambda x: x + 0.01, variables[lora_lib.ADAPTER])
  trainable, frozen = lora_lib.split_variables(variables, False)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, cfg.vocab_size, (8, 2, 12)).astype(np.int32),
           "input_mask": np.ones((8, 2, 12), bool), "label": np.ones((8,), np.float32)}
  batch["input_mask"][:, :, 9:] = False
  return reward_lib.reward_loss_fn(model, 0.0), trainable, frozen, batch


def _rl_problem():
  config = config_base.base_config()
  cfg = model_lib.model_config("tiny")
  model = model_lib.build(cfg, lora_rank=4)
  backbone = model_lib.init_variables(model, jax.random.key(0))["params"]
  trainable, frozen = rl.init_roles(model, backbone, False, 0, with_value=True)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)
  rng = np.random.default_rng(1)
  b, p, n = 8, 4, 6
  batch = {"tokens": rng.integers(3, cfg.vocab_size, (b, p + n)).astype(np.int32),
           "input_mask": np.ones((b, p + n), bool), "completion_mask": np.ones((b, n), bool),
           "returns": rng.normal(size=b).astype(np.float32),
           "advantages": rng.normal(size=b).astype(np.float32),
           "rm_scores": rng.normal(size=b).astype(np.float32),
           "policy_logprobs": -np.ones((b, n), np.float32),
           "anchor_logprobs": -np.ones((b, n), np.float32),
           "kl": np.zeros(b, np.float32), "length": np.full(b, n, np.float32)}
  return rl.rl_loss_fn(model, config.rl, p), trainable, frozen, batch


def _step(problem, mesh):
  loss_fn, trainable, frozen, batch = problem
  optimizer = train_lib.make_optimizer(config_base.base_config().reward.optim, 10)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  step_fn, state_sh, frozen_sh = train_lib.sharded_train_step(
      train_lib.make_train_step(loss_fn, optimizer, 1), mesh, state, frozen)
  state = jax.device_put(state, state_sh)
  frozen = jax.device_put(frozen, frozen_sh)
  new_state, metrics = step_fn(state, frozen, sharding_lib.put_batch(batch, mesh),
                               jax.random.key(0))
  return new_state, metrics, frozen


@pytest.mark.parametrize("problem_fn", [_reward_problem, _rl_problem], ids=["reward", "rl"])
def test_sharded_step_matches_single_device(problem_fn):
  problem = problem_fn()
  ref_state, ref_metrics, _ = _step(problem, _mesh((1, 1, 1)))
  for shape in MESHES:
    state, metrics, frozen = _step(problem, _mesh(shape))
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), atol=ATOL)
    ref_leaves = lora_lib.flatten(ref_state["trainable"])
    for path, leaf in lora_lib.flatten(state["trainable"]).items():
      np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref_leaves[path]), atol=ATOL,
                                 err_msg=f"{path} on mesh {shape}")
    # The backbone really is sharded as the rules say.
    kernel = frozen["params"]["layer_0"]["mlp"]["up"]["kernel"]
    fsdp, tensor = shape[1], shape[2]
    expected = jax.sharding.PartitionSpec("fsdp" if fsdp > 1 else None,
                                          "tensor" if tensor > 1 else None)
    assert kernel.sharding.spec == expected, (shape, kernel.sharding.spec)
    if fsdp * tensor > 1:
      assert kernel.addressable_shards[0].data.size == kernel.size // (fsdp * tensor)


def test_data_parallel_reward_step_moves_no_activations():
  """On a data-only mesh each device scores its own rows: the step's only collectives are the
  gradient and metric all-reduces (reading each row's last token, the score read, the last
  layer's rows, must gather within a row, not across devices)."""
  loss_fn, trainable, frozen, batch = _reward_problem()
  mesh = _mesh((8, 1, 1))
  optimizer = train_lib.make_optimizer(config_base.base_config().reward.optim, 10)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  step_fn, state_sh, frozen_sh = train_lib.sharded_train_step(
      train_lib.make_train_step(loss_fn, optimizer, 1), mesh, state, frozen)
  hlo = step_fn.lower(jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh),
                      sharding_lib.put_batch(batch, mesh), jax.random.key(0)).compile().as_text()
  for collective in ("all-gather(", "all-to-all(", "collective-permute("):
    assert collective not in hlo, collective


def test_unmatched_parameter_is_an_error():
  mesh = _mesh((1, 1, 1))
  with pytest.raises(ValueError, match="no sharding rule matches parameter mystery/weight"):
    sharding_lib.tree_shardings({"mystery": {"weight": jnp.zeros((4, 4))}}, mesh)


def test_indivisible_dimension_stays_unsharded():
  mesh = _mesh((1, 1, 8))
  # 2 kv heads cannot split over 8 tensor shards: that dimension is replicated, not an error.
  spec = sharding_lib.spec_for("layer_0/attn/k/kernel", (64, 2, 16), mesh)
  assert spec == jax.sharding.PartitionSpec(None, None, None)


def test_adapter_checkpoint_moves_between_meshes(tmp_path):
  _, trainable, _, _ = _reward_problem()
  saved_mesh = _mesh((2, 4, 1))
  on_saved = jax.device_put(trainable, sharding_lib.tree_shardings(trainable, saved_mesh))
  checkpoint_lib.save_tree(str(tmp_path / "adapter"), on_saved)
  for shape in [(8, 1, 1), (1, 1, 1)]:
    mesh = _mesh(shape)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable,
        sharding_lib.tree_shardings(trainable, mesh))
    restored = checkpoint_lib.load_tree(str(tmp_path / "adapter"), target)
    for path, leaf in lora_lib.flatten(restored).items():
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(lora_lib.flatten(trainable)[path]))
      assert leaf.sharding.mesh.shape == mesh.shape
