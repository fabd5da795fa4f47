"""The RETRO model in Flax NNX."""
from retro_jax.model.config import PAPER_PARAM_COUNTS, PAPER_SIZES, SIZES, RetroConfig
from retro_jax.model.retro import Retro, count_params

__all__ = ["PAPER_PARAM_COUNTS", "PAPER_SIZES", "Retro", "RetroConfig", "SIZES", "count_params"]
