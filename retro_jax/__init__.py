"""retro-jax: the Retrieval-Enhanced Transformer (RETRO, arXiv 2112.04426) in JAX / Flax NNX."""
