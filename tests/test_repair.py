"""Nothing silently stale in the build (issue 26): a damaged global index and missing or truncated
embeddings and neighbours shards are rebuilt by a plain rerun, `--rebuild` rebuilds every stage downstream of a change and leaves nothing of the old build,
and a one-chunk database builds and searches.

A small real database with the default backend (the global index) over the fixed test corpus, built
once here and copied before each change; the real MiniLM embedder and faiss.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from retro_jax.build import edit as edit_lib  # noqa: E402
from retro_jax.build import stages as build_lib  # noqa: E402
from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402
from retro_jax.db import layout, provenance  # noqa: E402
from retro_jax.retrieval import global_index as global_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402

# 18 documents, 6 per store shard: three shards.
SETTINGS = dict(corpus=corpus_path.spec(kernel=6, wiki=12), vocab_size=600, heldout_fraction=0.1,
                docs_per_shard=6)
SKIP = ("build_times.json", "global/manifest.json")  # the manifest: compared by `index_manifest`


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("global_db") / "db")
  build_lib.build(out, **SETTINGS)
  return out


def copy_db(db, tmp_path) -> str:
  dst = str(tmp_path / "db")
  shutil.copytree(db, dst)
  return dst


def index_manifest(d: str) -> dict:
  """The global index's manifest without its build times (the rest is deterministic)."""
  m = json.loads((global_lib.index_dir(d) / layout.MANIFEST).read_text())
  m.pop("build_seconds")
  return m


def stage_files(d: str, sub: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(r, f), d)
                for r, _, fs in os.walk(os.path.join(d, sub)) for f in fs)


def test_damaged_global_index_is_rebuilt_by_a_plain_rerun(db, tmp_path, capsys):
  d = copy_db(db, tmp_path)
  want, want_manifest = tiny_db.digests(d, skip=SKIP), index_manifest(d)
  root = global_lib.index_dir(d)
  faiss_file = global_lib.serving_path(root, 0, "faiss")
  faiss_file.write_bytes(faiss_file.read_bytes()[:-100])  # truncated
  rerank = global_lib.serving_path(root, 0, "rerank")
  with open(rerank, "ab") as f:
    f.write(b"\0" * 384)  # a stray row appended
  with pytest.raises(Exception, match="shard-00000.faiss"):
    retriever_lib.Retriever.from_db(d)  # named when read
  record = build_lib.build(d, **SETTINGS)  # the plain rerun
  assert "index: damaged" in capsys.readouterr().out
  assert not record["stages"]["index"]["skipped"]
  assert all(record["stages"][s]["skipped"] for s in ("tokenizer", "chunks", "embeddings",
                                                      "neighbours"))
  assert tiny_db.digests(d, skip=SKIP) == want  # byte-identical to the clean build
  assert index_manifest(d) == want_manifest
  global_lib.verify(root)


def test_missing_or_truncated_shards_are_rebuilt_by_a_plain_rerun(db, tmp_path, capsys):
  """An embeddings shard cut short and a neighbours shard deleted: the rerun's check (a Beam
  pipeline over the shards, one stat each) finds them and rebuilds just those, byte-identical."""
  d = copy_db(db, tmp_path)
  want = tiny_db.digests(d, skip=SKIP)
  emb = layout.embeddings_path(d, 1)
  emb.write_bytes(emb.read_bytes()[:-384 * 4])  # the last row gone
  os.remove(layout.neighbours_path(d, 2))
  record = build_lib.build(d, **SETTINGS)  # the plain rerun
  out = capsys.readouterr().out
  assert "embeddings: a shard was missing or not at its recorded size" in out
  assert "neighbours: a shard was missing or not at its recorded size" in out
  assert [s for s in build_lib.STAGES if not record["stages"][s]["skipped"]] == [
      "embeddings", "neighbours"]
  assert tiny_db.digests(d, skip=SKIP) == want  # byte-identical to the clean build
  again = build_lib.build(d, **SETTINGS)  # and now whole: nothing rebuilt
  assert all(again["stages"][s]["skipped"] for s in build_lib.STAGES)


