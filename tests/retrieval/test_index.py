"""Index shards (ScaNN / exact JAX / faiss) and the sharded retriever."""

import os

import corpus_path  # tests/corpus_path.py
import numpy as np
import pytest

from retro_jax.retrieval import build_index as build_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib

D = 384
N_PER_SHARD = (1200, 900, 1100)  # 3,200 points in three shards.


def clustered(rng, n, centers_CxD, basis_RxD):
  """Structured vectors like text embeddings: topic centre + low-rank variation + noise."""
  x = (centers_CxD[rng.integers(0, len(centers_CxD), n)]
       + 0.35 * rng.standard_normal((n, len(basis_RxD))).astype(np.float32) @ basis_RxD
       + 0.5 * rng.standard_normal((n, D)).astype(np.float32))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  rng = np.random.default_rng(0)
  centers, basis = rng.standard_normal((48, D)), rng.standard_normal((24, D))
  centers, basis = centers.astype(np.float32), basis.astype(np.float32)
  db = tmp_path_factory.mktemp("db")
  (db / "embeddings").mkdir()
  parts = [clustered(rng, n, centers, basis) for n in N_PER_SHARD]
  paths = []
  for i, p in enumerate(parts):
    paths.append(str(db / "embeddings" / f"shard-{i:05d}.npy"))
    np.save(paths[-1], p)
  all_NxD = np.concatenate(parts)
  # Documents: contiguous runs of 1..12 chunks, doc ids increasing with chunk id.
  lengths = rng.integers(1, 13, len(all_NxD))
  doc_ids = np.repeat(np.arange(len(lengths)), lengths)[:len(all_NxD)].astype(np.int64)
  queries = clustered(rng, 300, centers, basis)
  return dict(db=str(db), paths=paths, all=all_NxD, doc_ids=doc_ids, queries=queries)


def brute_top_k(q_QxD, db_NxD, k, exclude_Q=None, doc_ids=None):
  s = q_QxD @ db_NxD.T
  if exclude_Q is not None:
    s = np.where(doc_ids[None, :] == exclude_Q[:, None], -np.inf, s)
  return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)


def recall(a_QxK, b_QxK):
  return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(a_QxK, b_QxK)])


# Isotropic synthetic noise is harder than text embeddings: search ~half of the ~57 leaves.
SCANN = index_lib.IndexConfig(backend="scann", leaves_to_search=32)


def test_exact_backend_matches_numpy_and_blocks(data):
  cfg = index_lib.IndexConfig(backend="exact", block_size=500)  # 3 blocks, last one padded
  shard = index_lib.build_shard(data["paths"][0], 0, cfg)
  ids, scores = shard.search(data["queries"], 10)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  ref = brute_top_k(data["queries"], np.load(data["paths"][0]), 10)
  assert recall(ids, ref) == 1.0
  np.testing.assert_allclose(
      scores, np.take_along_axis(data["queries"] @ np.load(data["paths"][0]).T, ids, 1), atol=1e-5)


def test_scann_recall_at_10_vs_exact(data):
  path = os.path.join(data["db"], "all.npy")
  np.save(path, data["all"])
  scann_ids, _ = index_lib.build_shard(path, 0, SCANN).search(data["queries"], 10)
  exact_ids, _ = index_lib.build_shard(path, 0, index_lib.IndexConfig(backend="exact")).search(
      data["queries"], 10)
  r = recall(scann_ids, exact_ids)
  assert r >= 0.95, r


