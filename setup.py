"""retro-jax: RETRO (arXiv 2112.04426) in JAX / Flax NNX."""
from setuptools import find_packages, setup

# Every dependency is pinned: JAX, libtpu and ScaNN break across releases.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "etils[epath]==1.15.0",
    "sentencepiece==0.2.3",
    "scann==1.4.2",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0", "chex==0.1.92"],
    # libtpu matching jaxlib 0.10.2: ahead-of-time compiles for TPU topologies on a CPU machine.
    "tpu": ["libtpu==0.0.42.1"],
    # Only for the ANN benchmark's comparison, never imported by the package.
    "bench": ["faiss-cpu==1.15.1"],
    # C4 / Wikipedia from a bucket through tensorflow_datasets.
    "tfds": ["tensorflow-datasets==4.9.10"],
}

setup(
    name="retro-jax",
    version="0.1.0",
    description="RETRO (Retrieval-Enhanced Transformer) in JAX / Flax NNX",
    packages=find_packages(include=["retro_jax", "retro_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
