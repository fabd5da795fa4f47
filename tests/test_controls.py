"""The controls of issue 15: the shuffled-neighbours evaluation and the paper's training rule.

* `--retrieval=shuffled` really hands each held-out chunk the neighbours retrieved for a chunk of
  ANOTHER held-out document (a seeded pairing), all the way into the model's neighbour tokens.
* Training neighbours exclude every document present in the sequence, not only the chunk's own.
* The paired bootstrap's interval covers the difference and is reproducible.
"""
import os
import sys

import numpy as np

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.training import input_pipeline as loader
from retro_jax.training.sequence_exclusion import exclude_documents

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402


def test_shuffled_rows_pair_every_chunk_with_another_document():
  doc_C = np.repeat(np.arange(6), [5, 1, 7, 3, 3, 2])
  perm = controls.shuffled_rows(doc_C, seed=3)
  assert sorted(perm) == list(range(len(doc_C)))  # a permutation: every row's neighbours used once
  assert (doc_C[perm] != doc_C).all()
  assert controls.same_document_fraction(doc_C, perm) == 0
  np.testing.assert_array_equal(perm, controls.shuffled_rows(doc_C, seed=3))  # fixed seed
  assert (perm != controls.shuffled_rows(doc_C, seed=4)).any()
  big = np.repeat(np.arange(3), [12, 3, 1])  # one document dominates: pairs within it, never self
  perm = controls.shuffled_rows(big, seed=0)
  assert sorted(perm) == list(range(len(big))) and (perm != np.arange(len(big))).all()
  assert (big[perm] == big).sum() == 2 * 12 - len(big)


def test_shuffled_control_feeds_another_documents_neighbours(tmp_path_factory):
  db = tiny_db.get(tmp_path_factory)[0]
  store = chunk_store_lib.ChunkStore.open(db)
  held = ev.load_heldout(store, str(db))
  doc_C = controls.doc_of_row(held.doc_first_row, len(held.chunk_ids_C))
  assert len(np.unique(doc_C)) >= 2
  own = ev.mode_neighbours(held, "on")
  shuf = ev.mode_neighbours(held, "shuffled", shuffle_seed=0)
  perm = controls.shuffled_rows(doc_C, 0)
  np.testing.assert_array_equal(shuf, held.neighbours_CxN[perm])
  assert (perm != np.arange(len(perm))).all()
  # Another document wherever possible: here one held-out document holds most chunks, so only
  # the excess of it (2 * its chunks - all chunks) may stay within it.
  other = store.doc_ids(held.chunk_ids_C[perm]) != store.doc_ids(held.chunk_ids_C)
  assert (~other).sum() <= max(0, 2 * np.bincount(doc_C).max() - len(doc_C))
  assert (shuf[:, :2] != own[:, :2]).any(axis=1).mean() > 0.9
  # Into the batch: window chunk u (row c) carries the tokens of row perm[c]'s neighbours.
  lengths = [len(t) for t in held.doc_tokens]
  wins = ev.make_windows(lengths, 256, 192, store.chunk_size)
  b = ev.window_batch(held, wins[:4], 256, 64, 2, store, 128, store.pad_id, True, shuf)
  for i, w in enumerate(wins[:4]):
    for u in range(4):
      c = w.start // 64 + u
      if c * 64 >= lengths[w.doc]:
        continue
      row = held.doc_first_row[w.doc] + c
      ids = held.neighbours_CxN[perm[row], :2]
      want = np.asarray(store.neighbour_tokens(np.maximum(ids, 0), 128))
      want = np.where(ids[:, None] >= 0, want, store.pad_id)
      np.testing.assert_array_equal(b["neighbours"][i, u], want)


def test_exclude_documents_keeps_the_first_allowed_in_order():
  nbr = np.array([[5, 6, 7, 8], [9, -1, 10, 11], [1, 2, 3, 4]])
  docs = np.array([[0, 1, 2, 3], [4, -1, 1, 5], [1, 1, 1, 1]])
  got = exclude_documents(nbr, docs, np.array([1, 4]), 2)
  np.testing.assert_array_equal(got, [[5, 7], [11, -1], [-1, -1]])


