"""The retrieval service after the database changes under it, and when it is not there at all.

A shard process serves what it loaded: after `edit_db --add` every client of a service started
before the edit gets an error (or, with allow_partial, a warning) naming the stale shards and the
reload command, never a silently stale answer; after that command the new documents are returned.
A dead service is one line and exit 2 within the time the user gave (`sample --service_timeout_s`).
On copies of the tiny real database (tests/data/tiny_db.py) with a global index, the default.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402
from retro_jax.build import edit as edit_db  # noqa: E402
from retro_jax.retrieval import build_index as build_index_lib  # noqa: E402
from retro_jax.retrieval import client as client_lib  # noqa: E402
from retro_jax.retrieval import fingerprint as fingerprint_lib  # noqa: E402
from retro_jax.retrieval import global_index as global_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from retro_jax.retrieval import shard_server as serve_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _run(*args, timeout=300):
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=timeout)
  return proc, time.monotonic() - t0


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln
           and not ln.startswith("  warnings.warn")]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  dst = tmp_path_factory.mktemp("service_edits") / "db"
  shutil.copytree(tiny_db.get(tmp_path_factory)[0], dst)
  build_index_lib.build_global_index(str(dst), global_lib.GlobalIndexConfig(serving_shards=2,
                                                                           nprobe=4))
  return str(dst)


def test_added_document_is_an_error_until_the_reload_then_returned(db, tmp_path):
  procs = serve_lib.start_shards(db, serve_lib.served_shards(db), str(tmp_path / "serve"))
  addrs = [p.address for p in procs]
  try:
    before = client_lib.ServiceRetriever(addrs, timeout_s=30.0, db=db)
    blind = client_lib.ServiceRetriever(addrs, timeout_s=30.0)  # not told the database
    fp_before = fingerprint_lib.fingerprint(db, "global")
    assert {c.info.fingerprint for c in before.clients} == {fp_before}
    size_before = before.size

    out = edit_db.add_documents(db, corpus_path.spec(python=2), backend="global")
    assert fingerprint_lib.fingerprint(db, "global") != fp_before
    store = chunk_store_lib.ChunkStore.open(db)
    new_QxD = np.load(retriever_lib.embedding_paths(db)[-1])[:8]
    want_ids, want_scores = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids).search(
        new_QxD, 1)
    assert (want_ids[:, 0] >= out["first_chunk_id"]).all()  # in-process: each new chunk found

    # Clients of the service started before the edit: an error naming the shards and the reload.
    reload_cmd = f"python -m retro_jax.retrieval.serve --reload={','.join(addrs)}"
    for client in (before, blind):
      with pytest.raises(client_lib.StaleShardError) as e:
        client.search(new_QxD, 1)
      assert reload_cmd in str(e.value)
      assert all(f"shard {s} at {a}" in str(e.value) for s, a in zip([0, 1], addrs))
    with pytest.raises(client_lib.StaleShardError, match="--reload="):
      client_lib.ServiceRetriever(addrs, timeout_s=30.0, db=db)  # connecting after the edit
    with warnings.catch_warnings(record=True) as caught:  # allow_partial: a warning, not silence
      warnings.simplefilter("always")
      old_ids, _ = before.search(new_QxD, 1, allow_partial=True)
    assert any(issubclass(w.category, client_lib.StaleResultsWarning) for w in caught)
    assert (old_ids[:, 0] < out["first_chunk_id"]).all()  # indeed the old contents

    # `sample` through the stale service: one line, exit 2, the command to run.
    proc, _ = _run("retro_jax.sample", "--size=tiny", f"--db={db}", "--prompt=The page cache",
                   "--max_new_tokens=1", f"--service={','.join(addrs)}",
                   "--service_timeout_s=30")
    assert reload_cmd in _one_error_line(proc)

    # The documented reload; then the same clients get the new documents.
    proc, _ = _run("retro_jax.retrieval.serve", f"--reload={','.join(addrs)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reloaded, serves") == 2
    for client in (before, blind):
      ids, scores = client.search(new_QxD, 1)
      np.testing.assert_array_equal(ids, want_ids)
      np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert before.size == store.num_chunks == size_before + out["num_chunks"]
    with client_lib.ServiceRetriever(addrs, timeout_s=30.0, db=db) as after:
      np.testing.assert_array_equal(after.search(new_QxD, 1)[0], want_ids)

    # A removal is picked up without a reload and is no content change.
    doc = int(store.doc_ids([out["first_chunk_id"]])[0])
    edit_db.remove_documents(db, [doc], backend="global")
    a, b = chunk_store_lib.ChunkStore.open(db).doc_range(doc)
    ids, _ = before.search(new_QxD, 1)
    assert (ids >= 0).all() and not ((ids >= a) & (ids < b)).any()
    before.close()
    blind.close()
  finally:
    for p in procs:
      p.stop()


def test_a_shard_not_served_is_named(db, tmp_path):
  """A database shard that no address answers for (one added with a per-shard backend needs its
  own process) is an error naming it, not results silently without it."""
  [p] = serve_lib.start_shards(db, [1], str(tmp_path / "serve"))
  try:
    with pytest.raises(client_lib.ShardUnavailableError,
                       match=r"shard 0 at \(no address\).*--shard=0"):
      client_lib.ServiceRetriever([p.address], timeout_s=30.0, db=db)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      client_lib.ServiceRetriever([p.address], timeout_s=30.0, db=db, allow_partial=True).close()
    assert any(issubclass(w.category, client_lib.PartialResultsWarning) for w in caught)
  finally:
    p.stop()


def _closed_port():
  """A bound socket that does not listen (connections are refused; nobody else gets the port)."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_dead_service_is_one_line_within_the_timeout_given(db):
  sock, addr = _closed_port()
  try:
    t0 = time.monotonic()
    with pytest.raises(client_lib.ShardUnavailableError, match="no answer within 1 s"):
      client_lib.ServiceRetriever([addr], connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    proc, seconds = _run("retro_jax.sample", "--size=tiny", f"--db={db}", "--prompt=hello",
                         f"--service={addr}", "--service_timeout_s=2")
    line = _one_error_line(proc)
    assert addr in line and "no answer within 2 s" in line
    assert seconds < 50  # the default wait alone was 60 s
    proc, _ = _run("retro_jax.retrieval.serve", f"--reload={addr}")
    assert addr in _one_error_line(proc)
  finally:
    sock.close()
