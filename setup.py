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
    ],
    extras_require={
        "test": ["pytest>=8.0"],
    },
)
