r"""LoRA vs full fine-tuning of the reward model, same backbone, data and steps.

The demo (preference pairs sampled from its SFT model, accuracy against the gold judge):
  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo   # once: SFT + pairs
  python experiments/rm_lora_vs_full.py --base=/tmp/perl_demo --out=/tmp/rm_lora_vs_full

Taskmaster Coffee (the released reward examples, pointwise, BCE; balanced accuracy and ROC AUC
too; add --config.reward.balance_classes=True for class-balanced BCE):
  python -m perl_jax.main --config=configs/paper/taskmaster.py --workdir=/tmp/perl_taskmaster \
      --config.data.manual_dir=TM-4-2024 --config.stages=sft              # once: SFT
  python experiments/rm_lora_vs_full.py --config=configs/paper/taskmaster.py \
      --config.data.manual_dir=TM-4-2024 --base=/tmp/perl_taskmaster --out=/tmp/rm_tm

For each variant (LoRA ranks on attention, with --with_mlp also attention+MLP, and full tuning at
config.reward.optim.full_lr) trains the `reward` stage on the base run's frozen SFT backbone and
reads the compiled train step's memory (XLA memory_analysis). Writes results.csv, results.md and
accuracy.png in --out.
"""
import csv
import os

from absl import app, flags
import importlib.util

from perl_jax import main as main_lib  # defines --config (and its overrides) and --workdir

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_BASE = flags.DEFINE_string("base", None, "workdir of a finished run of the config's sft stage "
                            "(and prefs stage, for the demo)")
_OUT = flags.DEFINE_string("out", "/tmp/rm_lora_vs_full", "output folder")
_RANKS = flags.DEFINE_list("ranks", ["1", "4", "8", "16", "32"], "LoRA ranks")
_MLP = flags.DEFINE_bool("with_mlp", False, "also run each rank with adapters on the MLP")
_FULL = flags.DEFINE_bool("with_full", True, "also run full fine-tuning")
_STEPS = flags.DEFINE_integer("steps", 0, "reward steps per variant; 0 = the config's")

ATTENTION = ("attn/(q|k|v|o)$",)
ATTENTION_MLP = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")


def variants():
  out = []
  for rank in [int(r) for r in _RANKS.value]:
    out.append((f"lora_r{rank}_attn", rank, ATTENTION))
    if _MLP.value:
      out.append((f"lora_r{rank}_attn_mlp", rank, ATTENTION_MLP))
  return out + ([("full", 0, ATTENTION)] if _FULL.value else [])


def base_config():
  """--config with its overrides, or configs/demo.py."""
  if flags.FLAGS.config is not None:
    return flags.FLAGS.config
  spec = importlib.util.spec_from_file_location("demo_config", DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  for name, rank, targets in variants():
    config = base_config().copy_and_resolve_references()
    config.stages = ("reward",)
    config.model.backbone = _BASE.value
    if config.reward.data.name == "jsonl_preferences":  # the demo's sampled pairs
      config.reward.data.manual_dir = os.path.join(_BASE.value, "prefs")
    config.reward.data.data_dir = os.path.join(_BASE.value, "tfds")
    if _STEPS.value:
      config.reward.train.steps = _STEPS.value
    config.lora.rank, config.lora.targets = rank, targets
    result = main_lib.run(config, os.path.join(_OUT.value, name))["stages"]["reward"]
    rows.append({"variant": name, "eval_accuracy": result["eval_accuracy"],
                 "best_eval_accuracy": result["best_eval_accuracy"],
                 "eval_balanced_accuracy": result.get("eval_balanced_accuracy", float("nan")),
                 "eval_auc": result.get("eval_auc", float("nan")),
                 "trainable_percent": result["trainable_percent"],
                 "trainable_params": result["trainable_params"],
                 "median_step_time_s": result["step_time_s"],
                 "step_peak_mib": result["train_step_memory"]["peak_bytes"] / 2 ** 20})
    print(rows[-1], flush=True)
  with open(os.path.join(_OUT.value, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| variant | eval acc | best eval acc | balanced acc | ROC AUC | trainable % "
           "| median step s | step peak MiB |", "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['variant']} | {100 * r['eval_accuracy']:.1f}% | "
            f"{100 * r['best_eval_accuracy']:.1f}% | {100 * r['eval_balanced_accuracy']:.1f}% | "
            f"{r['eval_auc']:.3f} | "
            f"{r['trainable_percent']:.3f} | "
            f"{r['median_step_time_s']:.3f} | {r['step_peak_mib']:.1f} |" for r in rows]
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar([r["variant"] for r in rows], [100 * r["eval_accuracy"] for r in rows])
  ax.set(ylabel="held-out accuracy (%)", title="Reward model: LoRA vs full")
  ax.tick_params(axis="x", labelrotation=30)
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "accuracy.png"), dpi=100)


if __name__ == "__main__":
  flags.mark_flag_as_required("base")
  app.run(main)
