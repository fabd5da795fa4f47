"""Evaluation pieces: windows score every target once, the leakage statistic, exact retrieval."""
import os
import sys

import numpy as np
import pytest

from retro_jax.evaluation import bpb as ev

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402


@pytest.mark.parametrize("seq_len,stride", [(128, 64), (128, 128), (256, 64)])
def test_windows_score_every_target_once(seq_len, stride):
  rng = np.random.default_rng(0)
  lengths = [1, 2, 63, 64, 65, 127, 128, 129, 300, 1000] + list(rng.integers(2, 700, 20))
  docs = [rng.integers(1, 50, n).astype(np.int32) for n in lengths]
  first_row = np.cumsum([0] + [(n + 63) // 64 for n in lengths[:-1]])
  nchunks = sum((n + 63) // 64 for n in lengths)
  held = ev.HeldOut(docs, first_row, np.arange(nchunks), np.ones(nchunks, np.int64),
                    -np.ones((nchunks, 10), np.int64), np.zeros(nchunks))
  wins = ev.make_windows(lengths, seq_len, stride, 64)
  counts = [np.zeros(n, int) for n in lengths]
  for w in wins:
    b = ev.window_batch(held, [w], seq_len, 64, 2, None, 128, 0, with_nbrs=False)
    t_abs = w.start + 1 + np.flatnonzero(b["scored"][0])
    counts[w.doc][t_abs] += 1
    # the scored targets are the document's next tokens, with at least seq_len - stride context
    j = np.flatnonzero(b["scored"][0])
    np.testing.assert_array_equal(b["targets"][0, j], docs[w.doc][t_abs])
    if w.start > 0:
      assert j.min() >= seq_len - stride - 1
  for n, c in zip(lengths, counts):
    assert c[0] == 0 and (c[1:] == 1).all(), (n, c)


def naive_lcs(a, b, pad):
  best = 0
  for i in range(len(a)):
    for j in range(len(b)):
      k = 0
      while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k] and a[i + k] != pad:
        k += 1
      best = max(best, k)
  return best


def test_longest_common_substring_matches_naive():
  rng = np.random.default_rng(1)
  chunks = rng.integers(0, 4, (30, 16))
  nbrs = rng.integers(0, 4, (30, 3, 24))
  nbrs[5, 1, 3:19] = chunks[5]  # a verbatim copy
  got = ev.longest_common_substrings(chunks, nbrs, pad_id=0)
  want = [max(naive_lcs(chunks[c], nbrs[c, k], 0) for k in range(3)) for c in range(30)]
  np.testing.assert_array_equal(got, want)
  assert got[5] >= np.flatnonzero(chunks[5] == 0).size and got[5] > 0


def test_exact_neighbours_and_heldout(tmp_path_factory):
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval.retriever import embedding_paths
  db = tiny_db.get(tmp_path_factory)[0]
  store = chunk_store_lib.ChunkStore.open(db)
  held = ev.load_heldout(store, str(db))
  assert held.neighbours_CxN.shape == (len(held.chunk_ids_C), 10)
  # brute force over all stored embeddings, training documents only
  emb = np.concatenate([np.load(p) for p in embedding_paths(str(db))])
  docs = store.doc_ids(np.arange(store.num_chunks))
  ok = ~store.doc_heldout[docs]
  scores = emb[held.chunk_ids_C] @ emb.T
  scores[:, ~ok] = -np.inf
  want = np.argsort(-scores, axis=1, kind="stable")[:, :10]
  got = held.neighbours_CxN
  assert not store.doc_heldout[store.doc_ids(got.reshape(-1))].any()
  np.testing.assert_allclose(np.take_along_axis(scores, got, 1),
                             np.take_along_axis(scores, want, 1), rtol=1e-5)
  assert ((held.leakage_C >= 0) & (held.leakage_C <= 1)).all()
  assert held.chunk_bytes_C.sum() > 0
  # nested database fractions: a smaller database never retrieves closer chunks
  small = ev.load_heldout(store, str(db), db_fraction=0.3)
  s_small = np.take_along_axis(scores, small.neighbours_CxN[:, :1], 1)
  assert (s_small <= np.take_along_axis(scores, got[:, :1], 1) + 1e-6).all()


def test_searched_neighbours_refetch_and_drop_disallowed(tmp_path_factory):
  """The searcher path (Retriever over the index, or the service) keeps only allowed documents
  and fetches again when the first candidates were all disallowed."""
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval.index import IndexConfig
  from retro_jax.retrieval.retriever import Retriever, embedding_paths
  db = tiny_db.get(tmp_path_factory)[0]
  store = chunk_store_lib.ChunkStore.open(db)
  # An exact index, so that every candidate the refetching asks for can come back.
  retriever = Retriever.from_embeddings(embedding_paths(str(db)), config=IndexConfig(backend="exact"),
                                        doc_ids=store.doc_ids)
  queries = np.asarray(store.heldout_doc_ids[:3], np.int64)
  q_ids = np.concatenate([np.arange(*store.doc_range(int(d))) for d in queries])
  # Allow a single training document: most candidates are dropped, refetching must find its chunks.
  allowed = np.zeros(store.num_docs, bool)
  allowed[int(np.flatnonzero(~store.doc_heldout)[5])] = True
  got = ev.searched_neighbours(retriever, store, str(db), q_ids, 3, allowed)
  want = ev.exact_neighbours(store, str(db), q_ids, 3, allowed)
  n_allowed = int(np.isin(store.doc_ids(np.arange(store.num_chunks)), np.flatnonzero(allowed)).sum())
  assert ((got >= 0).sum(1) == min(3, n_allowed)).all()
  assert allowed[store.doc_ids(got[got >= 0])].all()
  np.testing.assert_array_equal(np.sort(got, 1), np.sort(want, 1))


def test_summarise_filter():
  held = ev.HeldOut([], np.zeros(0), np.arange(4), np.array([10, 10, 10, 10]), None,
                    np.array([0.0, 0.1, 0.5, 1.0]))
  loss = np.array([1.0, 2.0, 3.0, 4.0]) * np.log(2)
  r = ev.summarise(loss, held)
  assert r["bpb"] == pytest.approx(10 / 40)
  assert ev.bpb_at(r, 0.125) == pytest.approx(3 / 20)
  assert r["chunks_alpha"]["0.0000"] == 1
