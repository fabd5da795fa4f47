"""The global index (retro_jax/retrieval/global_index.py) on a copy of the tiny real database.

One partitioner and quantizer trained on a sample, every vector encoded once, partitions grouped
into three serving shards: recall against exact search, routing to the nearest partitions only,
the retriever and training neighbours through it, documents added and removed, corruption named,
and the gRPC service giving the in-process answer.
"""

import concurrent.futures
import dataclasses
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from retro_jax.build import edit as edit_db  # noqa: E402
from retro_jax.build import stages as build_stages  # noqa: E402
from retro_jax.build import neighbours as nb  # noqa: E402
from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402
from retro_jax.retrieval import build_index as build_index_lib  # noqa: E402
from retro_jax.retrieval import client as client_lib  # noqa: E402
from retro_jax.retrieval import global_index as global_lib  # noqa: E402
from retro_jax.retrieval import index as index_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from retro_jax.retrieval import shard_server as serve_lib  # noqa: E402

CONFIG = global_lib.GlobalIndexConfig(serving_shards=3, nprobe=4)


def _copy_with_global(tmp_path_factory, name):
  src = tiny_db.get(tmp_path_factory)[0]
  dst = tmp_path_factory.mktemp(name) / "db"
  shutil.copytree(src, dst)
  build_index_lib.build_global_index(str(dst), CONFIG)
  return str(dst)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return _copy_with_global(tmp_path_factory, "global")


@pytest.fixture(scope="module")
def store(db):
  return chunk_store_lib.ChunkStore.open(db)


@pytest.fixture(scope="module")
def emb(db):
  return np.concatenate([np.load(p) for p in retriever_lib.embedding_paths(db)])


def exact_top(queries, emb_NxD, k, own_Q=None, doc_N=None):
  s = queries @ emb_NxD.T
  if own_Q is not None:
    s[doc_N[None, :] == own_Q[:, None]] = -np.inf
  return np.argsort(-s, axis=1, kind="stable")[:, :k], -np.sort(-s, axis=1)[:, :k]


def test_layout_manifest_and_memory(db, emb):
  root = global_lib.index_dir(db)
  m = global_lib.read_manifest(root)
  assert m["count"] == len(emb) and global_lib.serving_shard_ids(m) == [0, 1, 2]
  assert m["num_sources"] == 2 and set(m["files"]) == {"trained.faiss", "scale.npy"}
  recs = [global_lib.read_serving_record(root, s) for s in range(3)]
  assert sum(r["count"] for r in recs) == len(emb)
  parts = [(r["part_start"], r["part_end"]) for r in recs]
  assert parts[0][0] == 0 and parts[-1][1] == m["config"]["nlist"]
  assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
  # Each serving shard's rerank copy holds its own vectors, in id order, beside their ids.
  ids = [np.load(global_lib.serving_path(root, s, "ids")) for s in range(3)]
  assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(len(emb)))
  for s in range(3):
    rr = np.load(global_lib.serving_path(root, s, "rerank"), mmap_mode="r")
    assert rr.dtype == np.int8 and rr.shape == (len(ids[s]), emb.shape[1])
    assert np.all(np.diff(ids[s]) > 0) and len(ids[s]) == recs[s]["count"]
    scale = np.load(root / "scale.npy")
    assert np.abs(rr[:5] * scale - emb[ids[s][:5]]).max() < 0.01
  global_lib.verify(root)
  g = global_lib.GlobalIndex(root)
  # RAM: PQ codes (48 B at pq_m=96) + int64 id, plus fast-scan block padding (large for 500
  # vectors in tiny partitions; the benchmarks report it at scale).
  assert g.memory_bytes() >= len(emb) * (48 + 8)
  assert retriever_lib.db_backend(db) == "global"


def test_recall_against_exact(db, emb):
  g = global_lib.GlobalIndex(global_lib.index_dir(db))
  queries = emb[::5]
  ids, scores = g.search(queries, 10)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  ref, _ = exact_top(queries, emb, 10)
  true = np.einsum("qd,qkd->qk", queries, emb[ids])
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
  assert recall >= 0.9, recall
  assert np.abs(true - scores).max() < 0.02  # int8 rerank scores track the float32 ones