def test_three_shards_equal_one_exact_search(data):
  ref = brute_top_k(data["queries"], data["all"], 10)
  exact = retriever_lib.Retriever.from_embeddings(
      data["paths"], config=index_lib.IndexConfig(backend="exact"))
  ids, scores = exact.search(data["queries"], 10)
  np.testing.assert_array_equal(ids, ref)
  scann = retriever_lib.Retriever.from_embeddings(data["paths"], config=SCANN, rescore=True)
  ids2, scores2 = scann.search(data["queries"], 10)
  assert recall(ids2, ref) >= 0.97
  # "auto" trusts ScaNN's float32 reorder scores: same ids, same scores to rounding.
  scann.rescore = "auto"
  ids3, scores3 = scann.search(data["queries"], 10)
  np.testing.assert_array_equal(ids2, ids3)
  np.testing.assert_allclose(scores2, scores3, atol=1e-5)
  # Scores are exact rescoring, sorted, and the ids are global.
  np.testing.assert_allclose(scores2, np.einsum("qd,qkd->qk", data["queries"], data["all"][ids2]),
                             atol=1e-5)
  assert np.all(np.diff(scores2, axis=1) <= 0)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_same_document_exclusion(data, backend):
  cfg = index_lib.IndexConfig(backend="exact") if backend == "exact" else SCANN
  r = retriever_lib.Retriever.from_embeddings(data["paths"], config=cfg, doc_ids=data["doc_ids"])
  # Queries are database chunks: their own document is the nearest one.
  rows = np.random.default_rng(1).choice(len(data["all"]), 200, replace=False)
  q, exclude = data["all"][rows], data["doc_ids"][rows]
  ids, _ = r.search(q, 10, exclude_doc_ids_Q=exclude)
  assert np.all(ids >= 0)
  assert not np.any(data["doc_ids"][ids] == exclude[:, None])
  ref = brute_top_k(q, data["all"], 10, exclude, data["doc_ids"])
  if backend == "exact":
    np.testing.assert_array_equal(ids, ref)
  else:
    assert recall(ids, ref) >= 0.95
  # Without exclusion the chunk itself comes first.
  ids_all, _ = r.search(q, 10)
  np.testing.assert_array_equal(ids_all[:, 0], rows)


def test_exclusion_refetches_when_own_document_crowds_out(tmp_path):
  # One document of 100 near-identical chunks; k * overfetch = 8 candidates are all its own.
  rng = np.random.default_rng(2)
  base = rng.standard_normal(D).astype(np.float32)
  x = np.concatenate([base + 0.01 * rng.standard_normal((100, D)), rng.standard_normal((50, D))])
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  np.save(tmp_path / "e.npy", x)
  doc_ids = np.concatenate([np.zeros(100), np.arange(1, 51)]).astype(np.int64)
  r = retriever_lib.Retriever.from_embeddings(
      [str(tmp_path / "e.npy")], config=index_lib.IndexConfig(backend="exact"),
      doc_ids=doc_ids, overfetch=4)
  ids, _ = r.search(x[:3], 2, exclude_doc_ids_Q=np.zeros(3, np.int64))
  np.testing.assert_array_equal(ids, brute_top_k(x[:3], x, 2, np.zeros(3, np.int64), doc_ids))
  assert np.all(ids >= 100)


def test_int64_ids_above_2_pow_31(data):
  offsets = [0, 3 * 2**31, 5 * 2**32]
  r = retriever_lib.Retriever.from_embeddings(
      data["paths"], offsets, config=index_lib.IndexConfig(backend="exact"),
      doc_starts=np.array(offsets, np.int64))  # one document per shard
  ids, _ = r.search(data["queries"], 10)
  assert ids.dtype == np.int64
  # Map the reference (dense) ids to the fake global ids.
  bounds = np.cumsum((0,) + N_PER_SHARD)
  ref = brute_top_k(data["queries"], data["all"], 10)
  which = np.searchsorted(bounds, ref, side="right") - 1
  np.testing.assert_array_equal(ids, np.array(offsets)[which] + ref - bounds[which])
  assert ids.max() > 2**32
  # Exclude the shard-2 document: no id at or above its offset comes back.
  ids2, _ = r.search(data["queries"], 10, exclude_doc_ids_Q=np.full(300, 2))
  assert ids2.max() < offsets[2]


def test_pads_with_minus_one(tmp_path):
  x = np.eye(4, D, dtype=np.float32)
  np.save(tmp_path / "e.npy", x)
  for cfg in (index_lib.IndexConfig(backend="exact"), index_lib.IndexConfig()):
    r = retriever_lib.Retriever.from_embeddings([str(tmp_path / "e.npy")], config=cfg,
                                                doc_ids=np.array([0, 0, 1, 2], np.int64))
    ids, scores = r.search(x[:1], 6, exclude_doc_ids_Q=np.array([0]))
    np.testing.assert_array_equal(ids[0, 2:], -1)
    assert sorted(ids[0, :2]) == [2, 3] and np.all(np.isneginf(scores[0, 2:]))


