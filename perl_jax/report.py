"""The `report` stage: one table, one JSON and PNG curves for a finished pipeline run.

Reads what the earlier stages returned (already in the summary) and WORKDIR/rl/curve.json; writes
WORKDIR/report.md and WORKDIR/rl_curves.png, and prints the table.
"""
from __future__ import annotations

import json
import os

import ml_collections

from perl_jax import distributed


def _rows(stages: dict) -> list[tuple[str, str]]:
  rows = []
  sft, prefs, reward, rl = (stages.get(k, {}) for k in ("sft", "prefs", "reward", "rl"))
  if sft:
    rows += [("SFT held-out perplexity", f"{sft['eval_perplexity']:.3f}"),
             ("SFT samples well-formed", f"{100 * sft['samples_well_formed']:.0f}%")]
    rows += [(f"SFT samples: {k[len('samples_'):]}", f"{v:.3f}") for k, v in sft.items()
             if k.startswith("samples_") and k != "samples_well_formed"
             and isinstance(v, float)]
  if prefs:
    rows += [("preference pairs (train / held-out)",
              f"{prefs['train_pairs']} / {prefs['eval_pairs']}"),
             ("train labels agreeing with gold", f"{100 * prefs['train_labels_agreeing_with_gold']:.0f}%")]
  if reward:
    rows += [("RM held-out accuracy", f"{100 * reward['eval_accuracy']:.1f}%"),
             ("RM best held-out accuracy" + (" (best by ROC AUC)" if reward.get(
                 "best_selected_by") == "auc" else ""),
              f"{100 * reward['best_eval_accuracy']:.1f}%"),
             *([("RM best held-out ROC AUC", f"{reward['best_eval_auc']:.3f}")]
               if reward.get("best_eval_auc") is not None else []),
             *([("RM held-out balanced accuracy",
                 f"{100 * reward['eval_balanced_accuracy']:.1f}%")]
               if "eval_balanced_accuracy" in reward else []),
             *([("RM held-out ROC AUC", f"{reward['eval_auc']:.3f}")]
               if "eval_auc" in reward else []),
             ("RM trainable params", f"{reward['trainable_params']:,} of {reward['total_params']:,}"
              f" ({reward['trainable_percent']:.2f}%)")]
  if rl:
    rows += [("RL trainable params", f"{rl['trainable_params']:,} ({rl['trainable_percent']:.2f}%)"),
             ("RM reward, policy before -> after", f"{rl['reward_initial']:.3f} -> {rl['reward_final']:.3f}"),
             ("KL(policy || anchor), held-out", f"{rl['kl_final']:.3f}"),
             ("RM win rate of policy vs anchor", f"{100 * rl['win_rate_vs_anchor']:.1f}%")]
    rows += [(f"{k.replace('_', ' ')} (task judge), anchor -> policy",
              f"{rl[f'anchor_{k}']:.3f} -> {rl[k]:.3f}") for k in rl
             if f"anchor_{k}" in rl and k != "reward" and isinstance(rl[k], float)]
    if "gold_win_rate_vs_anchor" in rl:
      rows.append(("gold win rate of policy vs anchor",
                   f"{100 * rl['gold_win_rate_vs_anchor']:.1f}%"))
    split = rl["step_time_split_s"]
    rows.append(("RL step time (rollout / scoring / update)",
                 f"{split['rollout']:.2f} / {split['scoring']:.2f} / {split['update']:.2f} s"))
  for name, stage in stages.items():
    if "wall_time_s" in stage:
      rows.append((f"wall time: {name}", f"{stage['wall_time_s']:.0f} s"))
  return rows


def plot_curves(curve: list[dict], path: str) -> None:
  import matplotlib  # imported here: only the report stage draws
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  train = [c for c in curve if "reward" in c]
  steps = [c["step"] for c in train]
  axes[0].plot(steps, [c["reward"] for c in train], label="train batch (RM)", alpha=0.6)
  evals = [c for c in curve if "eval_reward" in c]
  axes[0].plot([c["step"] for c in evals], [c["eval_reward"] for c in evals], "o-",
               label="held-out (RM)")
  if evals and "eval_gold_reward" in evals[0]:
    axes[0].plot([c["step"] for c in evals], [c["eval_gold_reward"] for c in evals], "s-",
                 label="held-out (gold)")
  axes[0].set(xlabel="RL step", ylabel="reward", title="Reward")
  axes[0].legend()
  axes[1].plot(steps, [c["kl"] for c in train], label="train batch", alpha=0.6)
  axes[1].plot([c["step"] for c in evals], [c["eval_kl"] for c in evals], "o-", label="held-out")
  axes[1].set(xlabel="RL step", ylabel="KL(policy || anchor), nats", title="KL to the anchor")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str, mesh, writer) -> dict:
  del config, mesh, writer
  summary_path = os.path.join(workdir, "summary.json")
  stages = json.load(open(summary_path))["stages"] if os.path.exists(summary_path) else {}
  rows = _rows(stages)
  width = max(len(k) for k, _ in rows) if rows else 0
  table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
  print("perl_jax report\n" + table, flush=True)
  lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
  rl = stages.get("rl", {})
  if rl.get("samples_before"):
    lines += ["", "Held-out samples, anchor (before RL) and policy (after RL):", ""]
    for before, after in zip(rl["samples_before"], rl["samples_after"]):
      lines += [f"- before: {before}", f"- after:  {after}"]
  out = {"report": os.path.join(workdir, "report.md")}
  if not distributed.is_primary():  # process 0 writes the files
    return out
  with open(out["report"], "w") as f:
    f.write("\n".join(lines) + "\n")
  curve_path = os.path.join(workdir, "rl", "curve.json")
  if os.path.exists(curve_path):
    out["plot"] = os.path.join(workdir, "rl_curves.png")
    plot_curves(json.load(open(curve_path)), out["plot"])
    print(f"[report] curves in {out['plot']}", flush=True)
  return out
