r"""PERL (LoRA reward model + LoRA RL) vs full RLHF on the demo task, same SFT backbone and pairs.

  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo   # once: SFT + pairs
  python experiments/rl_lora_vs_full.py --base=/tmp/perl_demo --out=/tmp/rl_lora_vs_full

Each variant trains its own reward model and policy (LoRA at --ranks, and full fine-tuning at
each stage's optim.full_lr) on the base run's frozen SFT backbone and preference pairs, then
reports held-out RM accuracy, the reward/KL curve, the gold reward and gold win rate over the
anchor, the RL step-time split, and the compiled RL step's memory (XLA memory_analysis of the
same step at the demo's batch). Writes results.csv, results.md and curves.png in --out.
"""
import csv
import json
import os

from absl import app, flags

from perl_jax import common
from perl_jax import config_base
from perl_jax import main as main_lib
from perl_jax import memory

_BASE = flags.DEFINE_string("base", None, "workdir of a finished demo run (sft + prefs stages)")
_OUT = flags.DEFINE_string("out", "/tmp/rl_lora_vs_full", "output folder")
_RANKS = flags.DEFINE_list("ranks", ["8"], "LoRA ranks (full fine-tuning is always included)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the reward and RL stages")


def run_variant(name: str, rank: int) -> dict:
  config = config_base.base_config()
  config.stages = ("reward", "rl")
  config.seed = _SEED.value
  config.lora.rank = rank
  config.model.backbone = _BASE.value
  config.reward.data.manual_dir = os.path.join(_BASE.value, "prefs")
  config.reward.data.data_dir = os.path.join(_BASE.value, "tfds")
  workdir = os.path.join(_OUT.value, name)
  stages = main_lib.run(config, workdir)["stages"]
  rl = stages["rl"]
  tok = common.load_tokenizer(config)
  mem = memory.rl_step_memory(common.model_cfg(config, tok.vocab_size), rank,
                              config.rl.train.batch_size, config.data.prompt_len,
                              config.sampling.max_new_tokens)
  split = rl["step_time_split_s"]
  return {"variant": name, "rm_accuracy": stages["reward"]["best_eval_accuracy"],
          "rl_trainable_params": rl["trainable_params"],
          "reward_initial": rl["reward_initial"], "reward_final": rl["reward_final"],
          "kl_final": rl["kl_final"], "anchor_gold_reward": rl["anchor_gold_reward"],
          "gold_reward": rl["gold_reward"], "gold_win_rate": rl["gold_win_rate_vs_anchor"],
          "rollout_s": split["rollout"], "scoring_s": split["scoring"],
          "update_s": split["update"], "rl_step_mib": mem["total_bytes"] / 2 ** 20,
          "curve": json.load(open(os.path.join(workdir, "rl", "curve.json")))}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  variants = [(f"lora_r{r}", int(r)) for r in _RANKS.value] + [("full", 0)]
  rows = []
  for name, rank in variants:
    rows.append(run_variant(name, rank))
    print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
  columns = [k for k in rows[0] if k != "curve"]
  with open(os.path.join(_OUT.value, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  lines = ["| variant | RM acc | RL trainable | RM reward | gold reward | gold win rate | KL | "
           "rollout / scoring / update s | RL step MiB |", "|---|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['variant']} | {100 * r['rm_accuracy']:.1f}% | {r['rl_trainable_params']:,} | "
            f"{r['reward_initial']:.3f} → {r['reward_final']:.3f} | "
            f"{r['anchor_gold_reward']:.3f} → {r['gold_reward']:.3f} | "
            f"{100 * r['gold_win_rate']:.1f}% | {r['kl_final']:.2f} | "
            f"{r['rollout_s']:.2f} / {r['scoring_s']:.2f} / {r['update_s']:.2f} | "
            f"{r['rl_step_mib']:.1f} |" for r in rows]
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in rows:
    evals = [c for c in r["curve"] if "eval_gold_reward" in c]
    steps = [c["step"] for c in evals]
    axes[0].plot(steps, [c["eval_gold_reward"] for c in evals], "o-", label=r["variant"])
    axes[1].plot(steps, [c["eval_kl"] for c in evals], "o-", label=r["variant"])
  axes[0].set(xlabel="RL step", ylabel="held-out gold reward", title="Gold reward")
  axes[1].set(xlabel="RL step", ylabel="KL(policy || anchor), nats", title="KL to the anchor")
  for ax in axes:
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "curves.png"), dpi=100)


if __name__ == "__main__":
  flags.mark_flag_as_required("base")
  app.run(main)
