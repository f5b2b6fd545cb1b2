r"""The embedded default: the PERL pipeline on the café-review task, on a laptop CPU.

  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo

Stages (config.stages): `sft` trains a tiny Gemma-architecture backbone from scratch on the task's
generated corpus (full training, it is the SFT anchor).
"""
import ml_collections


def optim(lr: float, warmup_steps: int = 20) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=lr,  # peak learning rate
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
  ))


def get_config():
  c = ml_collections.ConfigDict()
  c.task = "reviews"  # the demo task (perl_jax/tasks/reviews.py)
  c.stages = ("sft",)  # run in order; each writes to WORKDIR/<stage>
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      preset="demo",  # a key of perl_jax.model.PRESETS
      dtype="float32",  # compute dtype
      param_dtype="float32",  # backbone storage dtype
      remat=False,  # rematerialise layers in the backward pass
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # sentencepiece .model; empty = the task's shipped tokenizer
  ))
  c.lora = ml_collections.ConfigDict(dict(
      rank=8,  # adapter rank for the reward/RL stages; 0 = full fine-tuning instead
      alpha=16.0,  # LoRA scale is alpha / rank; 0 = alpha equal to rank
      targets=("attn/(q|k|v|o)$",),  # regexes over projection paths like "layer_0/attn/q"
      dropout=0.0,  # dropout on the LoRA path during training
      dtype="float32",  # adapter dtype (independent of the backbone's)
  ))
  c.data = ml_collections.ConfigDict(dict(
      max_len=64,  # tokens per training sequence (prompt + response)
      prompt_len=16,  # left-padded prompt length for sampling
  ))
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=48,  # completion length
      temperature=0.7,  # 0 = greedy
      top_k=0,  # 0 = off
      top_p=1.0,  # 1.0 = off
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = remaining devices

  c.sft = ml_collections.ConfigDict(dict(
      num_train=20_000,  # generated training reviews
      num_eval=512,  # generated held-out reviews
      num_samples=64,  # held-out prompts sampled after training
      train=train(steps=600, batch_size=32),
      optim=optim(lr=3e-3),
  ))
  return c
