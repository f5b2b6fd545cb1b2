r"""Reward-model train step at a real preset, LoRA vs full: step time, FLOP/s and MFU.

  python experiments/bench_mfu.py --preset=gemma-2b --pairs=8 --seq_len=1024   # a GPU / TPU
  python experiments/bench_mfu.py --preset=demo --pairs=16 --seq_len=256 \
      --dtype=float32                                                         # a CPU, smoke

Runs the step the `reward` stage runs (`reward.reward_loss_fn` + `train.make_train_step`, jitted
with the state donated) on random weights and tokens, `--repeats` timed steps after `--warmup`.
FLOPs per step are XLA's count for the compiled step (`cost_analysis()`: forward, backward and
optimizer, as executed: remat recomputation included, and LoRA's frozen backbone gets no weight
gradients). MFU = counted FLOPs / step time / --peak_tflops (default: the device's dense bf16 peak
when known: H100/H200 989 TFLOP/s, A100 312, TPU v4 275, v5e 197, v5p 459; none on a CPU).
Writes mfu.csv and mfu.md in --out and prints the table.
"""
import csv
import os
import statistics
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "gemma-2b", "a key of perl_jax.model.PRESETS")
_PAIRS = flags.DEFINE_integer("pairs", 8, "preference pairs per step (2 sequences each)")
_LEN = flags.DEFINE_integer("seq_len", 1024, "tokens per sequence")
_RANKS = flags.DEFINE_list("ranks", ["4", "0"], "LoRA ranks; 0 = full fine-tuning")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute and backbone dtype")
_REMAT = flags.DEFINE_bool("remat", True, "rematerialise layers in the backward pass")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps (compile, allocation)")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "the device's peak TFLOP/s; 0 = from its kind")
_OUT = flags.DEFINE_string("out", "/tmp/bench_mfu", "output folder")

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0}


def device_peak_tflops(device_kind: str) -> float:
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return 0.0


def step_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def measure(preset: str, rank: int, pairs: int, seq_len: int, dtype: str, remat: bool,
            repeats: int, warmup: int) -> dict:
  """One variant: median step seconds, XLA's FLOPs per step, and the compiled step's memory."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from perl_jax import lora as lora_lib
  from perl_jax import memory as memory_lib
  from perl_jax import model as model_lib
  from perl_jax import reward as reward_lib
  from perl_jax import train as train_lib

  cfg = model_lib.model_config(preset, dtype=dtype, param_dtype=dtype, remat=remat)
  model = model_lib.build(cfg, rank)
  variables = jax.jit(lambda: model_lib.init_variables(model, jax.random.key(0),
                                                       score_head=True))()
  trainable, frozen = lora_lib.split_variables(variables, rank == 0)
  optimizer = train_lib.make_optimizer(memory_lib.constant_adamw(1e-5), 1000)
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": jax.jit(optimizer.init)(trainable)}
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(4, cfg.vocab_size, (pairs, 2, seq_len)), jnp.int32),
           "input_mask": jnp.ones((pairs, 2, seq_len), bool),
           "label": jnp.ones((pairs,), jnp.float32)}
  step = jax.jit(train_lib.make_train_step(reward_lib.reward_loss_fn(model, 0.0), optimizer, 1),
                 donate_argnums=(0,))
  key = jax.random.key(1)
  compiled = step.lower(state, frozen, batch, key).compile()
  flops = step_flops(compiled)
  memory = train_lib.compiled_memory(compiled)
  times = []
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch, key)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return {"variant": "full" if rank == 0 else f"lora_r{rank}",
          "trainable_params": lora_lib.count_params(trainable),
          "total_params": lora_lib.count_params(variables),
          "median_step_s": seconds, "min_step_s": min(times), "max_step_s": max(times),
          "tflops_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
          "step_peak_gib": memory["peak_bytes"] / 2 ** 30}


def _percent(x: float) -> str:
  return "n/a" if x != x else f"{100 * x:.1f}%"


def main(argv):
  del argv
  import jax
  device = jax.devices()[0]
  peak = _PEAK.value or device_peak_tflops(device.device_kind)
  print(f"{device.platform} {device.device_kind}; peak {peak or 'unknown'} TFLOP/s", flush=True)
  rows = []
  for rank in [int(r) for r in _RANKS.value]:
    row = measure(_PRESET.value, rank, _PAIRS.value, _LEN.value, _DTYPE.value, _REMAT.value,
                  _REPEATS.value, _WARMUP.value)
    row["mfu"] = row["achieved_tflops"] / peak if peak else float("nan")
    rows.append(row)
    print(row, flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "mfu.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"{_PRESET.value}, {_PAIRS.value} pairs x {_LEN.value} tokens, {_DTYPE.value}, "
           f"remat={_REMAT.value}, on {device.device_kind} (peak {peak or 'unknown'} TFLOP/s)", "",
           "| variant | trainable | median step s (min-max) | TFLOP/step (XLA) | TFLOP/s | MFU "
           "| step peak GiB |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['variant']} | {r['trainable_params']:,} | {r['median_step_s']:.4f} "
            f"({r['min_step_s']:.4f}-{r['max_step_s']:.4f}) | {r['tflops_per_step']:.3f} | "
            f"{r['achieved_tflops']:.2f} | "
            f"{_percent(r['mfu'])} | "
            f"{r['step_peak_gib']:.2f} |" for r in rows]
  with open(os.path.join(_OUT.value, "mfu.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
