r"""Training neighbours: the k nearest database chunks from other documents, per chunk, per shard.

    python -m retro_jax.build_db --db=DIR --stages=neighbours --num_neighbours=2

For every chunk of the chunk store (shard by shard, same shard numbers and row order as the chunk
store and `DB/embeddings/`), the query is the chunk's own stored embedding and the answer is the
`k` nearest chunks by exact (rescored) dot product among chunks that are
  * not of the query chunk's own document (RETRO's same-document rule: the retriever's
    `exclude_doc_ids_Q`), and
  * not of a held-out document (so that no evaluation text leaks into training through retrieval).
Results are int64 global chunk ids in `DB/neighbours/shard-XXXXX.npy`, shape [n_chunks_in_shard, k],
-1 where fewer than k candidates exist. The finished shard's `.progress.json` records its sha256
and the sha256 of each 128 KiB block of rows (`block_sha256`, `checksum_block_rows` rows each), so a
reader verifies only the blocks its rows lie in (`NeighbourShards.rows`).

Which chunks get neighbours: every chunk, held-out documents included. The training sequences
(`retro_jax.training.input_pipeline`) are consecutive runs of seq_len/64 chunks of the non-held-out documents,
so whatever seq_len a run picks, each of its chunks has its row here; the held-out rows serve the
evaluation loader with retrieval on (their candidates likewise come from training documents only).

Restartable: work goes in fixed blocks of `block_rows` rows; `shard-XXXXX.progress.json` records the
finished rows, a killed run resumes at the next block, finished shards are skipped, and the output is
byte-identical to an uninterrupted run (a block's result depends only on its rows).
Distributed: over the global index the Beam build (retro_jax/build/pipeline.py) runs a routed batch
job: query blocks routed to their nearest partitions, searched per serving shard (a worker loads
one serving shard), combined per block with `keep_round` (the rounds of `search_block`), written as
block parts and assembled with `shard_record` / `write_finished`: the same bytes as `compute_shard`.
For the per-shard backends it computes one shard per element (`neighbours_shard`), each worker
loading the whole index once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import tqdm
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, npy_rows, verify
from retro_jax.db.layout import progress_path, write_json_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import retriever as retriever_lib

FORMAT_VERSION = 1


class NeighboursError(UserError, ValueError):
  """A neighbours file that is missing, unfinished, or made with other settings."""


def heldout_chunk_ranges(store) -> np.ndarray:
  """int64 [H, 2] `[start, end)` chunk-id ranges of the held-out documents, sorted by start."""
  docs = store.heldout_doc_ids
  ranges = np.array([store.doc_range(int(d)) for d in docs], np.int64).reshape(-1, 2)
  return ranges[np.argsort(ranges[:, 0], kind="stable")]


# ------------------------------------------------------------------------------------------------
# Search.


def _compact(ids_QxF: np.ndarray, keep_QxF: np.ndarray, k: int) -> np.ndarray:
  """The first k kept ids of each row, in their (best-first) order, -1 padded."""
  order = np.argsort(~keep_QxF, axis=1, kind="stable")
  ids = np.take_along_axis(np.where(keep_QxF, ids_QxF, -1), order, axis=1)[:, :k]
  if ids.shape[1] < k:
    ids = np.concatenate([ids, np.full((ids.shape[0], k - ids.shape[1]), -1, np.int64)], axis=1)
  return ids.astype(np.int64)


def first_fetch(k: int, total: int, excluded: bool) -> int:
  """Candidates asked of the retriever in a block's first round: k when only the own document is
  excluded (the retriever refills those itself), else 4k (doubling each round, up to `total`)."""
  return min(4 * k, total) if excluded else k


def next_fetch(fetch: int, total: int) -> int:
  return min(2 * fetch, total)


def keep_round(ids_RxF: np.ndarray, store, k: int, fetch: int, total: int,
               excluded_docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One round of a block's search: from the retriever's best `fetch` candidates of each row
  (own document already excluded), the first k not of `excluded_docs` (-1 padded), and bool [R]:
  the rows still short of k whose candidates were not exhausted (asked again with next_fetch)."""
  ids_RxF = np.asarray(ids_RxF, np.int64)
  if excluded_docs.size == 0:
    return ids_RxF, np.zeros(len(ids_RxF), bool)
  valid = ids_RxF >= 0
  docs = np.full(ids_RxF.shape, -1, np.int64)
  docs[valid] = store.doc_ids(ids_RxF[valid])
  keep = valid & ~np.isin(docs, excluded_docs)
  short = (keep.sum(1) < k) & (valid.sum(1) == ids_RxF.shape[1]) & (fetch < total)
  return _compact(ids_RxF, keep, k), short


