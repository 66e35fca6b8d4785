"""kdjax: knowledge distillation in JAX / Flax NNX.

Versions are pinned exactly so that a fresh install gets the set the tests ran with; `constraints.txt`
pins the transitive dependencies too (the Makefile installs with it).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorstore==0.1.86",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    # The diffusion experiments' default image data set: the 8x8 digits that ship inside the wheel.
    "scikit-learn==1.9.1",
    "pyarrow==26.0.1",  # Parquet / Arrow corpora (kdjax.data.local_sources)
]

EXTRAS_REQUIRE = {
    # torch only to compare against PyTorch / transformers; 2.13.0 exactly is the CPU wheel on disk here
    # (any looser spec downloads a multi-GB CUDA build).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0"],
    # Accelerators: jax's own extras at the pinned version (they pull the matching runtime: libtpu 0.0.42.* for
    # "tpu", jax-cuda12-plugin[with-cuda] 0.10.2 and the CUDA 12 wheels for "cuda12").  One line per backend:
    #   pip install -c constraints.txt -e '.[tpu]'      Cloud TPU VMs (scripts/launch_tpu.sh setup does this)
    #   pip install -c constraints.txt -e '.[cuda]'     NVIDIA GPUs, CUDA 12 from pip (driver >= 525)
    "tpu": ["jax[tpu]==0.10.2"],
    "cuda": ["jax[cuda12]==0.10.2"],
}

setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation in JAX/Flax NNX: exact losses, offline teacher store, sharded steps.",
    packages=find_packages(include=["kdjax", "kdjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
