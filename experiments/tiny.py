"""The CPU demo: a tiny RETRO on the default database (`make demo` trains it and its baseline).

    python -m retro_jax.train --config=experiments/tiny.py --workdir=runs/demo/retro
    python -m retro_jax.train --config=experiments/tiny.py --config.retrieval=false \
        --workdir=runs/demo/baseline
"""
import ml_collections

from retro_jax.training import experiment


def get_config():
  c = experiment.defaults()  # every field exists, so any --config.x=y override works
  c.model_size = "tiny"
  # The default database's 8k SentencePiece vocabulary, 64-token chunks, k=2, r=128.
  c.model_overrides = ml_collections.ConfigDict(dict(
      vocab_size=8192, d_model=256, num_heads=4, num_layers=4, ffw_size=1024,
      cca_layers=(2, 4), chunk_size=64, num_neighbours=2, neighbour_len=128,
      encoder_layers=2, encoder_d_model=128, encoder_num_heads=2))
  c.retrieval = True
  c.db = "runs/default_db"
  c.seq_len = 256
  c.global_batch = 8
  c.total_steps = 300
  c.warmup_steps = 30
  c.peak_lr = 2e-3
  c.mesh = (-1, 1, 1)
  c.checkpoint_every = 100
  c.log_every = 20
  return c
