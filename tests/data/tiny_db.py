"""A tiny real retrieval database, built once per test process with `retro_jax.build.stages`.

12 Linux-kernel doc files + 24 Wikipedia leads of the fixed test corpus (tests/data/corpus; ~500
chunks, 2 store shards), SentencePiece vocab 1000, 10% of the documents held out, the real MiniLM
embedder, a real ScaNN index, k=2 training neighbours.
Shared by tests/data/test_neighbours.py, tests/data/test_loader.py and tests/test_build_db.py.
"""
import hashlib
import os
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpus_path  # noqa: E402

CORPUS = corpus_path.spec(kernel=12, wiki=24)
# 20 documents per store shard: two shards, so every stage's multi-shard path runs.
SETTINGS = dict(corpus=CORPUS, vocab_size=1000, heldout_fraction=0.1, k=2, backend="scann",
                docs_per_shard=20)

_lock = threading.Lock()
_cache = {}


def get(tmp_path_factory):
  """(db directory, the first build's record) -- built on the first call only."""
  with _lock:
    if "db" not in _cache:
      from retro_jax.build import stages as build_db
      db = tmp_path_factory.mktemp("tiny_db")
      record = build_db.build(db, **SETTINGS)
      _cache["db"] = (db, record)
    return _cache["db"]


def digests(root, skip=()) -> dict[str, str]:
  """sha256 of every file under `root` (relative path -> digest), paths containing a `skip`
  string left out: to compare a database or workdir before and after."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      if not any(s in p for s in skip):
        with open(p, "rb") as fh:
          out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b, dtype=None):
  """Two lists of batches (dicts of arrays) equal key by key (and of `dtype`, when given)."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if dtype is not None:
        assert x[key].dtype == y[key].dtype == dtype
      np.testing.assert_array_equal(x[key], y[key])