def test_query_visits_only_its_nearest_partitions(db, emb):
  g = global_lib.GlobalIndex(global_lib.index_dir(db), nprobe=1)
  # A rerank pool small enough for one partition (nprobe grows to fill larger pools).
  g.config = dataclasses.replace(g.config, rerank=5)
  part_of = g.quantizer.assign(np.ascontiguousarray(emb), 1).ravel()
  queries = emb[:40]
  ids, _ = g.search(queries, 5)
  home = g.quantizer.assign(np.ascontiguousarray(queries), 1).ravel()
  valid = ids >= 0
  assert valid.any()
  assert np.all(part_of[ids[valid]] == np.repeat(home, 5).reshape(ids.shape)[valid])
  # More partitions probed: answers from other partitions (and serving shards) appear.
  wide = global_lib.GlobalIndex(global_lib.index_dir(db), nprobe=8)
  wide.config = dataclasses.replace(wide.config, rerank=5)
  ids8, _ = wide.search(queries, 5)
  assert np.any(part_of[ids8] != home[:, None])


def test_retriever_excludes_own_document_and_merges_serving_shards(db, store, emb):
  r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  assert len(r.shards) == 3 and r.size == len(emb)
  queries, qids = emb[::7], np.arange(0, len(emb), 7)
  own = store.doc_ids(qids)
  ids, _ = r.search(queries, 5, own)
  assert np.all(store.doc_ids(ids[ids >= 0]) != np.repeat(own, 5)[ids.ravel() >= 0])
  doc_N = store.doc_ids(np.arange(len(emb)))
  ref, _ = exact_top(queries, emb, 5, own, doc_N)
  recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, ref)])
  assert recall >= 0.9, recall


def test_training_neighbours_through_the_global_index(tmp_path_factory, emb):
  db = _copy_with_global(tmp_path_factory, "global_nbrs")
  shutil.rmtree(os.path.join(db, "neighbours"))
  nb.compute_neighbours(db, k=2)  # the backend the database holds: global
  store = chunk_store_lib.ChunkStore.open(db)
  got = np.concatenate([np.asarray(a) for a in nb.open_neighbours(db)[0]])
  exact = retriever_lib.Retriever.from_embeddings(
      retriever_lib.embedding_paths(db), config=index_lib.IndexConfig(backend="exact"),
      doc_ids=store.doc_ids)
  want = nb.search_block(exact, store, emb, np.arange(len(emb)), 2, store.heldout_doc_ids)
  recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(got, want)])
  assert recall >= 0.9, recall


def test_add_and_remove_documents(tmp_path_factory):
  db = _copy_with_global(tmp_path_factory, "global_edit")
  before = global_lib.read_manifest(global_lib.index_dir(db))["count"]
  out = edit_db.add_documents(db, corpus_path.spec(python=2), backend="global")
  store = chunk_store_lib.ChunkStore.open(db)
  after = global_lib.read_manifest(global_lib.index_dir(db))
  assert after["count"] == before + out["num_chunks"] == store.num_chunks
  assert after["num_sources"] == 3
  global_lib.verify(global_lib.index_dir(db))
  new = np.load(retriever_lib.embedding_paths(db)[2])
  r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  ids, _ = r.search(new[:8], 1)
  assert np.all(ids[:, 0] >= out["first_chunk_id"])  # each new chunk finds itself
  doc = int(store.doc_ids([out["first_chunk_id"]])[0])
  edit_db.remove_documents(db, [doc], backend="global")
  a, b = chunk_store_lib.ChunkStore.open(db).doc_range(doc)
  r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
  ids, _ = r.search(new[:8], 10)
  assert not np.any((ids >= a) & (ids < b))