def search_block(retriever, store, queries_QxD: np.ndarray, query_ids_Q: np.ndarray, k: int,
                 excluded_docs: np.ndarray) -> np.ndarray:
  """int64 [Q, k]: nearest chunks not of the query's own document nor of `excluded_docs` (the
  held-out documents here; evaluation adds those outside its database fraction). `retriever` is
  anything with `Retriever.search` and `size` (the in-process Retriever or the gRPC service).
  Rows short of k after the filter are searched again with twice the candidates (the routed
  Beam job, retro_jax/build/pipeline.py, runs the same rounds through `keep_round`)."""
  own_docs_Q = np.asarray(store.doc_ids(query_ids_Q), np.int64)
  total = min(retriever.size, getattr(retriever, "max_k", retriever.size))  # service: bounded k
  fetch = first_fetch(k, total, excluded_docs.size > 0)
  rows = np.arange(len(query_ids_Q))
  out_QxK = np.full((len(query_ids_Q), k), -1, np.int64)
  while rows.size:
    ids, _ = retriever.search(queries_QxD[rows], fetch, own_docs_Q[rows])
    out_QxK[rows], short = keep_round(ids, store, k, fetch, total, excluded_docs)
    rows, fetch = rows[short], next_fetch(fetch, total)
  return out_QxK


def compute_shard(retriever, store, embeddings_NxD: np.ndarray, first_id: int,
                  out_path: str | os.PathLike, k: int, heldout_docs: np.ndarray,
                  block_rows: int = 4096, settings: dict[str, Any] | None = None,
                  desc: str | None = None) -> dict:
  """Writes one neighbours shard (resumable, block by block). Returns stats."""
  out_path = epath.Path(out_path)
  prog_path = progress_path(out_path)
  num_rows = int(embeddings_NxD.shape[0])
  want = shard_record(num_rows, first_id, k, block_rows, settings)
  state = {"rows_done": 0, "done": False}
  if prog_path.exists() and layout.rows_output_exists(out_path):
    state = json.loads(prog_path.read_text())
    made = {key: state.get(key) for key in want}
    if made != want:
      raise NeighboursError(
          f"{prog_path}: made with {made}, now asked for {want}; delete {out_path} and its "
          "progress file to recompute it (or rerun with the old settings).")
  if state.get("done"):
    return {"rows": 0, "seconds": 0.0, "skipped": True}
  resume = state["rows_done"] > 0
  out = layout.NpyRowsWriter(out_path, (num_rows, k), np.int64, resume=resume)
  if resume and out.found != ((num_rows, k), np.int64):
    raise NeighboursError(f"{out_path}: shape {out.found[0]} {out.found[1]}, expected ({num_rows}, "
                          f"{k}) int64; delete it and its progress file.")
  state = {**want, "rows_done": state["rows_done"], "done": False}
  t0, computed = time.perf_counter(), 0
  with tqdm.tqdm(total=num_rows, initial=state["rows_done"], unit="chunk",
                 desc=desc or f"neighbours {out_path.name}", smoothing=0.1) as bar:
    for start in range(state["rows_done"], num_rows, block_rows):
      end = min(start + block_rows, num_rows)
      q_QxD = np.asarray(embeddings_NxD[start:end], np.float32)
      ids_Q = np.arange(first_id + start, first_id + end, dtype=np.int64)
      out.write(start, search_block(retriever, store, q_QxD, ids_Q, k, heldout_docs))
      state["rows_done"] = end
      write_json_atomic(prog_path, state)
      computed += end - start
      bar.update(end - start)
  out.finish(block_rows)
  write_finished(out_path, want)
  return {"rows": computed, "seconds": time.perf_counter() - t0, "skipped": False}


