import importlib.util
import os
import shutil
import tempfile

# Multi-device tests see 8 simulated CPU devices; must be set before JAX starts. The suite is
# compile-bound (tiny models, few steps), so two CPU-backend flags that change code speed, not
# results, make it compile faster: LLVM optimisation level 0 (~11%), and XLA's older loop-fusion
# emitters instead of its MLIR fusion emitters (a tiny model's gradient compiles in 0.47 s, not
# 0.75 s; the shortened demo pipeline's results are bit-identical with either).
FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   f"--xla_backend_optimization_level=0 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, made by the first pytest process and
# inherited through the environment by the xdist workers and every subprocess a test starts:
# the suite compiles the same programs over and over (the demo config's steps in reruns,
# resumes and kills of one run). A cached program is the same executable, so results do not
# change. A size bound turns on JAX's file lock, so that concurrent processes never read a
# half-written entry.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="perl_jax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  if importlib.util.find_spec("filelock"):
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
