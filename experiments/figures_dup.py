"""The paper's figures on the duplication database
(`python -m retro_jax.figures --config=experiments/figures_dup.py`).

experiments/dup_tiny.py (the demo's model) trained from scratch with 3 seeds, RETRO and baseline;
seed 0's RETRO scored with 1/8, 1/4, 1/2 and all of the training documents as its database; a
retrofit of seed 0's baseline for a third of its steps, beside the baseline trained as long.
"""
import ml_collections

from experiments import dup_tiny


def get_config():
  c = dup_tiny.get_config()
  f = ml_collections.ConfigDict()
  f.title = "duplication database: "
  f.seeds = (0, 1, 2)
  f.other_seed_modes = ("on", "shuffled_source")  # seed 0: every control
  f.db_fractions = (0.125, 0.25, 0.5, 1.0)
  f.fraction_seeds = (0,)
  f.retrofit_steps = (100, 300)  # a third of the from-scratch steps; then as many
  f.stride = 0  # seq_len - chunk: every scored chunk has its preceding chunk's neighbours
  f.eval_max_docs = 0
  return ml_collections.ConfigDict({"train": c, "figures": f})