def build(db, backend="scann", **kw):
  cfg = SCANN if backend == "scann" else index_lib.IndexConfig(backend=backend)
  return build_lib.build_index(db, cfg, **kw)


def test_build_serialize_load_round_trip_and_restart(data):
  dirs = build(data["db"])
  assert len(dirs) == 3
  in_memory = retriever_lib.Retriever.from_embeddings(data["paths"], config=SCANN)
  loaded = retriever_lib.Retriever.from_db(data["db"], "scann")
  assert [s.offset for s in loaded.shards] == [0, 1200, 2100]
  a, sa = in_memory.search(data["queries"], 10)
  b, sb = loaded.search(data["queries"], 10)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(sa, sb, atol=1e-6)  # ScaNN's reorder scores can differ by an ulp
  # Rerun: finished shards are not rebuilt.
  mtimes = [os.path.getmtime(os.path.join(d, index_lib.MANIFEST)) for d in dirs]
  build(data["db"])
  assert mtimes == [os.path.getmtime(os.path.join(d, index_lib.MANIFEST)) for d in dirs]


def test_build_is_deterministic(data, tmp_path):
  d1 = build(data["db"], out_dir=str(tmp_path / "a"), shards={1})
  d2 = build(data["db"], out_dir=str(tmp_path / "b"), shards={1})
  assert [os.path.basename(d) for d in d1] == ["shard-00001"]
  m1, m2 = index_lib.read_manifest(d1[0]), index_lib.read_manifest(d2[0])
  assert m1["files"] == m2["files"]  # byte-identical serialised searchers
  s1, s2 = index_lib.load_shard(d1[0]), index_lib.load_shard(d2[0])
  np.testing.assert_array_equal(s1.search(data["queries"], 10)[0],
                                s2.search(data["queries"], 10)[0])


def test_corrupt_or_missing_shard_file_is_a_clear_error(data, tmp_path):
  (d,) = build(data["db"], out_dir=str(tmp_path / "idx"), shards={0})
  victim = os.path.join(d, "hashed_dataset.npy")
  with open(victim, "r+b") as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(index_lib.IndexError_, match=r"hashed_dataset\.npy is corrupt"):
    index_lib.load_shard(d)
  # The build notices and rebuilds it.
  build(data["db"], out_dir=str(tmp_path / "idx"), shards={0})
  index_lib.load_shard(d)
  os.remove(os.path.join(d, "dataset.npy"))
  with pytest.raises(index_lib.IndexError_, match=r"dataset\.npy is missing"):
    index_lib.load_shard(d)
  os.remove(os.path.join(d, index_lib.MANIFEST))
  with pytest.raises(index_lib.IndexError_, match=r"manifest\.json is missing"):
    index_lib.load_shard(d)
  with pytest.raises(index_lib.IndexError_, match=r"shard-00001"):
    retriever_lib.Retriever.load([str(tmp_path / "idx" / "shard-00001")])


def test_faiss_backend_same_interface(data):
  cfg = index_lib.IndexConfig(backend="faiss", faiss_factory="IVF32,PQ192x4fs,RFlat",
                              faiss_nprobe=16, faiss_k_factor=8)
  r = retriever_lib.Retriever.from_embeddings(data["paths"], config=cfg)
  ids, scores = r.search(data["queries"], 10)
  assert ids.dtype == np.int64
  np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", data["queries"], data["all"][ids]),
                             atol=1e-5)
  assert recall(ids, brute_top_k(data["queries"], data["all"], 10)) >= 0.9


