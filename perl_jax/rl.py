"""The `rl` stage: PERL reinforcement learning of a LoRA policy against the reward model.

Roles, not copies. One frozen backbone serves as
  anchor  = backbone, no adapter (the SFT model the KL keeps us near),
  policy  = backbone + policy adapter (trained),
  reward  = backbone + reward adapter + head (from the `reward` stage, frozen),
  value   = backbone + value adapter + head (trained; REINFORCE baseline and PPO critic).
With lora.rank=0 the policy and value models are full copies (the full-RLHF baseline).

Each step: sample completions from the policy (jitted KV-cache decode), score them (reward model,
anchor and policy log-probs, values) in one jitted pass, then update by `rl.algorithm`:
  reinforce  REINFORCE with a learned value baseline V(prompt) (the paper's choice),
  rloo       k samples per prompt, leave-one-out baseline, no value model,
  ppo        clipped ratio, per-token values, GAE.
The objective is E[(1 - beta) * reward - beta * KL(policy || anchor)]. With rl.kl_mode="reward"
the KL enters the return as the summed k1 estimate; with "loss" it is a k3 penalty in the loss.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perl_jax import checkpoint as checkpoint_lib
from perl_jax import common
from perl_jax import lora as lora_lib
from perl_jax import losses
from perl_jax import roles
from perl_jax import sampling
from perl_jax import sft
from perl_jax import sharding as sharding_lib
from perl_jax import tasks
from perl_jax import train as train_lib
from perl_jax.data import batching
from perl_jax.progress import Progress

ALGORITHMS = ("reinforce", "rloo", "ppo")


# ----------------------------------------------------------------------------- roles


def policy_variables(trainable, frozen):
  return {"params": frozen["params"], **trainable["policy"]}


def value_variables(trainable, frozen):
  return {"params": frozen["params"], **trainable["value"]}


def anchor_variables(frozen):
  """The backbone alone, or with the frozen SFT adapter when the policy started from one."""
  if "anchor_adapter" in frozen:
    return {"params": frozen["params"], lora_lib.ADAPTER: frozen["anchor_adapter"]}
  return {"params": frozen["params"]}


@jax.jit
def policy_is_anchor(trainable, frozen):
  """Whether the policy computes exactly the anchor's function, as it does before its first
  update: every lora_b of its adapter zero (or the adapter equal to the frozen SFT adapter the
  policy started from), or a full copy equal to the backbone. A scalar bool array."""
  policy = trainable["policy"]
  if "params" in policy:
    same = [jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(policy["params"]),
                                                 jax.tree.leaves(frozen["params"]))]
  elif "anchor_adapter" in frozen:
    same = [jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(policy[lora_lib.ADAPTER]),
                                                 jax.tree.leaves(frozen["anchor_adapter"]))]
  else:
    flat = jax.tree_util.tree_flatten_with_path(policy[lora_lib.ADAPTER])[0]
    same = [jnp.all(leaf == 0) for path, leaf in flat
            if getattr(path[-1], "key", None) == "lora_b"]
    if len(same) == 0:  # no LoRA leaves: nothing says the policy is the anchor
      return jnp.asarray(False)
  return jnp.all(jnp.stack(same))


def init_roles(model, backbone, full_finetune: bool, seed: int, with_value: bool,
               sft_adapter=None, mesh=None):
  """(trainable, frozen): policy (+ value) adapters over one frozen backbone, or full copies.

  Adapters are created on their shardings (roles.new_adapter). With `sft_adapter` (a LoRA SFT
  result), the policy adapter starts as a copy of it and the anchor is the backbone with that
  adapter frozen: the adapter is copied, never the backbone.
  """
  policy_adapter = roles.new_adapter(model, seed + 11, mesh)
  value_adapter = roles.new_adapter(model, seed + 12, mesh, score_head=True)
  frozen = {"params": backbone}
  if sft_adapter is not None:
    if full_finetune:
      raise ValueError("an SFT adapter needs LoRA RL (lora.rank > 0); merge it for full RL")
    policy_adapter = jax.tree.map(jnp.copy, sft_adapter)
    frozen["anchor_adapter"] = sft_adapter
  if full_finetune:  # adapters hold only the value head here
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    trainable = {"policy": {"params": copy(backbone)}}
    value = {"params": copy(backbone), lora_lib.ADAPTER: value_adapter}
  else:
    trainable = {"policy": {lora_lib.ADAPTER: policy_adapter}}
    value = {lora_lib.ADAPTER: value_adapter}
  if with_value:
    trainable["value"] = value
  return trainable, frozen


# ----------------------------------------------------------------------------- scoring


def make_scorer(model, reward_fn, rl_cfg, prompt_len: int, with_value: bool, eos_id: int):
  """Jitted: rollout -> rewards, anchor/policy log-probs, entropy, values.

  reward_fn(reward_variables, tokens, input_mask) -> [B] scores the whole sequences (the reward
  model's head at the last real token, or any programmatic reward).
  """

  @jax.jit
  def score(trainable, frozen, reward_variables, rollout):
    tokens, input_mask = rollout["tokens"], rollout["input_mask"]
    cmask = rollout["completion_mask"]
    rm_scores = reward_fn(reward_variables, tokens, input_mask)
    reached_eos = jnp.any(rollout["completion"] == eos_id, axis=1)
    rm_scores = rm_scores - rl_cfg.missing_eos_penalty * (~reached_eos)
    policy_logprobs, entropy = roles.token_logprobs(
        model, policy_variables(trainable, frozen), tokens, input_mask, prompt_len,
        with_entropy=True)
    anchor_logprobs, _ = roles.token_logprobs(model, anchor_variables(frozen), tokens,
                                              input_mask, prompt_len)
    out = {"rm_scores": rm_scores, "policy_logprobs": policy_logprobs,
           "anchor_logprobs": anchor_logprobs,
           "kl": losses.masked_sum(losses.kl_k1(policy_logprobs, anchor_logprobs), cmask),
           "entropy": losses.masked_mean(entropy, cmask, axis=1),
           "length": jnp.sum(cmask, axis=1).astype(jnp.float32)}
    if with_value:
      out["values"] = roles.token_values(model, value_variables(trainable, frozen), tokens,
                                         input_mask, prompt_len)
    return out

  return score


def shape_returns(scored, cmask, rl_cfg):
  """Per-sequence returns [B] and per-token rewards [B, N] of the PERL objective."""
  beta = rl_cfg.kl_coef
  rm = scored["rm_scores"]
  if rl_cfg.whiten_rewards:
    rm = losses.whiten(rm)
  task_reward = (1.0 - beta) * rm
  kl_tokens = losses.kl_k1(scored["policy_logprobs"], scored["anchor_logprobs"]) * cmask
  token_rewards = -beta * kl_tokens if rl_cfg.kl_mode == "reward" else jnp.zeros_like(kl_tokens)
  last = jnp.sum(cmask, axis=1).astype(jnp.int32) - 1
  token_rewards = token_rewards + jax.nn.one_hot(last, cmask.shape[1]) * task_reward[:, None]
  return jnp.sum(token_rewards, axis=1), token_rewards


# ----------------------------------------------------------------------------- loss


def rl_loss_fn(model, rl_cfg, prompt_len: int):
  """Pure loss of one RL update; the batch holds the scored rollout and its advantages.

  The policy and value forwards here are training passes: LoRA dropout (lora.dropout) is on,
  drawn from the step's rng, as in the reward and SFT losses. Rollouts and their scores (the
  old and anchor log-probs, the values behind the advantages) stay deterministic, so under
  dropout PPO's ratio compares a dropped-out policy with the deterministic one that sampled
  (as TRL with PEFT dropout does); with dropout 0 nothing here depends on the rng.
  """
  algorithm = rl_cfg.algorithm

  def values_of(trainable, frozen, tokens, input_mask, rng):  # a training pass: dropout on
    return roles.token_values(model, value_variables(trainable, frozen), tokens, input_mask,
                              prompt_len, deterministic=False, rng=rng)

  def loss_fn(trainable, frozen, batch, rng):
    policy_rng, value_rng = jax.random.split(rng)
    tokens, input_mask, cmask = batch["tokens"], batch["input_mask"], batch["completion_mask"]
    cmask = cmask.astype(jnp.float32)
    logprobs, entropy = roles.token_logprobs(model, policy_variables(trainable, frozen), tokens,
                                             input_mask, prompt_len, with_entropy=True,
                                             deterministic=False, rng=policy_rng)
    metrics = {"reward": jnp.mean(batch["rm_scores"]), "kl": jnp.mean(batch["kl"]),
               "return": jnp.mean(batch["returns"]), "response_length": jnp.mean(batch["length"]),
               "entropy": jnp.mean(losses.masked_mean(entropy, cmask, axis=1))}
    if algorithm == "ppo":
      pg_loss, clip_fraction = losses.ppo_policy_loss(
          logprobs, batch["policy_logprobs"], batch["advantages"], cmask, rl_cfg.ppo_clip)
      values = values_of(trainable, frozen, tokens, input_mask, value_rng)
      v_loss = losses.value_loss(values, batch["token_returns"], cmask, batch["values"],
                                 rl_cfg.value_clip)
      metrics["clip_fraction"] = clip_fraction
    else:
      pg_loss = losses.reinforce_loss(logprobs, cmask, batch["advantages"])
      v_loss = 0.0
      if algorithm == "reinforce":
        prompt_values = values_of(trainable, frozen, tokens, input_mask, value_rng)[:, 0]
        v_loss = losses.value_loss(prompt_values, batch["returns"])
    loss = pg_loss + rl_cfg.value_coef * v_loss
    if rl_cfg.kl_mode == "loss":
      kl_penalty = jnp.mean(losses.masked_sum(
          losses.kl_k3(logprobs, batch["anchor_logprobs"]), cmask))
      loss = loss + rl_cfg.kl_coef * kl_penalty
      metrics["kl_k3"] = kl_penalty
    metrics.update(pg_loss=pg_loss, value_loss=v_loss)
    return loss, metrics

  return loss_fn


def advantages_for(scored, returns, token_rewards, cmask, rl_cfg):
  """What the update needs besides the rollout: advantages and value targets."""
  if rl_cfg.algorithm == "rloo":
    adv = losses.rloo_advantages(returns, rl_cfg.samples_per_prompt)
    return {"advantages": adv}
  if rl_cfg.algorithm == "reinforce":
    baseline = scored["values"][:, 0]  # V(prompt): the value before the first completion token
    adv = returns - baseline
    if rl_cfg.whiten_advantages:
      adv = losses.whiten(adv)
    return {"advantages": adv}
  adv, token_returns = losses.gae(token_rewards, scored["values"], cmask, rl_cfg.gamma,
                                  rl_cfg.gae_lambda)
  if rl_cfg.whiten_advantages:
    adv = losses.whiten(adv, cmask) * cmask
  return {"advantages": adv, "token_returns": token_returns}


# ----------------------------------------------------------------------------- stage


def validate(rl_cfg):
  if rl_cfg.algorithm not in ALGORITHMS:
    raise ValueError(f"rl.algorithm must be one of {ALGORITHMS}, got {rl_cfg.algorithm!r}")
  if rl_cfg.kl_mode not in ("reward", "loss"):
    raise ValueError(f"rl.kl_mode must be 'reward' or 'loss', got {rl_cfg.kl_mode!r}")
  if rl_cfg.algorithm == "rloo" and rl_cfg.samples_per_prompt < 2:
    raise ValueError("rl.algorithm='rloo' needs rl.samples_per_prompt >= 2")
  episodes = rl_cfg.prompts_per_step * rl_cfg.samples_per_prompt
  if rl_cfg.train.batch_size != episodes:
    raise ValueError(f"rl.train.batch_size ({rl_cfg.train.batch_size}) must equal "
                     f"rl.prompts_per_step * rl.samples_per_prompt ({episodes})")
  if not 0.0 <= rl_cfg.kl_coef < 1.0:
    raise ValueError(f"rl.kl_coef (beta) must be in [0, 1), got {rl_cfg.kl_coef}")


def make_update_batch(rl_cfg, with_value: bool):
  """jit of (rollout, scored) -> the update's batch: the rollout, its scores, returns and
  advantages, all on device (no host round trip between scoring and the update)."""
  keep = ("rm_scores", "policy_logprobs", "anchor_logprobs", "kl", "length") + (
      ("values",) if with_value else ())

  @jax.jit
  def update_batch(rollout, scored):
    cmask = rollout["completion_mask"].astype(jnp.float32)
    returns, token_rewards = shape_returns(scored, cmask, rl_cfg)
    extra = advantages_for(scored, returns, token_rewards, cmask, rl_cfg)
    return {"tokens": rollout["tokens"], "input_mask": rollout["input_mask"],
            "completion_mask": rollout["completion_mask"], "returns": returns, **extra,
            **{k: scored[k] for k in keep}}

  return update_batch


def train_policy(*, name, stage_dir, config, mesh, writer, model, trainable, frozen, reward_fn,
                 reward_variables, prompt_arrays, sample_cfg, eval_fn=None) -> dict:
  """The RL loop: rollouts from the current policy, scoring, then `rl.algorithm`'s update.

  prompt_arrays: {"tokens", "mask"} left-padded training prompts of length data.prompt_len.
  Returns fit's result plus the median rollout and scoring times.
  """
  rl_cfg = config.rl
  validate(rl_cfg)
  prompt_len = prompt_arrays["tokens"].shape[1]
  with_value = rl_cfg.algorithm in ("reinforce", "ppo")
  score = make_scorer(model, reward_fn, rl_cfg, prompt_len, with_value, sample_cfg.eos_id)
  update_batch = make_update_batch(rl_cfg, with_value)

  timings = {"rollout": [], "scoring": []}
  rollout_key = jax.random.key(config.seed + 21)

  def rollout_batch(step, trainable):
    prompts = batching.batch_at(prompt_arrays, step, rl_cfg.prompts_per_step, config.seed)
    k = rl_cfg.samples_per_prompt
    prompts = sharding_lib.put_batch({"tokens": np.repeat(prompts["tokens"], k, axis=0),
                                      "mask": np.repeat(prompts["mask"], k, axis=0)}, mesh)
    t0 = time.perf_counter()
    rollout = sampling.sample(model, policy_variables(trainable, frozen), prompts["tokens"],
                              prompts["mask"], train_lib.step_key(rollout_key, step, mesh),
                              sample_cfg)
    jax.block_until_ready(rollout)
    t1 = time.perf_counter()
    batch = update_batch(rollout, score(trainable, frozen, reward_variables, rollout))
    jax.block_until_ready(batch)  # stays on device, on its sharding: no host round trip
    timings["rollout"].append(t1 - t0)
    timings["scoring"].append(time.perf_counter() - t1)
    return batch

  result = train_lib.fit(
      name=name, workdir=stage_dir, train_cfg=rl_cfg.train,
      optim_cfg=common.optim_for(rl_cfg.optim, config.lora.rank == 0), seed=config.seed,
      mesh=mesh, loss_fn=rl_loss_fn(model, rl_cfg, prompt_len), trainable=trainable, frozen=frozen,
      batch_at=rollout_batch, batch_uses_state=True, eval_fn=eval_fn,
      meta={"stage": name, "algorithm": rl_cfg.algorithm}, writer=writer)
  median = lambda xs: float(np.median(xs[1:] if len(xs) > 1 else xs)) if xs else float("nan")
  result["rollout_time_s"] = median(timings["rollout"])  # the first call compiles: skipped
  result["scoring_time_s"] = median(timings["scoring"])
  return result


def sft_adapter_path(config, workdir: str) -> str:
  """rl.sft_adapter, else this workdir's LoRA SFT adapter when there is one, else ""."""
  if config.rl.sft_adapter:
    return config.rl.sft_adapter
  path = sft.adapter_path(workdir)
  return path if os.path.isdir(path) else ""


