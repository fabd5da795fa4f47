"""Training neighbours on a tiny real database (kernel docs + Wikipedia, MiniLM, ScaNN)."""
import json
import os
import shutil

import numpy as np
import pytest

from retro_jax.build import neighbours as nb
from retro_jax.build import stages as build_stages
from retro_jax.db import layout, verify
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.training import input_pipeline


@pytest.fixture(scope="module")
def stored(db, store):
  arrays, offsets = nb.open_neighbours(db, store)
  assert len(arrays) == 2  # The tiny store has two shards.
  assert offsets.tolist() == [first for _, first, _ in store.shard_spans()]
  return np.concatenate([np.asarray(a) for a in arrays])


@pytest.fixture(scope="module")
def all_embeddings(db, store):
  return np.concatenate([np.asarray(embed_lib.load_embeddings(db, s), np.float32)
                         for s, _, _ in store.shard_spans()])


@pytest.fixture(scope="module")
def exact_retriever(db, store):
  paths = retriever_lib.embedding_paths(str(db))
  return retriever_lib.Retriever.from_embeddings(
      paths, index_lib.shard_offsets(paths), config=index_lib.IndexConfig(backend="exact"),
      doc_ids=store.doc_ids)


def brute_force(emb_NxD, own_docs_N, doc_of_N, heldout_docs, k):
  """Best-first exact scores of the k nearest allowed chunks (numpy, no index)."""
  scores_NxN = emb_NxD @ emb_NxD.T
  banned = (doc_of_N[None, :] == own_docs_N[:, None]) | np.isin(doc_of_N, heldout_docs)[None, :]
  scores_NxN[banned] = -np.inf
  return -np.sort(-scores_NxN, axis=1)[:, :k]


def test_shape_dtype_and_every_chunk_has_k(store, stored):
  assert stored.dtype == np.int64
  assert stored.shape == (store.num_chunks, 2)
  assert (stored >= 0).all()  # Enough other documents for k=2 everywhere.
  assert (stored < store.num_chunks).all()
  assert (stored[:, 0] != stored[:, 1]).all()


def test_no_neighbour_from_own_or_heldout_document(store, stored):
  own_N = store.doc_ids(np.arange(store.num_chunks, dtype=np.int64))
  docs_NxK = store.doc_ids(stored.reshape(-1)).reshape(stored.shape)
  assert store.heldout_doc_ids.size >= 1  # The slice really has held-out documents.
  assert not (docs_NxK == own_N[:, None]).any()
  assert not np.isin(docs_NxK, store.heldout_doc_ids).any()


def test_exact_backend_equals_brute_force(db, store, exact_retriever, all_embeddings, tmp_path):
  got = []
  for shard, first, _ in store.shard_spans():
    out = tmp_path / f"shard-{shard:05d}.npy"
    nb.compute_shard(exact_retriever, store, embed_lib.load_embeddings(db, shard), first, out, k=2,
                     heldout_docs=store.heldout_doc_ids, block_rows=128)
    got.append(np.load(out))
  got = np.concatenate(got)
  emb = all_embeddings
  own = store.doc_ids(np.arange(store.num_chunks, dtype=np.int64))
  want_scores = brute_force(emb, own, own, store.heldout_doc_ids, 2)
  got_scores = np.einsum("nd,nkd->nk", emb, emb[got])
  np.testing.assert_allclose(got_scores, want_scores, atol=2e-5)


def test_scann_neighbours_are_near(db, store, stored, all_embeddings):
  """The stored (ScaNN) neighbours are real near neighbours (never better than exact).

  With the index's default settings the tiny shards (400 chunks: 8 leaves, 1 searched; 76 chunks:
  1 leaf) find the exact top-1 for about two thirds of the chunks (measured 0.68 on the fixed
  corpus); the exact backend is checked exactly above."""
  emb = all_embeddings
  own = store.doc_ids(np.arange(store.num_chunks, dtype=np.int64))
  want = brute_force(emb, own, own, store.heldout_doc_ids, 2)
  got = np.einsum("nd,nkd->nk", emb, emb[stored])
  top1_found = np.isclose(got[:, 0], want[:, 0], atol=1e-5).mean()
  assert top1_found >= 0.55, top1_found
  rng = np.random.default_rng(0)
  random_pairs = np.einsum("nd,nd->n", emb, emb[rng.permutation(len(emb))])
  assert got[:, 0].mean() > random_pairs.mean() + 0.2  # measured 0.52 against 0.17
  assert (got <= want + 1e-5).all()