def shard_record(num_rows: int, first_id: int, k: int, block_rows: int,
                 settings: dict[str, Any] | None) -> dict[str, Any]:
  """What a neighbours shard was made with (its progress record, less the progress)."""
  return {"format_version": FORMAT_VERSION, "num_rows": int(num_rows), "first_id": int(first_id),
          "k": int(k), "block_rows": int(block_rows), **(settings or {})}


def write_finished(out_path, want: dict[str, Any]) -> None:
  """The finished shard's progress record, with the .npy's sha256 and its block checksums (a read
  checks the blocks it touches: `NeighbourShards.rows`), from one read of the file."""
  state = {**want, "rows_done": want["num_rows"], "done": True}
  write_json_atomic(progress_path(out_path), verify.record_blocks(out_path, state))


def search_settings(store, backend: str, index_size: int) -> dict[str, Any]:
  """The settings a neighbours shard records: backend, exclusions, index size."""
  return {"backend": backend, "excludes": "own_document+heldout_documents",
          "num_heldout_docs": int(store.heldout_doc_ids.size), "index_size": int(index_size)}


def shard_is_done(db_dir: str | os.PathLike, shard: int) -> bool:
  return layout.is_finished(layout.neighbours_path(db_dir, shard))


def load_retriever(db_dir: str | os.PathLike, store, backend: str | None = None):
  """(retriever over the database's index, backend name) for the neighbours search."""
  if backend is None:  # the one the database was built with
    backend = retriever_lib.db_backend(str(db_dir))
  index_root = layout.index_dir(db_dir, backend)
  if not index_root.exists():
    raise NeighboursError(f"No {backend} index at {index_root}; run python -m "
                          f"retro_jax.build_db --db={db_dir} --backend={backend} --stages=index.")
  return retriever_lib.Retriever.from_db(str(db_dir), backend, doc_ids=store.doc_ids), backend


def neighbours_shard(db_dir: str | os.PathLike, shard: int, retriever, store, backend: str,
                     k: int = 2, block_rows: int = 4096) -> dict:
  """Computes neighbours shard `shard` of `db_dir` (resumable; skipped when finished)."""
  _, first_id, _ = store.shard_spans()[shard]
  settings = search_settings(store, backend, retriever.size)
  return compute_shard(retriever, store, shard_embeddings(db_dir, store, shard), first_id,
                       layout.neighbours_path(db_dir, shard), k, store.heldout_doc_ids,
                       block_rows=block_rows, settings=settings, desc=f"neighbours shard {shard}")


def shard_embeddings(db_dir, store, shard: int):
  """The queries of store shard `shard`: its stored embeddings (checked to match the store)."""
  count = store.shard_spans()[shard][2]
  emb = embed_lib.load_embeddings(db_dir, shard)
  if emb.shape[0] != count:
    raise NeighboursError(f"Embeddings shard {shard} of {db_dir} has {emb.shape[0]} rows but the "
                          f"chunk store shard has {count}; re-embed it.")
  return emb


