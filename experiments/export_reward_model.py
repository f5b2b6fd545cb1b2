r"""A trained reward model, exported to transformers + PEFT, scores as it did in perl_jax.

  pip install torch==2.13.0 transformers peft          # the peer side; perl_jax never needs them
  python experiments/export_reward_model.py --workdir=/tmp/gemma3_270m_hh_lora \
      --config=configs/paper/gemma3_270m.py:task=hh_rm --rows=32 --out=/tmp/hh_rm_export

Reads the run's config (WORKDIR/reward/identity.json records it) and its best reward model
(WORKDIR/reward/best), then
  1. writes the backbone as a transformers checkpoint (`OUT/base`, float32; for a released model
     this stands in for the same model from the hub, e.g. google/gemma-3-270m) and the reward model
     as a PEFT SEQ_CLS adapter with its score head (`OUT/adapter`: `python -m perl_jax.convert
     to-peft --score_head`);
  2. scores the first --rows held-out pairs (chosen and rejected, chat-formatted as in training)
     with perl_jax and with `perl_jax.checkpoints.peft.load_reward_model_torch(OUT/base,
     OUT/adapter)`, and prints the largest difference and both sides' pair accuracy.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's config (with its :args)")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (holds reward/best)")
_ROWS = flags.DEFINE_integer("rows", 32, "held-out pairs to score")
_OUT = flags.DEFINE_string("out", "/tmp/reward_model_export", "where the export is written")


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch

  from perl_jax import common
  from perl_jax import convert
  from perl_jax import model as model_lib
  from perl_jax import reward
  from perl_jax import roles
  from perl_jax import sharding as sharding_lib
  from perl_jax.checkpoints import hf
  from perl_jax.checkpoints import peft

  config = _CONFIG.value
  workdir = _WORKDIR.value
  if config.lora.rank == 0:
    raise SystemExit("a fully tuned reward model has no adapter to export: use "
                     "`python -m perl_jax.convert to-hf` for its weights")
  best = os.path.join(workdir, "reward", "best")
  tok = common.load_tokenizer(config)
  model, variables = roles.load_reward_model(config, workdir, tok, sharding_lib.make_mesh())
  cfg = model.cfg

  base_dir, adapter_dir = os.path.join(_OUT.value, "base"), os.path.join(_OUT.value, "adapter")
  hf.save(base_dir, cfg, model_lib.unstack_layers(jax.device_get(variables["params"])),
          tokenizer=tok, dtype="float32")
  convert.main(["to-peft", "--adapter", best, "--lora_alpha", str(config.lora.alpha or
                                                                    config.lora.rank),
                "--score_head", "--base_model", base_dir, "--out", adapter_dir])

  arrays = reward.load_data(config, workdir, tok)[3]
  tokens = np.asarray(arrays["tokens"][:_ROWS.value])   # [N, 2, L]
  mask = np.asarray(arrays["input_mask"][:_ROWS.value])
  ours = np.asarray(jax.jit(lambda v, t, m: roles.sequence_scores(model, v, t, m))(
      variables, tokens, mask))                          # [N, 2]

  torch_model = peft.load_reward_model_torch(base_dir, adapter_dir)
  flat_tokens = torch.tensor(tokens.reshape(-1, tokens.shape[-1]), dtype=torch.long)
  flat_mask = torch.tensor(mask.reshape(-1, mask.shape[-1]).astype(np.int64))
  with torch.no_grad():
    theirs = np.concatenate([
        torch_model(input_ids=flat_tokens[i:i + 8], attention_mask=flat_mask[i:i + 8]
                    ).logits[:, 0].numpy() for i in range(0, len(flat_tokens), 8)])
  theirs = theirs.reshape(ours.shape)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f"[export] {len(tokens)} held-out rows: max |score_perl_jax - score_transformers| = "
        f"{diff:.2e} (scores span {np.ptp(ours):.2f})")
  if ours.shape[1] == 2:
    accuracy = lambda s: float(np.mean(s[:, 0] > s[:, 1]))
    print(f"[export] pair accuracy: perl_jax {accuracy(ours):.3f}, transformers + PEFT "
          f"{accuracy(theirs):.3f}")
  print(f"[export] base: {base_dir}; adapter: {adapter_dir}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
