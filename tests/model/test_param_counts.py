"""Parameter counts of the paper's four sizes from nnx.eval_shape (nothing allocated) vs Table 2."""
import pytest
from flax import nnx

from retro_jax.model import PAPER_PARAM_COUNTS, PAPER_SIZES, Retro, count_params


@pytest.mark.parametrize("size", ["172m", "425m", "1.5b", "7.5b"])
def test_non_embedding_counts_within_10_percent_of_table_2(size):
  cfg = PAPER_SIZES[size]
  baseline_want, retro_want = PAPER_PARAM_COUNTS[size]
  retro = count_params(nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0))))
  baseline = count_params(nnx.eval_shape(lambda: Retro(cfg.baseline(), rngs=nnx.Rngs(0))))
  assert abs(baseline / baseline_want - 1) <= 0.10, (baseline, baseline_want)
  assert abs(retro / retro_want - 1) <= 0.10, (retro, retro_want)
  assert retro > baseline


def test_paper_configs_follow_table_10_cca_layers():
  assert PAPER_SIZES["172m"].cca_layers == (6, 9, 12)
  assert PAPER_SIZES["425m"].cca_layers == (6, 9, 12)
  assert PAPER_SIZES["1.5b"].cca_layers == (9, 12, 15, 18, 21, 24)
  assert PAPER_SIZES["7.5b"].cca_layers == (9, 12, 15, 18, 21, 24, 27, 30)
  assert all(PAPER_SIZES[s].vocab_size == 128_000 for s in ("172m", "425m", "1.5b", "7.5b"))