def test_training_neighbours_exclude_every_document_of_the_sequence(tmp_path_factory):
  db = tiny_db.get(tmp_path_factory)[0]
  store = chunk_store_lib.ChunkStore.open(db)
  T = 1024  # 16 chunks: sequences span several documents
  src = loader.SequenceSource(db, T, store=store, num_neighbours=1)  # 1 of the 2 stored
  plain = loader.SequenceSource(db, T, store=store, num_neighbours=1, exclude_sequence_docs=False)
  stored_NxS = np.concatenate([np.load(db / "neighbours" / f"shard-{s:05d}.npy") for s in (0, 1)])
  assert stored_NxS.shape == (store.num_chunks, 2)
  hit = 0
  for i in range(len(src)):
    ids = src.sequence_chunk_ids(i)
    seq_docs = np.unique(store.doc_ids(ids))
    all_stored = stored_NxS[ids]
    got = src.sequence_neighbour_ids(i)
    assert got.shape == (len(ids), 1)
    valid = got >= 0
    assert not np.isin(store.doc_ids(got[valid]), seq_docs).any()
    # Each is the best stored neighbour that survives the rule (or none if neither does).
    for u in range(len(ids)):
      ok = [n for n in all_stored[u] if n >= 0 and store.doc_ids([n])[0] not in seq_docs]
      assert got[u, 0] == (ok[0] if ok else -1)
    hit += int((plain.sequence_neighbour_ids(i) != got).sum())
    # What the model gets: the tokens of those ids.
    ex = src[i]
    for u in np.flatnonzero(valid[:, 0]):
      np.testing.assert_array_equal(ex["neighbours"][u, 0, :64], store.tokens([got[u, 0]])[0])
  assert hit > 0  # the rule changed some neighbours here: the check above is not vacuous


def test_paired_bootstrap_interval():
  rng = np.random.default_rng(0)
  doc_C = np.repeat(np.arange(40), 5)
  bytes_C = rng.integers(100, 300, doc_C.size)
  a = rng.random(doc_C.size) * 100
  b = a + 3.0  # b worse everywhere: a - b < 0 and the interval excludes zero
  d = controls.paired_bootstrap(a, b, bytes_C, doc_C)
  assert d["diff"] < 0 and d["ci95"][0] <= d["diff"] <= d["ci95"][1] < 0 and d["excludes_zero"]
  assert d == controls.paired_bootstrap(a, b, bytes_C, doc_C)
  noise = controls.paired_bootstrap(a, a + rng.normal(0, 5, a.size), bytes_C, doc_C)
  assert noise["ci95"][0] < 0 < noise["ci95"][1]
  bins = controls.compare(a, b, bytes_C, doc_C, np.linspace(0, 1, doc_C.size))
  assert set(bins) == {"all"} | {n for n, _, _ in controls.OVERLAP_BINS}
  assert sum(bins[n]["chunks"] for n, _, _ in controls.OVERLAP_BINS) == doc_C.size
  few = controls.paired_bootstrap(a, b, bytes_C, doc_C, doc_C < 3)  # 3 documents
  assert few["docs"] == 3 and controls.format_diff(few).endswith("(3 docs, no interval)")
  assert "[" in controls.format_diff(d)


def test_stride_zero_gives_every_scored_chunk_its_preceding_chunks_neighbours():
  lengths = [1, 63, 64, 65, 300, 1000, 2500]
  assert ev.resolve_stride(256, 0, 64) == 192 and ev.resolve_stride(256, 128, 64) == 128
  assert ev.scored_tokens_without_retrieval(lengths, 256, 192, 64) == 0.0
  assert ev.scored_tokens_without_retrieval(lengths, 256, 128, 64) == 0.0
  # Stride = window: the first chunk of every later window (63 of its 64 targets) goes without.
  missing = ev.scored_tokens_without_retrieval(lengths, 256, 256, 64)
  assert 0.2 < missing < 0.25