def _roles(config, workdir: str, model, tok, mesh):
  """(rm_model, rm_variables, trainable, frozen): the reward model, and the policy (and value)
  to train on the one frozen backbone, all on `mesh`."""
  rl_cfg, full_finetune = config.rl, config.lora.rank == 0
  rm_model, rm_variables = roles.load_reward_model(config, workdir, tok, mesh)
  # Under LoRA the reward model's backbone *is* the policy's: the same arrays, not a copy.
  backbone = rm_variables["params"] if not full_finetune else roles.backbone_for(
      config, workdir, model, mesh)
  sft_adapter, adapter_path = None, sft_adapter_path(config, workdir)
  if adapter_path:  # a LoRA SFT result: the policy starts from it, the anchor keeps it
    expected = roles.abstract_variables(model)[lora_lib.ADAPTER]
    sft_adapter = checkpoint_lib.load_tree(adapter_path, roles.sharded_abstract(expected, mesh))
    lora_lib.check_adapter_tree(expected, sft_adapter, f"the SFT adapter ({adapter_path})")
    print(f"[rl] the policy starts from the SFT adapter {adapter_path}; the anchor keeps it",
          flush=True)
  trainable, frozen = init_roles(model, backbone, full_finetune, config.seed,
                                 rl_cfg.algorithm in ("reinforce", "ppo"), sft_adapter, mesh)
  return rm_model, rm_variables, common.place(trainable, mesh), common.place(frozen, mesh)


