import os

# Multi-device tests see 8 simulated CPU devices; must be set before JAX starts. The CPU
# backend's LLVM optimisation level 0 compiles ~11% faster (the suite is compile-bound: tiny
# models, few steps); it changes code speed, not results.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
