"""Every experiment file loads; the paper files match the paper's recipe; the rest resolve."""
import importlib
from pathlib import Path

import pytest

from retro_jax.model import PAPER_SIZES
from retro_jax.training import experiment

ALL = sorted(p.stem for p in Path(__file__).parents[1].joinpath("experiments").glob("*.py")
             if not p.stem.startswith("_"))
PAPER = [n for n in ALL if n.split("_")[0] in ("retro", "baseline")]


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiment_recipe(name):
  cfg = importlib.import_module(f"experiments.{name}").get_config()
  assert cfg.model_size in PAPER_SIZES
  assert cfg.retrieval == name.startswith("retro")
  tokens = cfg.total_steps * cfg.global_batch * cfg.seq_len
  assert abs(tokens / 419.4e9 - 1) < 1e-3
  assert cfg.peak_lr == (1e-4 if cfg.model_size == "7.5b" else 2e-4)


@pytest.mark.parametrize("name", ALL)
def test_experiment_resolves_to_a_model(name):
  cfg = importlib.import_module(f"experiments.{name}").get_config()
  runs = [cfg.train] if "sweep" in cfg or "figures" in cfg else [cfg]
  for c in runs:
    model = experiment.model_config(experiment.with_defaults(c))
    assert model.num_layers >= 1
