r"""The embedded default: the PERL pipeline on the café-review task, on a laptop CPU.

  python -m perl_jax.main --config=configs/demo.py --workdir=/tmp/perl_demo

Add --config.lora.rank=0 to run the same pipeline with full fine-tuning.
"""
from perl_jax import config_base


def get_config():
  return config_base.base_config()
