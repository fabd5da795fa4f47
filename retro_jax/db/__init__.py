"""The retrieval database's storage: corpus, tokenizers, chunk store, layout, checks (the build that
writes it: retro_jax.build)."""