def _initial_eval(stage_dir: str, evaluate, trainable) -> dict:
  """The held-out evaluation before training, computed once per workdir (kept on disk, so a
  resumed run reports the same starting point)."""
  path = os.path.join(stage_dir, "initial_eval.json")
  if os.path.exists(path):
    return json.load(open(path))
  initial = evaluate(trainable)
  common.write_json(path, initial)
  return initial


def _write_curve(stage_dir: str, initial: dict, history: list[dict], judged_keys: list[str]):
  start = {"step": 0, "eval_reward": initial["reward"], "eval_kl": initial["kl"]}
  start.update({f"eval_{k}": initial[k] for k in judged_keys})
  keys = ("step", "reward", "kl", "eval_reward", "eval_kl", *(f"eval_{k}" for k in judged_keys))
  curve = [start] + [{k: h[k] for k in keys if k in h} for h in history]
  common.write_json(os.path.join(stage_dir, "curve.json"), curve)


def _summary(config, initial: dict, final: dict, result: dict, report: dict,
             judged_keys: list[str]) -> dict:
  """The stage's results (and its closing line): reward model, KL, judge, timings."""
  rl_cfg = config.rl
  samples, initial_samples = final.pop("samples"), initial.pop("samples", [])
  rollout_s, scoring_s = result["rollout_time_s"], result["scoring_time_s"]
  batch_tokens = rl_cfg.prompts_per_step * rl_cfg.samples_per_prompt * (
      config.sampling.max_new_tokens)
  summary = {"reward_initial": initial["reward"], "reward_final": final["reward"],
             "kl_final": final["kl"], "win_rate_vs_anchor": final["win_rate_vs_anchor"],
             "steps": result["steps"],
             "step_time_s": result["step_time_s"] + rollout_s + scoring_s,
             "step_time_split_s": {"rollout": rollout_s, "scoring": scoring_s,
                                   "update": result["step_time_s"]},
             "rollout_tokens_per_s": batch_tokens / rollout_s,
             "train_step_memory": result["step_memory"],
             "samples_before": initial_samples, "samples_after": samples,
             **{f"final_{k}": v for k, v in final.items()},
             **{f"initial_{k}": v for k, v in initial.items()}, **report}
  for key in judged_keys + ["gold_win_rate_vs_anchor"]:
    if key in final:
      summary[key] = final[key]
      if f"anchor_{key}" in final:
        summary[f"anchor_{key}"] = final[f"anchor_{key}"]
  print(f"[rl] reward {summary['reward_initial']:.3f} -> {summary['reward_final']:.3f}, "
        f"KL {summary['kl_final']:.3f}, RM win rate vs anchor "
        f"{summary['win_rate_vs_anchor']:.2f}" +
        "".join(f", {k} {final[f'anchor_{k}']:.3f} (anchor) -> {final[k]:.3f}"
                for k in judged_keys) +
        (f", gold win rate {final['gold_win_rate_vs_anchor']:.2f}"
         if "gold_win_rate_vs_anchor" in final else ""), flush=True)
  return summary


