"""The tiny RETRO trained to copy from its neighbours (the retrieval example of the README).

    python -m retro_jax.train --config=experiments/copy_tiny.py --workdir=runs/copy
    python -m retro_jax.fact_recall --workdir=runs/copy --db=runs/default_db --scratch=runs/fact

experiments/tiny.py with the copy curriculum: half of the training chunks get themselves (the chunk
and its true continuation) as neighbour 0, the other neighbour being the first stored one (other
documents only). That is the leakage the paper's evaluation filters out (bpb(alpha)), here on
purpose: a model that has seen matching neighbours learns to read the continuation off them, so a
fact that only the database holds can be completed, and removing its document takes it away.
Everything else (database, sizes, batch, peak learning rate) is tiny.py's; 1,000 steps instead of
300, which are too few to learn the copying (docs/results.md).
"""
from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.self_neighbour_rate = 0.5
  c.total_steps = 1000
  c.warmup_steps = 50
  return c