def test_same_source_and_same_document_controls():
  keys = ["linux-doc:a.rst.txt", "linux-doc-6.12:a.rst.txt", "linux-doc:b.rst.txt",
          "wiki:X", "wiki:Y", "python-doc:z.txt"]
  sources = [controls.source_of_key(k) for k in keys]
  assert sources == ["linux-doc"] * 3 + ["wiki", "wiki", "python-doc"]
  assert controls.source_of_key("plain/path.txt") == ""
  doc_C = np.repeat(np.arange(6), [8, 6, 3, 2, 2, 7])
  perm, same = controls.same_source_rows(doc_C, sources, seed=1)
  assert (doc_C[perm] != doc_C).all()  # always another document
  src_C = np.asarray(sources)[doc_C]
  # The lone python document (7 chunks) is the only one paired outside its source.
  assert ((src_C[perm] == src_C) == (src_C != "python-doc")).all()
  assert same == np.mean(src_C != "python-doc")
  perm, same = controls.same_source_rows(doc_C[doc_C < 5], sources, seed=1)  # no lone source
  assert sorted(perm) == list(range(np.sum(doc_C < 5))) and same == 1.0
  perm, defined = controls.same_document_rows(doc_C, gap=3)
  assert (doc_C[perm] == doc_C).all()
  assert (defined == np.isin(doc_C, [0, 1, 5])).all()  # documents of >= 6 chunks
  first = np.concatenate([[0], np.cumsum(np.bincount(doc_C))])[doc_C]
  pos, other = np.arange(len(doc_C)) - first, perm - first
  n_C = np.bincount(doc_C)[doc_C]
  dist = np.minimum((pos - other) % n_C, (other - pos) % n_C)
  assert (dist[defined] >= 3).all() and (perm[~defined] == np.flatnonzero(~defined)).all()


def test_ratio_bootstrap_recovers_a_known_fraction():
  rng = np.random.default_rng(0)
  doc_C = np.repeat(np.arange(50), 4)
  bytes_C = np.full(doc_C.size, 200)
  base = 300 + rng.random(doc_C.size) * 50
  scratch = base - 40 - rng.normal(0, 4, doc_C.size)
  half = base - 0.5 * (base - scratch)
  r = controls.ratio_bootstrap(base, half, scratch, bytes_C, doc_C)
  assert abs(r["ratio"] - 0.5) < 1e-9 and r["ci95"][0] <= 0.5 <= r["ci95"][1]
  assert r == controls.ratio_bootstrap(base, half, scratch, bytes_C, doc_C)


def test_given_overlap_is_that_of_the_preceding_chunks_neighbours(tmp_path_factory):
  db = tiny_db.get(tmp_path_factory)[0]
  store = chunk_store_lib.ChunkStore.open(db)
  held = ev.load_heldout(store, str(db))
  got = ev.given_overlap(held, store, 2, 128)
  first = np.zeros(len(got), bool)
  first[held.doc_first_row] = True
  assert (got[first] == 0).all() and ((got >= 0) & (got <= 1)).all()
  # Handing chunk c its own neighbours' ids from row c - 1 by hand gives the same numbers.
  toks = np.asarray(store.tokens(held.chunk_ids_C))
  for c in np.flatnonzero(~first)[:20]:
    ids = held.neighbours_CxN[c - 1, :2]
    nb = np.asarray(store.neighbour_tokens(np.maximum(ids, 0), 128))
    nb = np.where(ids[:, None] >= 0, nb, store.pad_id)
    best = 0
    for k in range(2):
      for i in range(64):
        for j in range(128):
          n = 0
          while i + n < 64 and j + n < 128 and toks[c, i + n] == nb[k, j + n] != store.pad_id:
            n += 1
          best = max(best, n)
    assert got[c] == best / 64
  assert held.doc_keys is not None and len(held.doc_keys) == len(held.doc_tokens)
