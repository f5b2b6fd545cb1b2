r"""LoRA vs full fine-tuning of the reward model, same data, same steps.

  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo   # once: SFT + pairs
  python experiments/rm_lora_vs_full.py --base=/tmp/perl_demo --out=/tmp/rm_lora_vs_full

For each variant (LoRA ranks on attention, optionally attention+MLP, and full tuning) trains the
`reward` stage on the base run's frozen SFT backbone and preference pairs, (full tuning at
config.reward.optim.full_lr), then reads the compiled
train step's memory (XLA memory_analysis, same batch). Writes results.csv, results.md and
accuracy.png in --out.
"""
import csv
import os

from absl import app, flags

from perl_jax import common
from perl_jax import config_base
from perl_jax import main as main_lib
from perl_jax import memory

_BASE = flags.DEFINE_string("base", None, "workdir of a finished demo run (sft + prefs stages)")
_OUT = flags.DEFINE_string("out", "/tmp/rm_lora_vs_full", "output folder")
_RANKS = flags.DEFINE_list("ranks", ["4", "8", "16"], "LoRA ranks")
_MLP = flags.DEFINE_bool("with_mlp", False, "also run each rank with adapters on the MLP")
_STEPS = flags.DEFINE_integer("steps", 120, "reward steps per variant")

ATTENTION = ("attn/(q|k|v|o)$",)
ATTENTION_MLP = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")


def variants():
  out = []
  for rank in [int(r) for r in _RANKS.value]:
    out.append((f"lora_r{rank}_attn", rank, ATTENTION))
    if _MLP.value:
      out.append((f"lora_r{rank}_attn_mlp", rank, ATTENTION_MLP))
  return out + [("full", 0, ATTENTION)]


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  for name, rank, targets in variants():
    config = config_base.base_config()
    config.stages = ("reward",)
    config.model.backbone = _BASE.value
    config.reward.data.manual_dir = os.path.join(_BASE.value, "prefs")
    config.reward.data.data_dir = os.path.join(_BASE.value, "tfds")
    config.reward.train.steps = _STEPS.value
    config.lora.rank, config.lora.targets = rank, targets
    result = main_lib.run(config, os.path.join(_OUT.value, name))["stages"]["reward"]
    tok = common.load_tokenizer(config)
    cfg = common.model_cfg(config, tok.vocab_size)
    mem = memory.reward_step_memory(cfg, rank, config.reward.train.batch_size,
                                    config.data.max_len, targets)
    rows.append({"variant": name, "eval_accuracy": result["eval_accuracy"],
                 "best_eval_accuracy": result["best_eval_accuracy"],
                 "trainable_percent": result["trainable_percent"],
                 "trainable_params": result["trainable_params"],
                 "median_step_time_s": result["step_time_s"],
                 "step_peak_mib": mem["peak_bytes"] / 2 ** 20})
    print(rows[-1], flush=True)
  with open(os.path.join(_OUT.value, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| variant | eval acc | best eval acc | trainable % | median step s | step peak MiB |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['variant']} | {100 * r['eval_accuracy']:.1f}% | "
            f"{100 * r['best_eval_accuracy']:.1f}% | {r['trainable_percent']:.3f} | "
            f"{r['median_step_time_s']:.3f} | {r['step_peak_mib']:.1f} |" for r in rows]
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar([r["variant"] for r in rows], [100 * r["eval_accuracy"] for r in rows])
  ax.set(ylabel="held-out accuracy vs gold (%)", title="Reward model: LoRA vs full")
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "accuracy.png"), dpi=100)


if __name__ == "__main__":
  flags.mark_flag_as_required("base")
  app.run(main)
