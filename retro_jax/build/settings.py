"""The build's settings and their defaults, defined once: `build_db`'s flags, `build.stages` and the
flags every command shares read them here (importing no stage)."""
from retro_jax.retrieval.backends import GLOBAL_BACKEND

# embed_batch_size 32: the fastest of 16 / 32 / 64 in bench/embed_throughput.py.
DEFAULTS = dict(corpus="default", max_docs=None, vocab_size=8192, tokenizer=None, chunk_size=64,
                docs_per_shard=4096, heldout_fraction=0.01, seed=0, embed_dtype="bfloat16",
                embed_batch_size=32, backend=GLOBAL_BACKEND, k=2, index_searcher="faiss")