def run(config: ml_collections.ConfigDict, workdir: str, mesh, writer) -> dict:
  rl_cfg = config.rl
  validate(rl_cfg)
  stage_dir = os.path.join(workdir, "rl")
  os.makedirs(stage_dir, exist_ok=True)
  tok = common.load_tokenizer(config)
  model = common.build_model(config, common.model_cfg(config, tok.vocab_size))
  rm_model, rm_variables, trainable, frozen = _roles(config, workdir, model, tok, mesh)
  report = common.param_report(trainable, frozen)
  what = "full model copies" if config.lora.rank == 0 else "LoRA adapters"
  print(f"[rl] {rl_cfg.algorithm}: training {what} ({report['trainable_params']:,} params); "
        f"beta={rl_cfg.kl_coef}, kl_mode={rl_cfg.kl_mode}, "
        f"{rl_cfg.prompts_per_step} prompts x {rl_cfg.samples_per_prompt} samples per step",
        flush=True)
  sample_cfg = roles.sampling_config(config, tok, rl_cfg.temperature)
  reward_fn = functools.partial(roles.sequence_scores, rm_model)
  evaluate = make_evaluator(config, workdir, model, reward_fn, rm_variables, frozen, tok,
                            sample_cfg)

  evaluated = {}  # the latest evaluation: {"trainable", "metrics"}

  def eval_fn(trainable):
    metrics = evaluate(trainable)
    evaluated.update(trainable=trainable, metrics=dict(metrics))
    for line in metrics.pop("samples"):
      print(f"[rl] sample: {line}", flush=True)
    return metrics

  initial = _initial_eval(stage_dir, evaluate, trainable)
  # The task judge's metrics (evaluate() reports each beside its anchor_ value, as it does the
  # reward model's "reward").
  judged_keys = [k for k in initial if f"anchor_{k}" in initial and k != "reward"]
  print(f"[rl] before training: reward {initial['reward']:.3f}" +
        "".join(f", {k} {initial[k]:.3f}" for k in judged_keys), flush=True)
  prompts = tasks.get(config.task).rl_prompts(config, workdir)
  prompt_tokens, prompt_mask = roles.encode_prompts(tok, prompts, config.data.prompt_len)
  result = train_policy(name="rl", stage_dir=stage_dir, config=config, mesh=mesh, writer=writer,
                        model=model, trainable=trainable, frozen=frozen, reward_fn=reward_fn,
                        reward_variables=rm_variables,
                        prompt_arrays={"tokens": prompt_tokens, "mask": prompt_mask},
                        sample_cfg=sample_cfg, eval_fn=eval_fn)
  # From metrics.jsonl, not fit's history: that holds only this process's steps after a resume.
  _write_curve(stage_dir, initial, train_lib.read_history(workdir, "rl"), judged_keys)
  final = final_evaluation(evaluate, evaluated, result["state"]["trainable"])
  return _summary(config, initial, final, result, report, judged_keys)


