"""bpb against the database fraction on the default database
(`python -m retro_jax.figures --config=experiments/figures_default.py`): experiments/tiny.py, one
seed, no retrofit; the duplication database's figures are experiments/figures_dup.py."""
from experiments import figures_dup, tiny


def get_config():
  cfg = figures_dup.get_config()
  cfg.train = tiny.get_config()
  cfg.figures.title = "default database: "
  cfg.figures.seeds = (0,)
  cfg.figures.retrofit_steps = ()
  return cfg
