"""`retro_jax.build.edit`: removing and adding documents in a built database, without retraining.

Each test works on its own copy of the tiny real database (tests/data/tiny_db.py), so they run in
any order: a removal (through the command line), an addition of real Python-documentation pages
from the fixed test corpus (after a removal), an upsert and the deletions-file checks (on a copy
of a database with both edits).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from retro_jax.build import edit as edit_db  # noqa: E402
from retro_jax.build import neighbours as neighbours_lib  # noqa: E402
from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from retro_jax.training import input_pipeline as loader_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DOCS = corpus_path.spec(python=2)  # two real Python-docs pages: about, bugs


def fresh_copy(src, tmp_path_factory, name):
  dst = tmp_path_factory.mktemp(name) / "db"
  shutil.copytree(src, dst)
  return str(dst)


@pytest.fixture
def db(tmp_path_factory):
  """A fresh copy of the tiny database, for this test alone."""
  return fresh_copy(tiny_db.get(tmp_path_factory)[0], tmp_path_factory, "edit")


@pytest.fixture(scope="module")
def edited_template(tmp_path_factory):
  """The tiny database with the most-referenced training document removed, then PYTHON_DOCS added
  (built once; tests take copies)."""
  db = fresh_copy(tiny_db.get(tmp_path_factory)[0], tmp_path_factory, "edited_template")
  edit_db.remove_documents(db, [most_referenced_training_doc(db)], note="template")
  edit_db.add_documents(db, PYTHON_DOCS)
  return db


@pytest.fixture
def edited_db(edited_template, tmp_path_factory):
  """A fresh copy of `edited_template`, for this test alone."""
  return fresh_copy(edited_template, tmp_path_factory, "edited")


def embeddings(db):
  return np.concatenate([np.load(p) for p in retriever_lib.embedding_paths(db)])


def all_neighbours(db):
  arrays, _ = neighbours_lib.open_neighbours(db)
  return np.concatenate([np.asarray(a) for a in arrays])


def inside(ids, a, b):
  return (ids >= a) & (ids < b)


def most_referenced_training_doc(db):
  """The training document that the most stored neighbours point to (a meaningful removal)."""
  store = chunk_store_lib.ChunkStore.open(db)
  nbr = all_neighbours(db)
  held = set(store.heldout_doc_ids.tolist())
  counts = np.bincount(store.doc_ids(nbr[nbr >= 0]), minlength=store.num_docs)
  doc = next(int(d) for d in np.argsort(-counts, kind="stable") if int(d) not in held)
  a, b = store.doc_range(doc)
  assert b - a >= 2 and counts[doc] > 0
  return doc


def test_removed_document_is_retrievable_before_and_not_after(db):
  store = chunk_store_lib.ChunkStore.open(db)
  nbr = all_neighbours(db)
  doc = most_referenced_training_doc(db)
  a, b = store.doc_range(doc)
  emb_NxD = embeddings(db)
  before, _ = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids).search(emb_NxD[a:b], 3)
  # Its chunks are retrievable (ScaNN is approximate and a few chunks are near-duplicates of other
  # documents' boilerplate, so "most", not "every"; measured 0.975, 39 of its 40 chunks):
  assert inside(before, a, b).any(axis=1).mean() >= 0.9
  src = loader_lib.SequenceSource(db, 128)
  stream = np.concatenate([src.sequence_chunk_ids(i) for i in range(len(src))])
  assert inside(stream, a, b).any()
  fingerprint = store.manifest.get("edits", {}).get("fingerprint")

  key = store.doc_key(doc)
  out = subprocess.run([sys.executable, "-m", "retro_jax.edit_db", f"--db={db}",
                        f"--remove_keys={key}", "--note=test"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout[out.stdout.index("{"):])
  assert report["remove"]["removed_docs"] == [doc]
  assert report["remove"]["neighbours"]["rows_recomputed"] > 0

  store = chunk_store_lib.ChunkStore.open(db)
  r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  after, _ = r.search(emb_NxD[a:b], 10)
  assert not inside(after, a, b).any() and (after >= 0).all()
  after_x, _ = r.search(emb_NxD, 10, store.doc_ids(np.arange(len(emb_NxD))))
  assert not inside(after_x, a, b).any()
  # Training neighbours: no row points at it; the repaired rows were refilled, not emptied.
  nbr_after = all_neighbours(db)
  assert not inside(nbr_after, a, b).any()
  repaired = inside(nbr, a, b).any(axis=1) & ~inside(np.arange(len(nbr)), a, b)
  assert (nbr_after[repaired] >= 0).all()
  untouched = ~inside(nbr, a, b).any(axis=1) & ~inside(np.arange(len(nbr)), a, b)
  np.testing.assert_array_equal(nbr_after[untouched], nbr[untouched])
  # The loader: the document's chunks leave the stream; no neighbour handed out is one of them.
  src = loader_lib.SequenceSource(db, 128)
  stream = np.concatenate([src.sequence_chunk_ids(i) for i in range(len(src))])
  assert not inside(stream, a, b).any()
  assert not inside(src.neighbour_ids(stream), a, b).any()
  # Recorded: deletions file with a timestamp, the manifest's log and a new fingerprint.
  deletions = json.loads(store.deletions_path.read_text())
  assert deletions["doc_ids"] == [doc] and deletions["requests"][0]["doc_keys"] == [key]
  assert deletions["requests"][0]["time"].endswith("+00:00")
  edits = store.manifest["edits"]
  assert [e["op"] for e in edits["log"]] == ["remove"] and edits["log"][0]["note"] == "test"
  assert edits["deletions"]["num_docs"] == 1 and edits["fingerprint"] != fingerprint
  # Idempotent.
  again = edit_db.remove_documents(db, [doc])
  assert again["removed_docs"] == [] and again["already_removed"] == [doc]
  with pytest.raises(edit_db.EditError, match="not document ids"):
    edit_db.remove_documents(db, [store.num_docs + 5])
  with pytest.raises(edit_db.EditError, match="no document"):
    edit_db.remove_documents(db, keys=["no-such-key"])


def test_added_documents_are_retrievable_and_get_neighbours(db):
  # After a removal, so that the new chunks' neighbours have a removed document to avoid.
  removed = most_referenced_training_doc(db)
  edit_db.remove_documents(db, [removed])
  before = tiny_db.digests(db, skip=("manifest.json", "embedder.json", "offsets.npy",
                                     "heldout.json", "provenance"))
  store = chunk_store_lib.ChunkStore.open(db)
  old_chunks, old_shards = store.num_chunks, store.num_shards
  res = edit_db.add_documents(db, PYTHON_DOCS)  # a new topic
  assert res["shard"] == old_shards and res["first_chunk_id"] == old_chunks
  # Existing shards' files are untouched.
  after = tiny_db.digests(db)
  assert all(after[p] == d for p, d in before.items())
  store = chunk_store_lib.ChunkStore.open(db)
  a, b = old_chunks, store.num_chunks
  assert b - a == res["num_chunks"] > 4 and store.num_docs == res["first_doc_id"] + 2
  # Keys: the pages' paths in the fixed corpus's python/ directory.
  assert [store.doc_key(res["first_doc_id"] + i) for i in (0, 1)] == ["about.rst.txt",
                                                                     "bugs.rst.txt"]
  new_emb = np.load(retriever_lib.embedding_paths(db)[-1])
  assert new_emb.shape == (b - a, 384)
  r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  ids, _ = r.search(new_emb, 3)
  # Measured on the fixed corpus (52 new chunks): 1.0 find themselves first; 0.942 (49) have all
  # three results in the new pages.
  assert np.mean(ids[:, 0] == np.arange(a, b)) >= 0.9  # a chunk finds itself
  assert inside(ids, a, b).all(axis=1).mean() >= 0.85   # and its document's neighbours
  # Training neighbours of the new chunks: k per chunk, never their own or a removed document.
  nbr = np.asarray(neighbours_lib.open_neighbours(db)[0][-1])
  assert nbr.shape == (b - a, 2) and (nbr >= 0).all()
  own = store.doc_ids(np.arange(a, b))
  assert not (store.doc_ids(nbr.ravel()).reshape(-1, 2) == own[:, None]).any()
  assert not store.is_deleted(nbr.ravel()).any()
  assert store.is_deleted(np.arange(*store.doc_range(removed))).all()
  # The loader streams them (whichever are not held out).
  src = loader_lib.SequenceSource(db, 64)
  stream = np.concatenate([src.sequence_chunk_ids(i) for i in range(len(src))])
  assert inside(stream, a, b).sum() == sum(
      store.doc_num_chunks[d] for d in (res["first_doc_id"], res["first_doc_id"] + 1)
      if not store.doc_heldout[d])
  log = store.manifest["edits"]["log"]
  assert [e["op"] for e in log] == ["remove", "add"] and log[1]["corpus"] == PYTHON_DOCS
  # A rerun resumes (nothing redone); the same keys again are refused without --upsert.
  assert edit_db.add_documents(db, PYTHON_DOCS)["resumed"]
  with pytest.raises(edit_db.EditError, match="--upsert"):
    edit_db.add_documents(db, corpus_path.spec(python=3))


def test_upsert_replaces_a_document(edited_db, tmp_path):
  db = edited_db
  store = chunk_store_lib.ChunkStore.open(db)
  old = store.num_docs - 2  # the first page added by edited_template
  key = store.doc_key(old)
  assert key == "about.rst.txt"
  with open(os.path.join(corpus_path.PYTHON_DIR, "library", "json.rst.txt")) as f:
    text = f.read()[:4000]
  spec = tmp_path / "new.jsonl"
  spec.write_text(json.dumps({"key": key, "text": text}) + "\n")
  res = edit_db.add_documents(db, str(spec), upsert=True)
  assert res["upsert_removed"]["removed_docs"] == [old]
  store = chunk_store_lib.ChunkStore.open(db)
  a, b = store.doc_range(old)
  new_emb = np.load(retriever_lib.embedding_paths(db)[-1])
  ids, _ = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids).search(new_emb, 5)
  assert not inside(ids, a, b).any()
  assert inside(ids[:, 0], res["first_chunk_id"], store.num_chunks).mean() >= 0.9  # measured 1.0


def test_store_checks_the_recorded_deletions(edited_db):
  db = edited_db
  store = chunk_store_lib.ChunkStore.open(db)
  store.check()  # every shard (the added ones too) and the deletions file match the manifest
  path = store.deletions_path
  saved = path.read_bytes()
  try:
    record = json.loads(saved)
    record["doc_ids"] = []
    path.write_text(json.dumps(record))
    with pytest.raises(chunk_store_lib.ChunkStoreError, match="differs"):
      store.check()
    path.unlink()  # a lost deletions file must not bring the removed documents back
    with pytest.raises(chunk_store_lib.ChunkStoreError, match="missing"):
      retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  finally:
    path.write_bytes(saved)
  store.check()