def _rchar() -> int:
  """Bytes this process has read through read() calls so far (/proc/self/io)."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _reads() -> np.ndarray:
  """[read calls, bytes read] of this thread so far (/proc/thread-self/io: syscr, rchar)."""
  with open("/proc/thread-self/io") as f:
    io = dict(line.split(": ") for line in f.read().splitlines())
  return np.array([int(io["syscr"]), int(io["rchar"])])


def _count(fn):
  """(fn's result, [read calls, bytes read] it took on this thread), less this count's own."""
  a = _reads()
  own = _reads() - a
  b = _reads()
  out = fn()
  return out, _reads() - b - own


def _without_lists(root, dst):
  """A copy of the index at `root` as one built before lists files: none, none recorded."""
  shutil.copytree(root, dst)
  for s in range(3):
    rec = global_lib.read_serving_record(dst, s)
    del rec["files"]["lists"]
    global_lib.layout.write_json_atomic(global_lib.serving_path(dst, s, "record"), rec)
    global_lib.serving_path(dst, s, "lists").unlink()
  return dst


def test_lists_read_when_probed_give_the_whole_read_answer(db, emb, tmp_path):
  """Opening reads the trained files and, per serving shard, its faiss file's header and its
  lists file's header and ends, not its lists nor a count per partition; a query reads the lists
  it probes, once. The answers are the whole read's and the count walk's (an index without lists
  files) bit for bit (ids and scores), with searches from several threads at once."""
  root = global_lib.index_dir(db)
  walk_root = _without_lists(root, tmp_path / "walk")
  m = global_lib.read_manifest(root)
  nlist = int(m["config"]["nlist"])
  faiss_bytes = sum(global_lib.serving_path(root, s, "faiss").stat().length for s in range(3))
  before = _rchar()
  lazy = global_lib.GlobalIndex(root)
  lazy_read = _rchar() - before
  walk = global_lib.GlobalIndex(walk_root)  # reads counted by test_open_reads_do_not_grow...
  before = _rchar()
  whole = global_lib.GlobalIndex(root, lazy_lists=False)
  whole_read = _rchar() - before
  assert whole_read >= faiss_bytes
  # scale.npy, 2 x 4 KiB of trained.faiss (memory-mapped, not read), the manifest; per serving
  # shard its record, 2 x 4 KiB of faiss header, its lists file's header and first and last
  # entries (no count per partition), and one 8 KiB buffer for each .npy header (rerank, ids)
  lists_head = len(global_lib.serving_lists.lists_file_header(nlist))
  per_shard = 1024 + 2 * 4096 + 36 + lists_head + 16 + 2 * 8192
  small = m["files"][global_lib.SCALE]["bytes"] + 2 * 4096 + 4096 + 3 * per_shard
  assert lazy_read <= small < whole_read
  assert whole_read - lazy_read >= m["files"][global_lib.TRAINED]["bytes"] + faiss_bytes - small
  for s in range(3):
    assert lazy._lists[s].lists_path and not lazy._lists[s].loaded.any()
    assert walk._lists[s].lists_path is None
  assert lazy.count == walk.count == whole.count == len(emb)
  assert lazy.memory_bytes() == walk.memory_bytes() == whole.memory_bytes()
  noisy = emb + np.random.default_rng(0).normal(0, 0.05, emb.shape).astype(np.float32)
  for queries in (emb[::3], noisy[1::3]):
    for n in (1, 10, 200):  # 200: past the rerank pool, more partitions probed
      want = whole.search(queries, n)
      for got in (lazy.search(queries, n), walk.search(queries, n)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
  # What was read by lists: the same offsets as the walk's (-1: not read, not probed).
  for s in range(3):
    known = lazy._lists[s].offsets >= 0
    assert known.sum() > 2
    np.testing.assert_array_equal(lazy._lists[s].offsets[known], walk._lists[s].offsets[known])
  one, one_whole = lazy.restricted([1]), whole.restricted([1])
  np.testing.assert_array_equal(one.search(noisy[:40], 10)[0], one_whole.search(noisy[:40], 10)[0])
  # A fresh open searched from four threads at once: each list read once, the same answers.
  for fresh in (global_lib.GlobalIndex(root), global_lib.GlobalIndex(walk_root)):
    blocks = np.array_split(np.arange(len(emb)), 8)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      got = list(pool.map(lambda b: fresh.search(noisy[b], 10), blocks))
    for b, (ids, scores) in zip(blocks, got):
      want_ids, want_scores = whole.search(noisy[b], 10)
      np.testing.assert_array_equal(ids, want_ids)
      np.testing.assert_array_equal(scores, want_scores)


def _open_lists(root, s, nlist, with_lists=True):
  """ServingLists of serving shard s (with its lists file, or walking the counts), and the
  (read calls, bytes) opening it took on this thread."""
  trained = global_lib.serving_lists.TrainedFile(
      str(root / global_lib.TRAINED), os.stat(root / global_lib.TRAINED).st_size, nlist)
  rec = global_lib.read_serving_record(root, s)["files"]
  lists = global_lib.serving_path(root, s, "lists")
  return _count(lambda: global_lib.serving_lists.ServingLists(
      str(global_lib.serving_path(root, s, "faiss")), trained, rec["faiss"]["bytes"],
      str(lists) if with_lists else None, rec["lists"]["bytes"] if with_lists else None))


def test_open_reads_do_not_grow_with_nlist(db, emb, tmp_path):
  """With its lists file, opening a serving shard takes the same reads (calls and bytes) at
  nlist 4 and 12, and a probed list two more (its offsets, then the list); walking the counts
  takes one read per partition more. Both give the lists the whole file holds."""
  sources = retriever_lib.db_global_sources(db)
  opened = {}
  for nlist in (4, 12):
    root = tmp_path / f"nlist{nlist}"
    global_lib.build(sources, root, global_lib.GlobalIndexConfig(nlist=nlist, serving_shards=1))
    path = str(root / global_lib.TRAINED)
    trained_file = global_lib.serving_lists.TrainedFile(path, os.stat(path).st_size, nlist)
    trained, trained_reads = _count(lambda: global_lib.serving_lists.TrainedFile(
        path, os.stat(path).st_size, nlist).index())
    # A serving shard's empty index, built around the mapped trained index's quantizer (not
    # loaded again), is the trained file byte for byte; with ntotal set, the serving header's.
    built = trained_file.serving_index(0)
    assert (global_lib._ivf(built).quantizer.this
            == global_lib._ivf(trained_file.index()).quantizer.this)
    np.testing.assert_array_equal(global_lib.faiss.serialize_index(built),
                                  np.fromfile(path, np.uint8))
    lists, reads = _open_lists(root, 0, nlist)
    walked, walk_reads = _open_lists(root, 0, nlist, with_lists=False)
    whole = global_lib._read_index(global_lib.serving_path(root, 0, "faiss"))
    parts = np.arange(nlist)
    assert _count(lambda: lists.ensure(parts[:1]))[1][0] == 2
    lists.ensure(parts)
    walked.ensure(parts)
    for p in parts:
      want = global_lib._list_entries(global_lib._ivf(whole), int(p))
      for got in (lists, walked):
        have = global_lib._list_entries(global_lib._ivf(got.index), int(p))
        np.testing.assert_array_equal(have[0], want[0])
        np.testing.assert_array_equal(have[1], want[1])
    assert global_lib._ivf(trained).quantizer.ntotal == nlist  # mapped, usable
    opened[nlist] = reads, walk_reads, trained_reads
  np.testing.assert_array_equal(opened[4][0], opened[12][0])  # calls and bytes
  np.testing.assert_array_equal(opened[4][2], opened[12][2])  # the trained file: its two ends
  assert opened[12][1][0] - opened[4][1][0] == 12 - 4  # a count per partition


def test_corrupt_serving_shard_is_named(tmp_path_factory):
  """A serving shard's faiss file with its header changed, or cut short, is named at open; a byte
  changed in its lists (which opening does not read) is named by `verify`, the audit. The same
  for trained.faiss, memory-mapped at open: its size checked then, its content by `verify`."""
  db = _copy_with_global(tmp_path_factory, "global_corrupt")
  root = global_lib.index_dir(db)
  path = root / "serving" / "shard-00001.faiss"
  good = path.read_bytes()
  offsets = np.load(global_lib.serving_path(root, 1, "lists"))
  p = int(np.flatnonzero(np.diff(offsets) > 16)[0])
  in_codes = int(offsets[p + 1] - 1)  # the last byte of its PQ codes
  for where in (20, in_codes):
    data = bytearray(good)
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))
    if where == in_codes:
      retriever_lib.Retriever.from_db(db)  # opens: the lists are not read
      with pytest.raises(index_lib.IndexError_, match="shard-00001.faiss"):
        global_lib.verify(root)
    else:
      with pytest.raises(index_lib.IndexError_, match="shard-00001.faiss"):
        retriever_lib.Retriever.from_db(db)
  path.write_bytes(good[:-100])
  with pytest.raises(index_lib.IndexError_, match="shard-00001.faiss"):
    retriever_lib.Retriever.from_db(db)
  path.write_bytes(good)
  # trained.faiss is memory-mapped: a changed centroid byte opens (named by `verify`, and by a
  # whole read, which checks its sha256); a file not at its recorded size is named at open.
  trained = root / global_lib.TRAINED
  whole = trained.read_bytes()
  data = bytearray(whole)
  data[len(data) // 2] ^= 0xFF
  trained.write_bytes(bytes(data))
  retriever_lib.Retriever.from_db(db)
  for check in (lambda: global_lib.verify(root),
                lambda: global_lib.GlobalIndex(root, lazy_lists=False)):
    with pytest.raises(index_lib.IndexError_, match="trained.faiss.*sha256"):
      check()
  trained.write_bytes(whole[:-16])
  with pytest.raises(index_lib.IndexError_, match="trained.faiss is damaged"):
    retriever_lib.Retriever.from_db(db)


def test_damaged_lists_file_is_refused(tmp_path_factory):
  """A lists file not at its recorded size, not of int64 [nlist + 1], whose ends are not the
  lists', or missing, is refused at open, naming it and the fix; one with a probed partition's
  offsets wrong is refused when a query reads that partition (never wrong lists), and by
  `verify`. Deleted and written again by the upgrade, it is the build's, byte for byte."""
  db = _copy_with_global(tmp_path_factory, "global_lists_damaged")
  root = global_lib.index_dir(db)
  path = global_lib.serving_path(root, 1, "lists")
  good = path.read_bytes()
  head = len(good) - 8 * (int(global_lib.read_manifest(root)["config"]["nlist"]) + 1)
  offsets = np.load(path)
  p = int(np.flatnonzero(np.diff(offsets) > 16)[0])
  emb = np.concatenate([np.load(x) for x in retriever_lib.embedding_paths(db)])
  g = global_lib.GlobalIndex(root)
  probed = [q for q in range(len(emb)) if p in g.route(emb[q:q + 1], 1)[0]]

  def damaged(at, value):
    data = bytearray(good)
    data[at:at + 8] = int(value).to_bytes(8, "little", signed=True)
    return bytes(data)

  fix = "lists file .*shard-00001.lists.npy.*--stages=finalize"
  for data in (good + b"\0" * 8, good[:-8], good.replace(b"<i8", b"<i4"),
               damaged(head, offsets[0] + 16), damaged(len(good) - 8, offsets[-1] - 1)):
    path.write_bytes(data)
    with pytest.raises(index_lib.IndexError_, match=fix):
      global_lib.GlobalIndex(root)
  for wrong in (offsets[p] + 8, offsets[p + 1]):  # inside its list; the next list's
    path.write_bytes(damaged(head + 8 * p, wrong))
    g = global_lib.GlobalIndex(root)  # opens: the entry is read when partition p is probed
    with pytest.raises(index_lib.IndexError_, match=fix):
      g.search(emb[probed[:1]], 10)
    with pytest.raises(index_lib.IndexError_, match="shard-00001.lists.npy"):
      global_lib.verify(root)
  path.unlink()
  with pytest.raises(index_lib.IndexError_, match="shard-00001.lists.npy is missing.*finalize"):
    global_lib.GlobalIndex(root)
  assert global_lib.write_lists_files(root) == [1]
  assert path.read_bytes() == good
  global_lib.verify(root)


def test_finalize_writes_lists_files_into_an_older_index(db, tmp_path):
  """An index built before lists files (none recorded) is upgraded by `build_db
  --stages=finalize`: each serving shard's lists file and record are the build's, byte for
  byte; its faiss files and manifest (the index's content fingerprint) are unchanged; a second
  finalize does nothing."""
  copy = tmp_path / "db"
  shutil.copytree(db, copy, ignore=shutil.ignore_patterns("global"))
  root = global_lib.index_dir(db)
  old = _without_lists(root, global_lib.index_dir(copy))
  want = tiny_db.digests(root)
  before = tiny_db.digests(old)
  assert set(want) - set(before) == {f"serving/shard-0000{s}.lists.npy" for s in range(3)}
  assert global_lib.lists_files_missing(old) == [0, 1, 2]
  assert not build_stages.is_done("finalize", copy, build_stages.DEFAULTS)
  build_stages.build(copy, stages=("finalize",))
  assert tiny_db.digests(old) == want
  assert global_lib.lists_files_missing(old) == []
  assert build_stages.is_done("finalize", copy, build_stages.DEFAULTS)
  record = build_stages.build(copy, stages=("finalize",))
  assert record["stages"]["finalize"]["skipped"]
  global_lib.verify(old)


def test_service_serves_partitions_with_the_in_process_answer(db, store, emb, tmp_path_factory):
  procs = serve_lib.start_shards(db, [0, 1, 2], str(tmp_path_factory.mktemp("serve_global")))
  try:
    with client_lib.ServiceRetriever([p.address for p in procs], timeout_s=30.0) as service:
      assert service.size == len(emb)
      r = retriever_lib.Retriever.from_db(db, doc_ids=store.doc_ids)
      qids = np.arange(0, len(emb), 3)
      own = store.doc_ids(qids)
      want, want_s = r.search(emb[qids], 4, own)
      got, got_s = service.search(emb[qids], 4, own)
      np.testing.assert_array_equal(got, want)
      np.testing.assert_allclose(got_s, want_s, rtol=1e-6)
  finally:
    for p in procs:
      p.stop()


def test_build_is_deterministic(db, tmp_path):
  """The same sources and seed give byte-identical index files."""
  sources = retriever_lib.db_global_sources(db)
  global_lib.build(sources, tmp_path / "again", CONFIG)
  a = global_lib.read_manifest(global_lib.index_dir(db))
  b = global_lib.read_manifest(tmp_path / "again")
  assert a["files"] == b["files"] and a["content_sha256"] == b["content_sha256"]


def test_scann_searcher_on_the_same_layout(tmp_path_factory, emb):
  """`--index_searcher=scann` (the Beam index stage): the same serving shards and int8 rerank,
  a ScaNN searcher within each; both searchers answer from the one index, near exact search."""
  from retro_jax.build import stages as build_lib
  from retro_jax.build import pipeline as pipeline_lib
  src = tiny_db.get(tmp_path_factory)[0]
  db = tmp_path_factory.mktemp("global_scann") / "db"
  for sub in ("tokenizer", "chunks", "embeddings", "provenance"):
    shutil.copytree(src / sub, db / sub)
  cfg = {**build_lib.DEFAULTS, "index_searcher": "scann"}
  pipeline_lib.run_stage("index", db, cfg)
  root = global_lib.index_dir(db)
  m = global_lib.read_manifest(root)
  assert m["config"]["searcher"] == "scann"
  assert any(f.startswith("scann/") for f in global_lib.read_serving_record(root, 0)["files"])
  global_lib.verify(root)
  true, _ = exact_top(emb[:50], emb, 10)
  for name in ("faiss", "scann"):
    g = global_lib.GlobalIndex(root, searcher=name)
    # ~45 leaves for ~500 vectors: search half (the default fraction is for large shards)
    g.config = dataclasses.replace(g.config, scann_leaves_to_search=0.5)
    found, _ = g.search(emb[:50], 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, true)])
    assert recall >= 0.9, (name, recall)


