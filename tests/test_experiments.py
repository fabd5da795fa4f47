"""Every experiment file loads and names a paper size; the recipe matches the paper."""
import importlib
from pathlib import Path

import pytest

from retro_jax.model import PAPER_SIZES

FILES = sorted(p.stem for p in Path(__file__).parents[1].joinpath("experiments").glob("*.py")
               if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", FILES)
def test_experiment_config_loads(name):
  cfg = importlib.import_module(f"experiments.{name}").get_config()
  assert cfg.model_size in PAPER_SIZES
  assert cfg.retrieval == name.startswith("retro")
  tokens = cfg.total_steps * cfg.global_batch * cfg.seq_len
  assert abs(tokens / 419.4e9 - 1) < 1e-3
  assert cfg.peak_lr == (1e-4 if cfg.model_size == "7.5b" else 2e-4)