class _Dies:
  """A retriever that raises on its n-th search (a killed run)."""

  def __init__(self, inner, n):
    self.inner, self.n, self.size = inner, n, inner.size

  def search(self, *a, **kw):
    self.n -= 1
    if self.n < 0:
      raise KeyboardInterrupt("killed")
    return self.inner.search(*a, **kw)


def test_killed_run_resumes_byte_identical(db, store, exact_retriever, tmp_path):
  emb = embed_lib.load_embeddings(db, 0)
  held = store.heldout_doc_ids
  full, part = tmp_path / "full" / "shard-00000.npy", tmp_path / "part" / "shard-00000.npy"
  nb.compute_shard(exact_retriever, store, emb, 0, full, k=2, heldout_docs=held, block_rows=100)
  with pytest.raises(KeyboardInterrupt):
    nb.compute_shard(_Dies(exact_retriever, 3), store, emb, 0, part, k=2, heldout_docs=held,
                     block_rows=100)
  progress = json.loads(part.with_suffix(".progress.json").read_text())
  assert 0 < progress["rows_done"] < emb.shape[0] and not progress["done"]
  stats = nb.compute_shard(exact_retriever, store, emb, 0, part, k=2, heldout_docs=held,
                           block_rows=100)
  assert stats["rows"] == emb.shape[0] - progress["rows_done"]
  assert full.read_bytes() == part.read_bytes()
  # A finished shard is not redone; other settings are refused with a clear error.
  assert nb.compute_shard(exact_retriever, store, emb, 0, part, k=2, heldout_docs=held,
                          block_rows=100)["skipped"]
  with pytest.raises(nb.NeighboursError, match="delete"):
    nb.compute_shard(exact_retriever, store, emb, 0, part, k=3, heldout_docs=held, block_rows=100)


def test_rerun_skips_and_shard_by_shard_gives_the_same_files(db, store, tmp_path):
  import shutil
  shards = [s for s, _, _ in store.shard_spans()]
  before = {s: layout.neighbours_path(db, s).read_bytes() for s in shards}
  stats = nb.compute_neighbours(db, k=2)
  assert stats["rows"] == 0 and stats["skipped"] == shards
  assert {s: layout.neighbours_path(db, s).read_bytes() for s in shards} == before
  # Shard 1, then shard 0 (one Beam element each), on a copy without neighbours: the same bytes.
  copy = tmp_path / "db"
  shutil.copytree(db, copy, ignore=shutil.ignore_patterns("neighbours"))
  retriever, backend = nb.load_retriever(copy, store)
  assert nb.neighbours_shard(copy, 1, retriever, store, backend, k=2)["rows"] > 0
  assert not nb.shard_is_done(copy, 0)
  assert nb.compute_neighbours(copy, k=2)["shards"] == [0]
  assert {s: layout.neighbours_path(copy, s).read_bytes() for s in shards} == before


def test_missing_index_is_a_clear_error(db, tmp_path):
  import shutil
  copy = tmp_path / "db"
  shutil.copytree(db, copy, ignore=shutil.ignore_patterns("neighbours", "index"))
  with pytest.raises(nb.NeighboursError, match="--stages=index"):
    nb.compute_neighbours(copy, k=2, backend="scann")
  with pytest.raises(nb.NeighboursError, match="python -m retro_jax.build.neighbours"):
    nb.open_neighbours(copy)


# ------------------------------------------------------------------------------------------------
# Block checksums: a read hashes the blocks its rows lie in, not the whole shard.