def test_content_damage_of_the_same_size_is_rebuilt_by_audit(db, tmp_path):
  d = copy_db(db, tmp_path)
  want, want_manifest = tiny_db.digests(d, skip=SKIP), index_manifest(d)
  rerank = global_lib.serving_path(global_lib.index_dir(d), 0, "rerank")
  data = bytearray(rerank.read_bytes())
  data[-1] ^= 0x7F  # same size: only reading the contents tells
  rerank.write_bytes(bytes(data))
  # A plain rerun checks sizes, not contents (that would read the whole index at any size).
  assert build_lib.build(d, **SETTINGS)["stages"]["index"]["skipped"]
  record = build_lib.build(d, audit=True, **SETTINGS)
  assert not record["stages"]["index"]["skipped"]
  assert tiny_db.digests(d, skip=SKIP) == want and index_manifest(d) == want_manifest


def test_rebuild_with_another_embedding_dtype_rebuilds_index_and_neighbours(db, tmp_path):
  d = copy_db(db, tmp_path)
  before = tiny_db.digests(d, skip=SKIP)
  f32 = {**SETTINGS, "embed_dtype": "float32"}
  record = build_lib.build(d, rebuild=True, **f32)
  assert [s for s in build_lib.STAGES if not record["stages"][s]["skipped"]] == [
      "embeddings", "index", "neighbours"]
  after = tiny_db.digests(d, skip=SKIP)
  changed = {p.split(os.sep)[0] for p in set(before) | set(after) if before.get(p) != after.get(p)}
  assert {"embeddings", "index", "neighbours"} <= changed
  # Each stage's record names the inputs it was built from, as they are now.
  for stage in ("embeddings", "index", "neighbours"):
    rec = provenance.read(d, stage, {})
    assert not provenance.differences(rec, provenance.expected(stage, d, {**build_lib.DEFAULTS,
                                                                          **f32}))
  global_lib.verify(global_lib.index_dir(d))
  assert all(build_lib.build(d, **f32)["stages"][s]["skipped"] for s in build_lib.STAGES)


def test_rebuild_onto_a_smaller_corpus_leaves_nothing_of_the_old_build(db, tmp_path):
  d = copy_db(db, tmp_path)
  smaller = {**SETTINGS, "corpus": corpus_path.spec(kernel=6, wiki=2)}  # 8 documents: 2 shards
  build_lib.build(d, rebuild=True, **smaller)
  store = chunk_store_lib.ChunkStore.open(d)
  assert store.num_shards == 2
  names = [layout.shard_name(s) for s in range(store.num_shards)]
  for stage in ("embeddings", "neighbours"):
    left = [f for f in stage_files(d, stage) if not any(n in f for n in names)]
    assert not [f for f in left if f.endswith(".npy")], (stage, left)
  # The edit that tripped on the old build's last shard now works.
  added = edit_lib.add_documents(d, corpus_path.spec(python=1))
  a, b = chunk_store_lib.ChunkStore.open(d).doc_range(added["first_doc_id"])
  ids, _ = retriever_lib.Retriever.from_db(d).search(
      retriever_lib.db_embedding_rows(d, np.arange(a, b)), 1)
  assert ((ids >= a) & (ids < b)).all()


def test_one_chunk_database_builds_and_searches(tmp_path):
  spm = str(tiny_db_tokenizer(tmp_path))
  corpus = tmp_path / "one.jsonl"
  corpus.write_text('{"key": "one:1", "text": "The Moon is Earth\'s only natural satellite."}\n')
  d = str(tmp_path / "one_db")
  build_lib.build(d, corpus=str(corpus), tokenizer=spm, heldout_fraction=0.0)
  store = chunk_store_lib.ChunkStore.open(d)
  assert store.num_chunks == 1
  ids, scores = retriever_lib.Retriever.from_db(d).search(
      retriever_lib.db_embedding_rows(d, np.arange(1)), 2)
  assert ids.tolist() == [[0, -1]] and np.isfinite(scores[0, 0])


def tiny_db_tokenizer(tmp_path):
  """A SentencePiece model: one document is too little to train one."""
  src = tmp_path / "tok_db"
  build_lib.build(str(src), stages=("tokenizer",), **SETTINGS)
  return src / layout.TOKENIZER_PATH