@pytest.fixture(scope="module")
def real_text(tmp_path_factory):
  """1,343 48-word chunks of the fixed corpus's kernel docs (PCI and filesystems, 50 files),
  embedded with the real MiniLM."""
  import glob
  from retro_jax.retrieval.embedder import Embedder
  files = sorted(glob.glob(os.path.join(corpus_path.KERNEL_DIR, "**", "*.rst.txt"), recursive=True))
  assert len(files) == 50, corpus_path.KERNEL_DIR
  texts, docs = [], []
  for d, f in enumerate(files):
    with open(f, errors="replace") as fh:
      words = fh.read().split()
    for s in range(0, len(words), 48):
      texts.append(" ".join(words[s:s + 48]))
      docs.append(d)
  assert len(texts) == 1343
  emb_NxD = Embedder.load(max_length=64).embed(texts)
  path = tmp_path_factory.mktemp("real") / "e.npy"
  np.save(path, emb_NxD)
  return dict(path=str(path), emb=emb_NxD, doc_ids=np.array(docs, np.int64))


def test_scann_recall_on_real_text_embeddings(real_text):
  emb, docs = real_text["emb"], real_text["doc_ids"]
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
  rows = np.random.default_rng(3).choice(len(emb), 200, replace=False)
  keep = np.setdiff1d(np.arange(len(emb)), rows)
  held_out_path = real_text["path"].replace("e.npy", "db.npy")
  np.save(held_out_path, emb[keep])
  q = emb[rows]
  # 8 of its 22 leaves (1,143 points): measured r@10 0.982, r@2 0.990 on the fixed corpus (6 leaves:
  # 0.962, 4: 0.894), so 0.95 fails when the partitioning or the search loses a leaf's worth.
  cfg = index_lib.IndexConfig(backend="scann", leaves_to_search=8)
  scann_ids, _ = index_lib.build_shard(held_out_path, 0, cfg).search(q, 10)
  exact_ids, _ = index_lib.build_shard(
      held_out_path, 0, index_lib.IndexConfig(backend="exact")).search(q, 10)
  np.testing.assert_array_equal(exact_ids, brute_top_k(q, emb[keep], 10))
  r10, r2 = recall(scann_ids, exact_ids), recall(scann_ids[:, :2], exact_ids[:, :2])
  assert r10 >= 0.95 and r2 >= 0.95, (r10, r2)
  # Same-document exclusion on real text: queries are database chunks, their document excluded.
  r = retriever_lib.Retriever.from_embeddings([real_text["path"]], config=cfg, doc_ids=docs)
  ids, _ = r.search(emb[rows], 10, exclude_doc_ids_Q=docs[rows])
  assert not np.any(docs[ids] == docs[rows][:, None])
  assert recall(ids, brute_top_k(emb[rows], emb, 10, docs[rows], docs)) >= 0.95  # measured 0.980


def test_db_layout_offsets_from_chunk_store_and_unfinished_embeddings(data, tmp_path):
  import json
  import shutil
  db = tmp_path / "db"
  shutil.copytree(os.path.join(data["db"], "embeddings"), db / "embeddings")
  (db / "chunks").mkdir()
  firsts = [0, 5 * 2**31, 5 * 2**31 + 900]  # the chunk store decides the global ids
  shards = [{"index": i, "first_chunk_id": f, "num_chunks": n}
            for i, (f, n) in enumerate(zip(firsts, N_PER_SHARD))]
  (db / "chunks" / "manifest.json").write_text(json.dumps({"shards": shards}))
  assert [o for _, _, o in retriever_lib.db_embedding_shards(str(db))] == firsts
  (db / "embeddings" / "shard-00002.progress.json").write_text(json.dumps({"done": False}))
  with pytest.raises(index_lib.IndexError_, match=r"shard-00002\.npy is missing or unfinished"):
    build(str(db), backend="exact")
  build(str(db), backend="exact", shards={0})  # shard 0 alone: finished, so it builds
  (db / "embeddings" / "shard-00002.progress.json").write_text(json.dumps({"done": True}))
  build(str(db), backend="exact")
  r = retriever_lib.Retriever.from_db(str(db), "exact")
  ids, _ = r.search(data["queries"], 5)
  assert ids.min() >= 0 and ids.dtype == np.int64
  assert [s.offset for s in r.shards] == firsts