def test_parallel_training_in_beam(db, emb, tmp_path_factory, monkeypatch, capsys):
  """The partitioner trained as many elements (forced on the tiny database by its threshold;
  ~1e9 vectors and up by default): the Beam stage (in-process runner, two sample groups) gives
  the bytes of the plain build's `train_hierarchical`, again on a second run, and recall@10
  within 0.05 of the one-k-means training's."""
  from retro_jax.build import stages as build_lib
  from retro_jax.build import pipeline as pipeline_lib
  monkeypatch.setattr(global_lib, "ENCODE_GROUP_SOURCES", 1)
  # Sub-samples smaller than the sample, so that each sample group passes on its share.
  config = dataclasses.replace(CONFIG, parallel_train_min_sample=0, coarse_points_per_cell=32,
                               pq_train_sample=200)
  src = tiny_db.get(tmp_path_factory)[0]
  roots = []
  for name in ("parallel_a", "parallel_b"):
    out = tmp_path_factory.mktemp(name) / "db"
    for sub in ("tokenizer", "chunks", "embeddings", "provenance"):
      shutil.copytree(src / sub, out / sub)
    pipeline_lib.run_stage("index", out, {**build_lib.DEFAULTS, "global_index_config": config})
    roots.append(global_lib.index_dir(out))
  assert "coarse cells in parallel" in capsys.readouterr().out
  plain = tmp_path_factory.mktemp("parallel_plain")
  global_lib.build(retriever_lib.db_global_sources(db), plain, config)
  files = [global_lib.read_manifest(r)["files"] for r in (*roots, plain)]
  assert files[0] == files[1] == files[2]
  assert files[0] != global_lib.read_manifest(global_lib.index_dir(db))["files"]
  c = global_lib.GlobalIndexConfig.from_json(global_lib.read_manifest(roots[0])["config"])
  assert global_lib.trains_in_parallel(c, len(emb)) and global_lib.coarse_cells(c) > 1
  assert global_lib.coarse_cells(c) * c.coarse_points_per_cell < len(emb)
  queries = emb[::3]
  ref, _ = exact_top(queries, emb, 10)
  recall = {}
  for name, root in (("one", global_lib.index_dir(db)), ("parallel", roots[0])):
    ids, _ = global_lib.GlobalIndex(root, nprobe=2).search(queries, 10)
    recall[name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
  assert recall["parallel"] >= recall["one"] - 0.05, recall