def _rchar() -> int:
  """Bytes this process has read through read() calls (as bench/open_reads.py counts them)."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _with_k(db, copy, k: int) -> None:
  """`copy` of `db` whose neighbours shards hold k columns (the stored two, repeated), written
  and recorded as the neighbours stage records them: a larger file of the same rows."""
  shutil.copytree(db, copy)
  for s in range(2):
    path = layout.neighbours_path(copy, s)
    rec = json.loads(layout.progress_path(path).read_text())
    np.save(path, np.tile(np.load(path), (1, k // 2)))
    nb.write_finished(path, nb.shard_record(rec["num_rows"], rec["first_id"], k,
                                            rec["block_rows"], None))


def _first_example_reads(db) -> tuple[int, dict]:
  """Bytes read by the first training example (after its source is opened), and the example."""
  src = input_pipeline.SequenceSource(db, 128, "train", True, 2, 128)
  before = _rchar()
  example = src[0]
  return _rchar() - before, example


def test_training_start_reads_one_block_whatever_the_shard_size(db, tmp_path):
  """The first example reads the same bytes from shards of 256 and of 1,024 neighbours a chunk
  (about 0.5 and 2 MB a shard: one 128 KiB block either way); without block checksums (a database
  written before them) it hashes the whole shard, so its reads grow with the shard."""
  reads, examples, sizes = {}, {}, {}
  for k in (256, 1024):
    _with_k(db, tmp_path / f"k{k}", k)
    path = layout.neighbours_path(tmp_path / f"k{k}", 0)
    rec = verify.progress_record(path)
    assert rec[verify.CHECKSUM_BLOCK_ROWS] == verify.BLOCK_BYTES // (8 * k)
    assert len(rec["block_sha256"]) > 1
    sizes[k] = os.path.getsize(path)
    reads[k], examples[k] = _first_example_reads(tmp_path / f"k{k}")
  assert sizes[1024] > 3 * sizes[256]
  # Equal but for the reads of /proc/self/io itself (a few bytes with its counters' digits).
  assert abs(reads[256] - reads[1024]) < 64, reads
  for key in examples[256]:
    np.testing.assert_array_equal(examples[256][key], examples[1024][key])
  old = {}
  for k in (256, 1024):  # the records as written before block checksums
    for s in range(2):
      prog = layout.progress_path(layout.neighbours_path(tmp_path / f"k{k}", s))
      rec = json.loads(prog.read_text())
      prog.write_text(json.dumps({key: v for key, v in rec.items()
                                  if key not in (verify.CHECKSUM_BLOCK_ROWS, "block_sha256")}))
    shutil.copytree(tmp_path / f"k{k}", tmp_path / f"old{k}")  # a file not yet verified
    old[k], _ = _first_example_reads(tmp_path / f"old{k}")
  assert old[1024] - old[256] >= sizes[1024] - sizes[256] > 0
  assert reads[256] + sizes[256] - verify.BLOCK_BYTES <= old[256]


def test_finalize_adds_block_checksums_to_older_neighbours_records(db, store, tmp_path):
  """`build_db --stages=finalize` on a database whose neighbours records have no block checksums:
  each shard is hashed once and its record becomes the one a build writes now; the .npy files
  are not changed; its rows read the same before and after."""
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  paths = [layout.neighbours_path(copy, s) for s in range(2)]
  want = {p.name: layout.progress_path(p).read_text() for p in paths}
  npys = {p.name: p.read_bytes() for p in paths}
  for p in paths:
    rec = json.loads(layout.progress_path(p).read_text())
    assert rec[verify.CHECKSUM_BLOCK_ROWS] == verify.BLOCK_BYTES // 16 and rec["block_sha256"]
    layout.write_json_atomic(layout.progress_path(p), {
        key: v for key, v in rec.items() if key not in (verify.CHECKSUM_BLOCK_ROWS, "block_sha256")})
  assert not build_stages.is_done("finalize", copy, {})
  shards, _ = nb.open_neighbours(copy)
  rows = np.arange(store.shard_span(1)[2])
  old_rows = shards.rows(1, rows)  # the whole-file check of an older record
  before = _rchar()
  assert nb.add_block_checksums(copy, store) == [0, 1]
  read = _rchar() - before
  total = sum(len(b) for b in npys.values())
  assert total <= read < total + 4096, (read, total)  # each file read once, and its record
  assert {p.name: layout.progress_path(p).read_text() for p in paths} == want
  assert {p.name: p.read_bytes() for p in paths} == npys
  assert build_stages.is_done("finalize", copy, {})
  np.testing.assert_array_equal(nb.open_neighbours(copy)[0].rows(1, rows), old_rows)
  # Through the command: a second copy, upgraded by `build_db --stages=finalize`.
  for p in paths:
    rec = json.loads(layout.progress_path(p).read_text())
    layout.write_json_atomic(layout.progress_path(p), {
        key: v for key, v in rec.items() if key not in (verify.CHECKSUM_BLOCK_ROWS, "block_sha256")})
  build_stages.build(copy, stages=("finalize",))
  assert {p.name: layout.progress_path(p).read_text() for p in paths} == want
  assert {p.name: p.read_bytes() for p in paths} == npys


def test_a_finalize_of_a_damaged_neighbours_shard_is_refused(db, tmp_path):
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  path = layout.neighbours_path(copy, 1)
  rec = json.loads(layout.progress_path(path).read_text())
  del rec["block_sha256"], rec[verify.CHECKSUM_BLOCK_ROWS]
  layout.write_json_atomic(layout.progress_path(path), rec)
  arr = np.load(path, mmap_mode="r+")
  arr[0] = arr[1]
  arr.flush()
  del arr
  with pytest.raises(verify.DamagedDataError, match="shard-00001.npy is damaged: sha256"):
    nb.add_block_checksums(copy)
  assert "block_sha256" not in json.loads(layout.progress_path(path).read_text())
