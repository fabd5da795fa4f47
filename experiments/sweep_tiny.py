"""The CPU scaling sweep (`python -m retro_jax.scaling --config=experiments/sweep_tiny.py`).

Three tiny widths/depths, each trained as RETRO and as the baseline on the same data and steps,
then every RETRO model evaluated with 10% / 30% / 100% of the training documents as its retrieval
database. Larger sweeps: same fields, paper sizes (`model_size`) and a pod.
"""
import ml_collections

from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.total_steps = 200
  c.checkpoint_every = 100
  sweep = ml_collections.ConfigDict()
  # name -> RetroConfig overrides on top of experiments/tiny.py's model_overrides.
  sweep.sizes = ml_collections.ConfigDict({
      "d128-L2": {"d_model": 128, "num_heads": 2, "num_layers": 2, "ffw_size": 512,
                  "cca_layers": (2,)},
      "d192-L3": {"d_model": 192, "num_heads": 3, "num_layers": 3, "ffw_size": 768,
                  "cca_layers": (2, 3)},
      "d256-L4": {"d_model": 256, "num_heads": 4, "num_layers": 4, "ffw_size": 1024,
                  "cca_layers": (2, 4)},
  })
  sweep.db_fractions = (0.1, 0.3, 1.0)
  sweep.eval_max_docs = 40  # of the 134 held-out documents (CPU time); 0: all
  return ml_collections.ConfigDict({"train": c, "sweep": sweep})
