r"""Compile-only accelerator memory of LoRA vs full reward-model steps and PERL vs full-RLHF RL
steps at real Gemma sizes — the paper's memory claim, checked on any machine (nothing is
allocated; XLA's memory_analysis of the same jitted steps the stages run).

  python experiments/memory_at_scale.py --presets=gemma-2b,gemma-7b --out=/tmp/memory

Writes memory.csv and memory.md in --out. With --mesh=DATA,FSDP,TENSOR (e.g. 1,8,1) the steps are
compiled with the training shardings and the figures are per device (devices are simulated on a
CPU host). bf16 backbone (--weight_dtypes=bfloat16,int8,nf4: its projection kernels stored
quantised, perl_jax.quant; --embedding_dtype=nf4: the output embedding too), f32 adapters, AdamW; reward batch 8
pairs x 512 tokens; RL 16 episodes of 256 prompt + 256 new tokens (change with flags); layers
under nn.scan with remat (--noscan_layers / --noremat to compare). Full fine-tuning gets the same
scan, remat, chunked log-probs and attention blocks, and keeps bf16 weights and gradients with
f32 Adam moments (train.in_float32), no f32 master copy. XLA's CPU compiler is used unless a GPU/TPU
is present; its buffer assignment is close to, not identical to, the accelerator's: the CPU
compiler runs bf16 ops in f32 (its float normalisation), slicing included, so it converts every
stacked bf16 layer kernel to f32 whole before the layer scan slices it (the `f32[L, ...]` entries
of the "largest buffers" column), which no GPU/TPU does. --weight_dtypes=bf16_bits holds the same
bf16 kernels as uint16 bit patterns, which XLA:CPU slices as they are: the LoRA rows then show what
an accelerator would hold (full tuning trains its kernels and cannot use it).
"""
import csv
import math
import os
import sys
import time

from absl import app, flags


def _mesh_arg(argv) -> tuple[int, ...] | None:
  for arg in argv:
    if arg.startswith("--mesh="):
      return tuple(int(x) for x in arg.split("=", 1)[1].split(","))
  return None


# A mesh needs its devices before JAX starts: on a CPU host, simulate them.
if _mesh_arg(sys.argv) and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={math.prod(_mesh_arg(sys.argv))}")

from perl_jax import memory  # noqa: E402  (after XLA_FLAGS)
from perl_jax import model as model_lib  # noqa: E402
from perl_jax import quant  # noqa: E402
from perl_jax import sharding as sharding_lib  # noqa: E402

_PRESETS = flags.DEFINE_list("presets", ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b"],
                             "model presets")
_RANKS = flags.DEFINE_list("ranks", ["4", "16"], "LoRA ranks")
_WITH_FULL = flags.DEFINE_bool("with_full", True, "also full fine-tuning / full RLHF (rank 0)")
_RM_PAIRS = flags.DEFINE_integer("rm_pairs", 8, "preference pairs per reward step")
_RM_LEN = flags.DEFINE_integer("rm_len", 512, "tokens per reward sequence")
_EPISODES = flags.DEFINE_integer("episodes", 16, "episodes per RL update")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "RL prompt tokens")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "RL completion tokens")
_OUT = flags.DEFINE_string("out", "/tmp/perl_memory", "output folder")
_WEIGHT_DTYPES = flags.DEFINE_list(
    "weight_dtypes", ["bfloat16"], "model.weight_dtype of the frozen backbone's projection "
    "kernels (bfloat16, bf16_bits, int8, nf4, gguf); full tuning is measured in bfloat16 only")
_EMBEDDING_DTYPE = flags.DEFINE_string(
    "embedding_dtype", "", "model.embedding_dtype of the output embedding in the LoRA rows with "
    "quantised weights (int8, nf4; logits then built in vocabulary tiles); '' = bfloat16")
_REMAT = flags.DEFINE_bool("remat", True, "rematerialise layers in the backward pass")
_SCAN = flags.DEFINE_bool("scan_layers", True, "layers under nn.scan (False: unrolled)")
_ATTENTION_CHUNK = flags.DEFINE_integer("attention_chunk", 128, "queries per attention block "
                                        "(model.attention_chunk; 0 = all at once)")
_MLP_CHUNK = flags.DEFINE_integer("mlp_chunk", 0, "positions per MLP block (model.mlp_chunk; 0 = "
                                  "all at once)")
