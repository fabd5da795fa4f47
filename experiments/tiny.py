"""The CPU demo: a tiny RETRO on the default database (`make demo` trains it and its baseline).

    python -m retro_jax.train --config=experiments/tiny.py --workdir=runs/demo/retro
    python -m retro_jax.train --config=experiments/tiny.py --config.retrieval=false \
        --workdir=runs/demo/baseline
"""
from retro_jax.training import experiment


def get_config():
  c = experiment.defaults()  # every field exists, so any --config.x=y override works
  c.model_size = "tiny"  # retro_jax.model.config.SIZES: the default database's vocabulary, chunks
  # Its fields, each overridable as --config.model_overrides.FIELD=VALUE.
  c.model_overrides = experiment.size_fields("tiny")
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
