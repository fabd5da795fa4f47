"""Sampling: generation with retrieval and a KV cache."""
