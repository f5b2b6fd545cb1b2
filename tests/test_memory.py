"""Compile-only memory of the real steps: LoRA below full, and sharding divides the weights."""
import jax

from perl_jax import memory
from perl_jax import model as model_lib
from perl_jax import sharding as sharding_lib

CFG = model_lib.model_config("tiny", d_model=256, mlp_dim=1024, num_layers=2, head_dim=32,
                             num_heads=8, num_kv_heads=8, vocab_size=1024)


def test_lora_reward_and_rl_steps_need_less_memory_than_full():
  lora_rm = memory.reward_step_memory(CFG, 4, batch_pairs=2, seq_len=16)
  full_rm = memory.reward_step_memory(CFG, 0, batch_pairs=2, seq_len=16)
  assert lora_rm["trainable_params"] < 0.05 * full_rm["trainable_params"]
  # Full tuning holds Adam moments (2x weights, f32) and gradients for every weight.
  assert full_rm["optimizer_bytes"] >= 2 * 4 * full_rm["total_params"] * 0.99
  assert lora_rm["peak_bytes"] < 0.6 * full_rm["peak_bytes"]
  lora_rl = memory.rl_step_memory(CFG, 4, episodes=4, prompt_len=8, new_tokens=8)
  full_rl = memory.rl_step_memory(CFG, 0, episodes=4, prompt_len=8, new_tokens=8)
  # Full RLHF keeps policy, value, anchor and reward weights; PERL one backbone.
  assert full_rl["reward_model_bytes"] > 50 * lora_rl["reward_model_bytes"]
  assert lora_rl["total_bytes"] < 0.5 * full_rl["total_bytes"]


def test_per_device_memory_shrinks_on_an_fsdp_mesh():
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
  one = memory.reward_step_memory(CFG, 0, batch_pairs=8, seq_len=16)
  sharded = memory.reward_step_memory(CFG, 0, batch_pairs=8, seq_len=16, mesh=mesh)
  assert sharded["argument_bytes"] < 0.3 * one["argument_bytes"]


def test_rollout_with_a_quantised_table_never_dequantises_the_whole_table():
  """sampling.sample builds each step's logits one vocabulary tile at a time from an int8
  table: no buffer of the compiled rollout is as large as the f32 table it stands for."""
  cfg = model_lib.model_config("tiny-gemma3", vocab_size=65536, embedding_dtype="int8",
                               weight_dtype="int8", logprob_vocab_tile=8192)
  f32_table = cfg.vocab_size * cfg.d_model * 4  # 16 MiB
  stats = memory.sampling_memory(cfg, 4, batch=2, prompt_len=8, new_tokens=4)
  assert stats["temp_bytes"] < f32_table / 2, stats
  assert not any(b.startswith(("f32[65536", "bf16[65536")) for b in stats["largest_buffers"])
