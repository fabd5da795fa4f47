"""A tiny real retrieval database, built once per test run with `retro_jax.build.stages`.

12 Linux-kernel doc files + 24 Wikipedia leads of the fixed test corpus (tests/data/corpus; ~500
chunks, 2 store shards), SentencePiece vocab 1000, 10% of the documents held out, the real MiniLM
embedder, a real ScaNN index, k=2 training neighbours.
Shared by tests/data/test_neighbours.py, tests/data/test_loader.py and tests/test_build_db.py.
"""
import fcntl
import hashlib
import json
import os
import shutil
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
  """(db directory, the first build's record) -- built on the first call only. Under `make test`
  the first xdist worker to ask builds it in the run's shared directory (tests/conftest.py) and
  every worker copies that build (the build is deterministic: the same bytes as its own)."""
  with _lock:
    if "db" not in _cache:
      db = tmp_path_factory.mktemp("tiny_db")
      shared = os.environ.get("RETRO_JAX_TEST_SHARED_DIR")
      _cache["db"] = (db, _copy_of_shared(shared, db) if shared else _build(db))
    return _cache["db"]


def _build(db) -> dict:
  from retro_jax.build import stages as build_db
  return build_db.build(db, **SETTINGS)


def _copy_of_shared(shared: str, db) -> dict:
  """Builds the database under `shared` once (a file lock orders the workers), copies it to `db`,
  and returns the build's record."""
  built, record_path = os.path.join(shared, "tiny_db"), os.path.join(shared, "tiny_db.json")
  with open(os.path.join(shared, "tiny_db.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(record_path):
      record = _build(built)
      with open(record_path + ".tmp", "w") as f:
        json.dump(record, f)
      os.replace(record_path + ".tmp", record_path)
  shutil.copytree(built, db, dirs_exist_ok=True)
  with open(record_path) as f:
    return json.load(f)


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
