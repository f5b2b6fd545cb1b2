"""The peer benchmarks' weight mapping: a HF Gemma and perl_jax's "demo" preset with the copied
weights compute the same logits. Skipped unless the optional peers (torch, transformers) are
installed."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))


def test_hf_weights_give_matching_logits():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import jax

  import bench_common as bc
  from perl_jax import model as model_lib

  tokens = bc.random_tokens(np.random.default_rng(0), (2, 12))
  mask = np.ones(tokens.shape, bool)
  # One torch thread: on a busy shared CPU, torch's OpenMP threads can stall each other
  # (see bench_common.THREADS_NOTE); this check needs no parallelism.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    hf = bc.build_hf_causal_lm(seed=3)  # norms randomised: the (1 + w) mapping is exercised
    hf_logits = bc.hf_logits(hf, tokens)
  finally:
    torch.set_num_threads(threads)
  cfg = bc.perl_config()
  model = model_lib.build(cfg)
  variables = bc.with_backbone(
      jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0))),
      bc.hf_to_perl_params(hf, cfg))
  diff = lambda v: np.max(np.abs(hf_logits - bc.perl_logits(model, v, tokens, mask)))
  assert diff(variables) < 1e-4
  # A wrong mapping is caught: reversing the head order of one o kernel changes the logits.
  attn = variables["params"]["layer_0"]["attn"]
  broken = {**variables["params"], "layer_0": {**variables["params"]["layer_0"], "attn": {
      **attn, "o": {"kernel": attn["o"]["kernel"][::-1]}}}}
  assert diff({"params": broken}) > 1e-3


def test_mfu_bench_counts_flops_of_the_real_step():
  import jax
  import jax.numpy as jnp
  import bench_mfu
  lora = bench_mfu.measure("tiny", 4, pairs=1, seq_len=8, dtype="float32", remat=False,
                           repeats=1, warmup=0)
  assert 0 < lora["trainable_params"] < lora["total_params"]
  assert lora["tflops_per_step"] > 0 and lora["median_step_s"] > 0 and lora["step_peak_gib"] > 0
  # XLA's count of a known computation: an (8 x 16) @ (16 x 4) matmul is 2 * 8 * 16 * 4 FLOPs.
  matmul = jax.jit(jnp.dot).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
  assert bench_mfu.step_flops(matmul) == 2 * 8 * 16 * 4
  assert bench_mfu.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert bench_mfu.device_peak_tflops("cpu") == 0.0
