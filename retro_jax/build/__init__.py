"""The database build: the stages that drive storage (retro_jax.db) and the embedder and index
(retro_jax.retrieval) - `stages` (restartable, in order), `pipeline` (the Beam graph), `plan`
(range descriptors), `neighbours` (precomputed neighbours), `edit` (documents added or removed)."""