_WITH_SAMPLING = flags.DEFINE_bool(
    "with_sampling", False, "also compile one rollout (sampling.sample of --episodes prompts, "
    "--prompt_len + --new_tokens, with the policy adapter) per LoRA row, on one device")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 1,8,1; reports per-device bytes")


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  shape = _mesh_arg(sys.argv)
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.AXES, shape))) if shape else None
  rows = []
  runs = [(preset, weight_dtype, rank) for preset in _PRESETS.value
          for weight_dtype in _WEIGHT_DTYPES.value for rank in [int(r) for r in _RANKS.value]]
  runs += [(preset, "bfloat16", 0) for preset in _PRESETS.value if _WITH_FULL.value]
  for preset, weight_dtype, rank in runs:
    quantized = quant.is_quantized(weight_dtype) and weight_dtype != "bf16_bits"
    embedding_dtype = _EMBEDDING_DTYPE.value if quantized and rank else ""
    cfg = model_lib.model_config(preset, dtype="bfloat16", param_dtype="bfloat16",
                                 weight_dtype=weight_dtype, embedding_dtype=embedding_dtype,
                                 remat=_REMAT.value,
                                 scan_layers=_SCAN.value, attention_chunk=_ATTENTION_CHUNK.value,
                                 mlp_chunk=_MLP_CHUNK.value)
    t0 = time.perf_counter()
    rm = memory.reward_step_memory(cfg, rank, _RM_PAIRS.value, _RM_LEN.value, mesh=mesh)
    rl = memory.rl_step_memory(cfg, rank, _EPISODES.value, _PROMPT_LEN.value,
                               _NEW_TOKENS.value, mesh=mesh)
    gib = lambda b: b / memory.GiB
    row = {"preset": preset,
           "weight_dtype": weight_dtype + (f" (emb {embedding_dtype})" if embedding_dtype else ""),
           "mesh": "x".join(map(str, shape)) if shape else "1",
           "lora_rank": rank or "full",
           "rm_trainable_params": rm["trainable_params"], "rm_total_params": rm["total_params"],
           "rm_step_peak_gib": gib(rm["peak_bytes"]),
           "rl_trainable_params": rl["trainable_params"],
           "rl_step_total_gib": gib(rl["total_bytes"]),
           "compile_s": time.perf_counter() - t0}
    for name, stats in (("rm", rm), ("rl", rl)):  # the breakdown, per device
      row.update({f"{name}_weights_gib": gib(stats["weights_bytes"]),
                  f"{name}_optimizer_gib": gib(stats["optimizer_bytes"]),
                  f"{name}_adapter_gib": gib(stats["adapter_bytes"]),
                  f"{name}_temp_gib": gib(stats["temp_bytes"]),
                  f"{name}_largest": "; ".join(stats["largest_buffers"][:3]),
                  f"{name}_analytic_gib": gib(stats["analytic"]["total"]),
                  f"{name}_analytic": {k: round(gib(v), 3) for k, v in
                                       stats["analytic"].items()}})
    if _WITH_SAMPLING.value and rank:
      rollout = memory.sampling_memory(cfg, rank, _EPISODES.value, _PROMPT_LEN.value,
                                       _NEW_TOKENS.value)
      row.update(sampling_peak_gib=gib(rollout["peak_bytes"]),
                 sampling_temp_gib=gib(rollout["temp_bytes"]),
                 sampling_largest="; ".join(rollout["largest_buffers"][:3]))
    rows.append(row)
    print(row, flush=True)
  for row in rows:
    full = next((r for r in rows if r["preset"] == row["preset"] and r["lora_rank"] == "full"),
                None)
    row["rm_vs_full"] = row["rm_step_peak_gib"] / full["rm_step_peak_gib"] if full else math.nan
    row["rl_vs_full"] = row["rl_step_total_gib"] / full["rl_step_total_gib"] if full else math.nan
  with open(os.path.join(_OUT.value, "memory.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| preset | weights | mesh | LoRA rank | RM trainable % | RM step GiB | RM vs full | "
           "RL step GiB | RL vs full |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['preset']} | {r['weight_dtype']} | {r['mesh']} | {r['lora_rank']} | "
                 f"{100 * r['rm_trainable_params'] / r['rm_total_params']:.3f} | "
                 f"{r['rm_step_peak_gib']:.1f} | {r['rm_vs_full']:.2f} | "
                 f"{r['rl_step_total_gib']:.1f} | {r['rl_vs_full']:.2f} |")
  lines += ["", "Breakdown (GiB). weights, optimizer, adapters and analytic (memory.analytic_bytes)"
            " count the whole model, unsharded; the XLA columns are per device of --mesh:", "",
            "| preset | weights | rank | step | weights GiB | optimizer | adapters | XLA "
            "temporaries | XLA peak | analytic | largest buffers |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for name in ("rm", "rl"):
      peak = r["rm_step_peak_gib"] if name == "rm" else r["rl_step_total_gib"]
      lines.append(f"| {r['preset']} | {r['weight_dtype']} | {r['lora_rank']} | {name} | "
                   f"{r[f'{name}_weights_gib']:.2f} "
                   f"| {r[f'{name}_optimizer_gib']:.3f} | {r[f'{name}_adapter_gib']:.4f} "
                   f"| {r[f'{name}_temp_gib']:.2f} | {peak:.2f} "
                   f"| {r[f'{name}_analytic_gib']:.2f} | {r[f'{name}_largest']} |")
  sampled = [r for r in rows if "sampling_peak_gib" in r]
  if sampled:
    lines += ["", "Rollout (sampling.sample, one device), GiB:", "",
              "| preset | weights | rank | peak | temporaries | largest buffers |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['weight_dtype']} | {r['lora_rank']} | "
              f"{r['sampling_peak_gib']:.2f} | {r['sampling_temp_gib']:.2f} | "
              f"{r['sampling_largest']} |" for r in sampled]
  table = "\n".join(lines)
  with open(os.path.join(_OUT.value, "memory.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
