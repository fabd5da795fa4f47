"""`retro_jax.build.stages` end to end on a tiny real slice; a rerun skips every stage."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

from retro_jax.build import stages as build_db  # noqa: E402
from retro_jax.db import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)


def _digests(db):
  import hashlib
  out = {}
  for root, _, files in os.walk(db):
    for f in files:
      if f != layout.BUILD_TIMES:
        p = os.path.join(root, f)
        out[os.path.relpath(p, db)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def test_first_build_ran_every_stage_and_wrote_times(built):
  db, record = built
  assert list(record["stages"]) == list(build_db.STAGES)
  for stage in build_db.STAGES:
    assert record["stages"][stage]["skipped"] is False
    assert record["stages"][stage]["seconds"] > 0
  on_disk = json.loads((db / layout.BUILD_TIMES).read_text())
  assert on_disk["settings"]["corpus"] == tiny_db.CORPUS
  for path in ("tokenizer/spm.model", "chunks/manifest.json", "embeddings/shard-00000.npy",
               "index/scann/shard-00000/manifest.json", "neighbours/shard-00000.npy",
               "embeddings/shard-00001.npy", "index/scann/shard-00001/manifest.json",
               "neighbours/shard-00001.npy"):
    assert (db / path).exists(), path
  assert np.load(db / "neighbours" / "shard-00000.npy").dtype == np.int64


def test_rerun_skips_every_stage_and_changes_nothing(built):
  db, _ = built
  before = _digests(db)
  record = build_db.build(db, **tiny_db.SETTINGS)
  assert all(record["stages"][s]["skipped"] for s in build_db.STAGES)
  assert record["total_seconds"] < 30
  assert _digests(db) == before
  # The command line, too (absl flags).
  out = subprocess.run(
      [sys.executable, "-m", "retro_jax.build_db", f"--db={db}", f"--corpus={tiny_db.CORPUS}",
       "--vocab_size=1000", "--heldout_fraction=0.1", f"--backend={tiny_db.SETTINGS['backend']}",
       f"--docs_per_shard={tiny_db.SETTINGS['docs_per_shard']}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for stage in build_db.STAGES:
    assert f"[build_db] {stage}: already done, skipped" in out.stdout
  times = json.loads((db / layout.BUILD_TIMES).read_text())
  assert all(times["stages"][s]["build_seconds"] > 0 for s in build_db.STAGES)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="Unknown stage"):
    build_db.build(tmp_path, stages=("tokenizer", "embed"))
  with pytest.raises(TypeError, match="unknown settings"):  # the hand split is gone: Beam splits
    build_db.build(tmp_path, shard_index=1, num_shards=2)
  with pytest.raises(TypeError, match="unknown settings"):
    build_db.build(tmp_path, vocab=10)
