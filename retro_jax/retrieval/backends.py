"""The names of the index backends a database may hold (no index library is imported here, so the
commands' flags can name them cheaply)."""

BACKENDS = ("scann", "exact", "faiss")
# faiss fast-scan IVF-PQ is the default (the ANN benchmark, docs/benchmarks.md, picks it); ScaNN
# and the exact JAX backend sit behind the same interface.
DEFAULT_BACKEND = "faiss"
# Every index a database may hold: the per-shard backends above and the one global index
# (retro_jax.retrieval.global_index, DB/index/global), the default for new databases.
GLOBAL_BACKEND = "global"
ALL_BACKENDS = BACKENDS + (GLOBAL_BACKEND,)