def compute_neighbours(db_dir: str | os.PathLike, k: int = 2, backend: str | None = None,
                       block_rows: int = 4096, retriever=None, store=None) -> dict:
  """Computes every neighbour shard of `db_dir` (finished ones are skipped). Returns stats."""

  if k < 1:
    raise ValueError(f"--num_neighbours={k} must be >= 1.")
  db_dir = epath.Path(db_dir)
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  mine = store.shard_spans()
  totals = {"rows": 0, "seconds": 0.0, "shards": [], "skipped": []}
  todo = [s for s in mine if not shard_is_done(db_dir, s[0])]
  totals["skipped"] = [s[0] for s in mine if shard_is_done(db_dir, s[0])]
  if not todo:
    return totals
  if retriever is None:
    retriever, backend = load_retriever(db_dir, store, backend)
  for shard, _, _ in todo:
    stats = neighbours_shard(db_dir, shard, retriever, store, backend, k, block_rows)
    totals["rows"] += stats["rows"]
    totals["seconds"] += stats["seconds"]
    totals["shards"].append(shard)
  return totals


class NeighbourShards:
  """The neighbours shards for row reads, each opened (memory-mapped, or ranged reads on gs://) when
  it is first read, its shape checked, nothing hashed, so opening the database costs the same few
  reads at any size. `rows(j, rows)` reads rows of shard j, verifying the checksummed blocks they
  lie in (each once per process) and their ids; `[j]` is shard j's whole int64 [count, k] array,
  every block verified. Shards written before block checksums are verified whole on first read."""

  def __init__(self, db_dir: str | os.PathLike, store):
    self.db_dir, self.store = db_dir, store
    self._open: dict[int, tuple] = {}
    self._whole: set[int] = set()
    self.k = int(self._shard(0)[0].shape[1])

  def __len__(self) -> int:
    return self.store.num_shards

  def _shard(self, j: int) -> tuple:
    """(array, progress record, verify.file_key, store shard) of neighbours shard j."""
    if j not in self._open:
      shard, _, count = self.store.shard_span(j)  # its offsets rows, not every shard's
      path = layout.neighbours_path(self.db_dir, shard)
      rec = layout.finished_record(path)
      if rec is None:
        raise NeighboursError(f"{path} is missing or unfinished; run python -m "
                              f"retro_jax.build.neighbours --db={self.db_dir}.")
      a = npy_rows.open_rows(path)
      if a.shape[0] != count or a.dtype != np.int64:
        raise NeighboursError(f"{path}: shape {a.shape} {a.dtype}; expected ({count}, k) int64 "
                              "for the chunk store; delete it and recompute.")
      if j and a.shape[1] != self.k:
        raise NeighboursError(f"Neighbour shards of {self.db_dir} have different k: "
                              f"{sorted({self.k, int(a.shape[1])})}.")
      self._open[j] = (a, rec, verify.file_key(path), shard)
    return self._open[j]

  def _index(self, j) -> int:
    return int(j) + (len(self) if int(j) < 0 else 0)  # [-1]: the last shard

  def rows(self, j: int, rows) -> np.ndarray:
    """int64 [len(rows), k]: rows `rows` of shard j, the blocks they lie in verified."""
    a, rec, key, shard = self._shard(self._index(j))
    return verify.neighbours_rows(self.db_dir, shard, a, rows, self.store.num_chunks, rec, key)

  def __getitem__(self, j: int) -> np.ndarray:
    j = self._index(j)
    a, rec, key, shard = self._shard(j)
    if j not in self._whole:
      verify.neighbours_shard(self.db_dir, shard, a, self.store.num_chunks, rec, key)
      self._whole.add(j)
    return a

  def __iter__(self):
    return (self[j] for j in range(len(self)))