def final_evaluation(evaluate, evaluated: dict, trainable) -> dict:
  """evaluate(trainable), or the evaluation fit already made of these very adapters at its last
  step (the same adapters and sampling keys give the same metrics; with 384 held-out prompts on
  a CPU that is ~10 minutes). A resumed, finished stage trains no step, so it evaluates here."""
  if evaluated and evaluated["trainable"] is trainable:
    return dict(evaluated["metrics"])
  return evaluate(trainable)


def make_evaluator(config, workdir, model, reward_fn, reward_variables, frozen, tok, sample_cfg):
  """Held-out evaluation: policy vs anchor samples on prompts RL never trains on, scored by the
  reward model and by the task's judge (e.g. the reviews task's gold reward)."""
  rl_cfg = config.rl
  prompts, judge = tasks.get(config.task).eval_set(config, workdir)
  tokens, mask = (jnp.asarray(a) for a in roles.encode_prompts(tok, prompts,
                                                                config.data.prompt_len))
  rng = jax.random.key(config.seed + 31)
  scorer = make_scorer(model, reward_fn, rl_cfg, config.data.prompt_len, False, tok.eos_id)
  anchor_cache = {}

  def rollout_and_score(trainable, variables, who):
    # One jitted sampling call over every prompt: a line before it, and one after it if it
    # took long (with 384 prompts of a 270M model on a CPU, minutes).
    print(f"[rl] evaluating the {who} on {len(prompts)} held-out prompts", flush=True)
    progress = Progress("rl", f"evaluated the {who}:", len(prompts), "prompts")
    rollout = sampling.sample(model, variables, tokens, mask, rng, sample_cfg)
    scored = jax.device_get(scorer(trainable, frozen, reward_variables, rollout))
    texts = [tok.decode(c) for c in jax.device_get(rollout["completion"])]
    progress.update(len(prompts))
    return scored, texts, judge(texts)

  def evaluate(trainable):
    if "anchor" not in anchor_cache:
      anchor_cache["anchor"] = rollout_and_score(trainable, anchor_variables(frozen), "anchor")
    anchor_scored, _, anchor_judged = anchor_cache["anchor"]
    if bool(policy_is_anchor(trainable, frozen)):
      # Before any update (the initial evaluation) the policy is the anchor's function: sampled
      # with the same key its turns would be the anchor's. With 384 prompts of a 270M model on
      # a CPU this saves ~10 minutes.
      print("[rl] the policy is still the anchor (no update yet): its evaluation is the "
            "anchor's", flush=True)
      scored, texts, judged = anchor_cache["anchor"]
    else:
      scored, texts, judged = rollout_and_score(trainable, policy_variables(trainable, frozen),
                                                "policy")
    win = lambda a, b: float(np.mean((a > b) + 0.5 * (a == b)))
    metrics = {"reward": float(np.mean(scored["rm_scores"])),
               "anchor_reward": float(np.mean(anchor_scored["rm_scores"])),
               "kl": float(np.mean(scored["kl"])), "entropy": float(np.mean(scored["entropy"])),
               "response_length": float(np.mean(scored["length"])),
               "win_rate_vs_anchor": win(scored["rm_scores"], anchor_scored["rm_scores"])}
    for key, values in judged.items():
      metrics[key] = float(np.nanmean(values))
      metrics[f"anchor_{key}"] = float(np.nanmean(anchor_judged[key]))
    if "gold_reward" in judged:
      metrics["gold_win_rate_vs_anchor"] = win(judged["gold_reward"],
                                               anchor_judged["gold_reward"])
    metrics["samples"] = [f"{p[-120:]} {t}" for p, t in zip(prompts[:3], texts[:3])]
    return metrics

  return evaluate
