"""The retrieval database: corpus, tokenizers, chunk store, training neighbours, build, edits."""