def add_block_checksums(db_dir: str | os.PathLike, store=None) -> list[int]:
  """The upgrade of a database whose neighbours shards were written before block checksums
  (`build_db --stages=finalize`): each finished shard's progress record gains them, computed in
  one read of the file after its whole sha256 is checked against the recorded one; the `.npy`
  files are not changed. Returns the shards upgraded."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  done = []
  for shard, _, _ in store.shard_spans():
    path = layout.neighbours_path(db_dir, shard)
    rec = layout.finished_record(path)
    if rec is None or "block_sha256" in rec:
      continue
    new = verify.record_blocks(path, rec)
    if rec.get("sha256") and new["sha256"] != rec["sha256"]:
      raise verify.DamagedDataError(
          f"{path} is damaged: sha256 {new['sha256'][:12]} differs from the {rec['sha256'][:12]} "
          f"recorded when it was written; {verify.neighbours_fix(db_dir)}")
    write_json_atomic(progress_path(path), new)
    done.append(shard)
  return done


def without_block_checksums(db_dir: str | os.PathLike, store=None) -> bool:
  """Whether a finished neighbours shard's progress record has no block checksums (a database
  written before them: `add_block_checksums` upgrades it)."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  for shard, _, _ in store.shard_spans():
    rec = layout.finished_record(layout.neighbours_path(db_dir, shard))
    if rec is not None and "block_sha256" not in rec:
      return True
  return False


def open_neighbours(db_dir: str | os.PathLike, store=None) -> tuple[NeighbourShards, np.ndarray]:
  """The neighbours shards (`NeighbourShards`: each opened on first read, shard 0 now; verified as
  it is read) and the int64 first-chunk id of each shard."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  shards = NeighbourShards(db_dir, store)
  return shards, np.asarray([first for _, first, _ in store.shard_spans()], np.int64)


def repair_after_deletion(db_dir: str | os.PathLike, retriever, store=None,
                          block_rows: int = 4096) -> dict:
  """After documents were removed (`retro_jax.build.edit`): every finished neighbours row that points
  at a removed chunk is recomputed with `retriever` (which must exclude the removed documents, as
  `Retriever.from_db` does), the rows of the removed chunks themselves become -1, and each changed
  shard file is replaced atomically (a copy is edited, then renamed). Rows that point at no
  removed chunk are left as they are. Idempotent. Returns {"rows_recomputed", "rows_cleared",
  "shards"}."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  deleted = store.deleted_chunk_ranges()
  heldout = store.heldout_doc_ids
  totals = {"rows_recomputed": 0, "rows_cleared": 0, "shards": []}
  if not len(deleted):
    return totals
  for shard, first_id, count in store.shard_spans():
    path = layout.neighbours_path(db_dir, shard)
    if not shard_is_done(db_dir, shard):
      continue  # Computed later by compute_neighbours, whose retriever excludes the removed docs.
    nbr_NxK = npy_rows.open_rows(path)
    stale, own = [], []
    for start in range(0, count, block_rows):
      block = np.asarray(nbr_NxK[start:start + block_rows])
      rows = np.arange(start, start + len(block), dtype=np.int64)
      gone_row = chunk_store_lib.in_ranges(first_id + rows, deleted)
      points = chunk_store_lib.in_ranges(block, deleted).any(axis=1)
      stale.append(rows[points & ~gone_row])
      own.append(rows[gone_row & (block >= 0).any(axis=1)])
    stale, own = np.concatenate(stale), np.concatenate(own)
    if not stale.size and not own.size:
      continue
    with layout.staged_file(path) as tmp:  # a copy edited, then put in place (gs:// too)
      layout.copy_file(path, tmp)
      out = np.load(tmp, mmap_mode="r+")
      emb = embed_lib.load_embeddings(db_dir, shard)
      for start in tqdm.tqdm(range(0, stale.size, block_rows), desc=f"repair neighbours {shard}",
                             disable=stale.size < block_rows):
        rows = stale[start:start + block_rows]
        out[rows] = search_block(retriever, store, np.asarray(emb[rows], np.float32),
                                 first_id + rows, out.shape[1], heldout)
      out[own] = -1
      out.flush()
      del out
    prog = progress_path(path)
    state = json.loads(prog.read_text())
    state.setdefault("repairs", []).append(
        {"rows_recomputed": int(stale.size), "rows_cleared": int(own.size),
         "deleted_docs": int(store.deleted_doc_ids().size)})
    write_json_atomic(prog, verify.record_blocks(path, state))
    totals["rows_recomputed"] += int(stale.size)
    totals["rows_cleared"] += int(own.size)
    totals["shards"].append(shard)
  return totals
