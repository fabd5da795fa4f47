"""retro_jax.figures end to end on the tiny database: every model trained, every control scored,
the recovery and the fraction steps computed, and a rerun that reuses all of it."""
import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from experiments import figures_dup
from retro_jax.evaluation import figures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402


def _config(db):
  cfg = figures_dup.get_config()
  c = cfg.train
  c.db = str(db)
  c.model_overrides = ml_collections.ConfigDict(dict(
      c.model_overrides, vocab_size=1024, d_model=32, num_heads=2, num_layers=2, ffw_size=64,
      cca_layers=(2,), encoder_d_model=16, encoder_num_heads=1, encoder_layers=1))
  c.seq_len, c.global_batch, c.total_steps, c.warmup_steps = 128, 2, 3, 1
  c.checkpoint_every, c.log_every, c.read_threads = 3, 1, 1
  f = cfg.figures
  f.seeds, f.db_fractions, f.fraction_seeds, f.retrofit_steps = (0, 1), (0.5, 1.0), (0,), (2,)
  return cfg


@pytest.mark.slow  # six tiny trainings and a dozen scoring passes: about two minutes
def test_figures_run_then_resume(tmp_path_factory, tmp_path, capsys):
  db = tiny_db.get(tmp_path_factory)[0]
  cfg = _config(db)
  res = figures.run(cfg, str(tmp_path), argv=["figures", "--out=x"])
  assert res["command"] == "python -m retro_jax.figures --out=x" and res["commit"] and res["date"]
  for name in ("seed0/retro", "seed0/baseline", "seed1/retro", "seed1/baseline",
               "seed0/retrofit", "seed0/baseline_longer"):
    assert (tmp_path / name / "checkpoints").is_dir(), name
  s0, s1 = res["per_seed"]["0"], res["per_seed"]["1"]
  assert set(s0["results"]) == {"on", "off", "shuffled", "shuffled_source", "same_document",
                                "baseline"}
  assert set(s1["results"]) == {"on", "shuffled_source", "baseline"}
  for key in ("on-baseline", "on-shuffled_source", "on-same_document", "on-shuffled"):
    assert s0["differences"][key]["all"]["chunks"] > 0
    assert set(s0["differences_given"][key]) == set(s0["differences"][key])
  assert len(res["on_minus_baseline"]["per_seed"]) == 2 and res["on_minus_baseline"]["sd"] >= 0
  fr = res["db_fraction"]["0"]
  assert set(fr["rows"]) == {"0.5", "1.0"} and set(fr["steps"]) == {"1.0-0.5"}
  assert fr["rows"]["0.5"]["db_tokens"] < fr["rows"]["1.0"]["db_tokens"]
  rf = res["retrofit"]
  assert rf["steps"] == 2 and rf["recovery"]["ratio"] is not None
  # The recovery is its definition on the reported bpb.
  b = rf["bpb"]
  want = (b["baseline"] - b["retrofit_on"]) / (b["baseline"] - b["from_scratch_on"])
  assert np.isclose(rf["recovery"]["ratio"], want)
  for p in res["plots"]:
    assert os.path.getsize(p) > 1000
  md = (tmp_path / "figures.md").read_text()
  assert "recovery R" in md and "same document" in md
  # A rerun trains and scores nothing again: same numbers, no "== training"/"== scoring" lines.
  capsys.readouterr()
  again = figures.run(cfg, str(tmp_path), argv=["figures"])
  printed = capsys.readouterr().out
  assert "== scoring" not in printed
  assert json.dumps(again["per_seed"], sort_keys=True) == json.dumps(res["per_seed"],
                                                                   sort_keys=True)
