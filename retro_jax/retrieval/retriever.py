"""The retriever: every shard, over-fetch, exact float32 rescoring, global int64 top-k.

Scores from independently trained quantizers are not comparable across shards, so each shard's
candidates are rescored exactly against the stored (memory-mapped) float32 embeddings before the
merge. Chunks of a given document per query are excluded (RETRO's same-document rule); if a shard
runs short of candidates after the exclusion, it is asked again for more. Chunks of documents removed
from the database (`retro_jax.build.edit --remove_docs`, `deleted_ranges`) are never returned, for any
query: they stay in the index files and are dropped (and refilled) the same way.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, npy_rows, verify
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib

DocIdsLike = np.ndarray | Sequence[np.ndarray] | Callable[[np.ndarray], np.ndarray] | None


def _unfinished(path: str) -> bool:
  """The embed stage writes `shard-XXXXX.npy` in place and marks it done in `.progress.json`."""
  progress = layout.progress_path(path)
  if not progress.exists():
    return False
  return not json.loads(progress.read_text()).get("done")


def db_embedding_shards(db_dir: str, select: Callable[[int], bool] | None = None,
                        verify_content: bool = True) -> list[tuple[int, str, int]]:
  """(shard number, embeddings path, first global chunk id) of `DB/embeddings/shard-XXXXX.npy`.

  `select(shard number)` limits the listing (e.g. this host's shards); every selected shard must
  have finished embeddings. `verify_content`: each shard's checksum is checked (once per process,
  one sequential read); off for readers that never read the vectors (the global index searches
  its own codes and int8 copy), so opening it on gs:// does not download every embedding.
  Offsets come from the chunk store's `DB/chunks/manifest.json` (`first_chunk_id`, and the row
  count is checked against `num_chunks`) when it exists, else from the running sum of row counts.
  """
  emb_dir = layout.embeddings_dir(db_dir)
  pattern = f"{emb_dir}/shard-*.npy"
  manifest_path = layout.chunks_dir(db_dir) / layout.MANIFEST
  fix = f"run `python -m retro_jax.build_db --db={db_dir} --stages=embeddings` first"
  if manifest_path.exists():
    store_shards = chunk_store_lib.read_manifest(manifest_path.parent)["shards"]
    out = []
    for s in store_shards:
      i = int(s["index"])
      if select is not None and not select(i):
        continue
      path = str(layout.embeddings_path(db_dir, i))
      if not epath.Path(path).exists() or _unfinished(path):
        raise index_lib.IndexError_(f"Embeddings shard {path} is missing or unfinished; {fix}.")
      rows = index_lib.load_embeddings(path).shape[0]
      if rows != int(s["num_chunks"]):
        raise index_lib.IndexError_(
            f"Embeddings shard {path} has {rows} rows but chunk-store shard {i} has "
            f"{s['num_chunks']} chunks ({manifest_path}); re-embed it.")
      if verify_content:
        verify.embeddings_shard(db_dir, i)  # content checksum, once per process
      out.append((i, path, int(s["first_chunk_id"])))
    return out
  paths = sorted(str(p) for p in emb_dir.glob("shard-*.npy")) if emb_dir.exists() else []
  paths = [p for p in paths if not p.endswith(".tmp.npy")]
  if not paths:
    raise index_lib.IndexError_(f"No embedding shards found at {pattern}; {fix}.")
  for p in paths:
    if _unfinished(p):
      raise index_lib.IndexError_(f"Embeddings shard {p} is unfinished; {fix}.")
  numbers = [layout.shard_number(p) for p in paths]
  return [t for t in zip(numbers, paths, index_lib.shard_offsets(paths))
          if select is None or select(t[0])]


def db_embedding_rows(db_dir: str, ids_N: np.ndarray) -> np.ndarray:
  """float32 [N, D]: the database's stored embeddings of these global chunk ids (memory-mapped
  or ranged reads of the rows asked for, retro_jax.db.npy_rows; never whole shards)."""
  embs = [(npy_rows.open_rows(p), off) for _, p, off in db_embedding_shards(db_dir)]
  ids_N = np.asarray(ids_N, np.int64)
  out = np.empty((len(ids_N), embs[0][0].shape[1]), np.float32)
  offs = np.array([o for _, o in embs], np.int64)
  which = np.searchsorted(offs, ids_N, side="right") - 1
  for j in np.unique(which):
    m = which == j
    out[m] = embs[j][0][ids_N[m] - offs[j]]
  return out


def embedding_paths(db_dir: str) -> list[str]:
  """The embedding shards of a database: `DB/embeddings/shard-XXXXX.npy`, in shard order."""
  return [p for _, p, _ in db_embedding_shards(db_dir)]


def db_deleted_ranges(db_dir: str) -> np.ndarray:
  """int64 [R, 2] chunk-id ranges of the documents removed from `db_dir` (empty when none)."""
  manifest = layout.chunks_dir(db_dir) / layout.MANIFEST
  if not (layout.chunks_dir(db_dir) / layout.DELETIONS).exists():
    if not manifest.exists():
      return np.zeros((0, 2), np.int64)  # embeddings and index only: no chunk store, no edits
    if not json.loads(manifest.read_text()).get("edits", {}).get("deletions", {}).get("num_docs"):
      return np.zeros((0, 2), np.int64)  # never edited (a lost deletions file is an error below)
  return chunk_store_lib.ChunkStore.open(db_dir).deleted_chunk_ranges()


def db_global_sources(db_dir: str) -> list[global_lib.Source]:
  """The embeddings shards as the global index reads them: (shard, float32 memmap, first id)."""
  return [(i, index_lib.load_embeddings(p), off) for i, p, off in db_embedding_shards(db_dir)]


def db_backend(db_dir: str, backend: str | None = None) -> str:
  """`backend`, or the one the database was built with: the global index if DB/index/ holds it,
  else DEFAULT_BACKEND if it is there, else the only backend there."""
  if backend:
    return backend
  root = epath.Path(db_dir) / layout.INDEX_DIR
  built = sorted(b for b in index_lib.ALL_BACKENDS if (root / b).is_dir())
  for preferred in (global_lib.BACKEND, index_lib.DEFAULT_BACKEND):
    if preferred in built:
      return preferred
  if len(built) == 1:
    return built[0]
  if not built:
    raise index_lib.IndexError_(f"No index under {root}; run `python -m "
                                f"retro_jax.build_db --db={db_dir} --stages=index`.")
  raise index_lib.IndexError_(f"{root} holds indexes {built}; pick one with backend=.")


# Candidates per shard for k results when they are rescored or filtered: k * OVERFETCH.
OVERFETCH = 4


class Retriever:
  """`search(queries_QxD, k, exclude_doc_ids_Q) -> (ids_QxK int64, scores_QxK float32)`.

  Args:
    shards: index shards with disjoint `[offset, offset + count)` ranges.
    doc_ids: how to find the document of a global chunk id, for exclusion: an int64 array over all
      global ids (e.g. `np.load('doc_ids.npy', mmap_mode='r')`), a list of per-shard arrays aligned
      with the shards, or a function `global_ids -> doc_ids`. Use `doc_starts` for boundaries.
    doc_starts: alternatively, sorted int64 first-chunk id of every document.
    overfetch: each shard returns `k * overfetch` candidates before the exact rescoring.
    rescore: True always rescores candidates against the memory-mapped float32 embeddings; "auto"
      skips it for shards whose scores are already exact float32 dot products (exact backend,
      ScaNN's float32 reorder); False never rescores.
    deleted_ranges: int64 [R, 2] `[start, end)` global chunk-id ranges of removed documents
      (`ChunkStore.deleted_chunk_ranges()`; `from_db` reads them); `set_deleted_ranges` updates them.
  """

  def __init__(self, shards: Sequence[index_lib.IndexShard], doc_ids: DocIdsLike = None,
               doc_starts: np.ndarray | None = None, overfetch: int = OVERFETCH,
               query_block: int = 512, rescore: bool | str = "auto",
               deleted_ranges: np.ndarray | None = None):
    self.shards = sorted(shards, key=lambda s: s.offset)
    ranged = [s for s in self.shards if s.contiguous_ids]
    for a, b in zip(ranged, ranged[1:]):
      if a.offset + a.count > b.offset:
        raise ValueError(f"Index shards overlap: [{a.offset}, {a.offset + a.count}) and "
                         f"[{b.offset}, {b.offset + b.count}).")
    dims = {s.dim for s in self.shards}
    if len(dims) != 1:
      raise ValueError(f"Index shards have different embedding sizes {sorted(dims)}.")
    self.dim = dims.pop()
    self.overfetch = overfetch
    self.query_block = query_block
    if rescore not in (True, False, "auto"):
      raise ValueError(f"rescore={rescore!r}; expected True, False or 'auto'.")
    self.rescore = rescore
    self._doc_of = self._make_doc_lookup(doc_ids, doc_starts)
    self.set_deleted_ranges(deleted_ranges)

  def set_deleted_ranges(self, ranges_Rx2: np.ndarray | None) -> None:
    """Never return chunks in these `[start, end)` global id ranges (removed documents)."""
    r = np.zeros((0, 2), np.int64) if ranges_Rx2 is None else np.asarray(ranges_Rx2, np.int64)
    self.deleted_ranges = r.reshape(-1, 2)[np.argsort(r.reshape(-1, 2)[:, 0], kind="stable")]

  def _deleted(self, ids: np.ndarray) -> np.ndarray:
    r = self.deleted_ranges
    j = np.searchsorted(r[:, 0], ids, side="right") - 1
    return (ids >= 0) & (j >= 0) & (ids < r[np.maximum(j, 0), 1])

  @property
  def size(self) -> int:
    return sum(s.count for s in self.shards)

  def _make_doc_lookup(self, doc_ids, doc_starts):
    if doc_starts is not None:
      starts = np.asarray(doc_starts, np.int64)
      return lambda g: np.searchsorted(starts, g, side="right").astype(np.int64) - 1
    if doc_ids is None:
      return None
    if callable(doc_ids):
      return doc_ids
    if isinstance(doc_ids, np.ndarray):
      return lambda g: np.asarray(doc_ids[g], np.int64)
    per_shard = list(doc_ids)
    if len(per_shard) != len(self.shards):
      raise ValueError(f"{len(per_shard)} doc-id arrays for {len(self.shards)} index shards.")
    for s, d in zip(self.shards, per_shard):
      if d.shape[0] != s.count:
        raise ValueError(f"Doc-id array of length {d.shape[0]} for a shard of {s.count} chunks.")
    offsets = np.array([s.offset for s in self.shards], np.int64)

    def lookup(g):
      out = np.empty(g.shape, np.int64)
      which = np.searchsorted(offsets, g, side="right") - 1
      for j in np.unique(which):
        m = which == j
        out[m] = per_shard[j][g[m] - offsets[j]]
      return out
    return lookup

  def _rescore(self, shard, queries_QxD, local_QxN, scores_QxN):
    """Exact dot products of each query with its candidates (-inf where the id is -1)."""
    if self._skips_rescore(shard):
      return np.where(local_QxN >= 0, scores_QxN, -np.inf).astype(np.float32)
    valid = local_QxN >= 0
    uniq = np.unique(local_QxN[valid])
    rows_UxD = np.asarray(shard.embeddings_NxD[uniq], np.float32)  # sorted gather from the memmap
    pos_QxN = np.searchsorted(uniq, np.where(valid, local_QxN, uniq[0] if uniq.size else 0))
    scores = np.full(local_QxN.shape, -np.inf, np.float32)
    if uniq.size:
      for s in range(0, local_QxN.shape[0], self.query_block):
        sl = slice(s, s + self.query_block)
        vec_QxNxD = rows_UxD[pos_QxN[sl]]
        scores[sl] = np.einsum("qd,qnd->qn", queries_QxD[sl], vec_QxNxD)
    return np.where(valid, scores, -np.inf).astype(np.float32)

  def _skips_rescore(self, shard) -> bool:
    return self.rescore is False or (self.rescore == "auto" and shard.exact_scores)

  def _shard_candidates(self, shard, queries_QxD, k, n, exclude_Q):
    """(global ids, exact scores) of up to n candidates per query, excluded documents removed."""
    local, approx = shard.search(queries_QxD, n)
    scores = self._rescore(shard, queries_QxD, local, approx)
    ids = np.where(local >= 0, local + shard.offset, -1).astype(np.int64)
    if exclude_Q is None and not len(self.deleted_ranges):
      return ids, scores
    ids, scores = self._exclude(ids, scores, exclude_Q)
    want = k
    short = np.flatnonzero(np.sum(ids >= 0, axis=1) < min(want, shard.count))
    # A serving shard of the global index that the query's route does not reach has nothing to
    # refill with: the query visits only its nearest partitions, wherever they are.
    if short.size:
      short = short[shard.reached(queries_QxD[short], n)]
    fetch = n
    while short.size and fetch < shard.count:  # Own document crowded out the candidates: ask more.
      fetch = min(fetch * 4, shard.count)
      l2, a2 = shard.search(queries_QxD[short], fetch)
      s2 = self._rescore(shard, queries_QxD[short], l2, a2)
      g2 = np.where(l2 >= 0, l2 + shard.offset, -1).astype(np.int64)
      g2, s2 = self._exclude(g2, s2, None if exclude_Q is None else exclude_Q[short])
      g2, s2 = index_lib.top_k_rows(g2, s2, n)
      ids[short], scores[short] = g2, s2
      short = short[np.sum(g2 >= 0, axis=1) < min(want, shard.count)]
    return ids, scores

  def _exclude(self, ids, scores, exclude_Q):
    if len(self.deleted_ranges):
      gone = self._deleted(ids)
      ids, scores = np.where(gone, -1, ids), np.where(gone, -np.inf, scores).astype(np.float32)
    if exclude_Q is None:
      return ids, scores
    if self._doc_of is None:
      raise ValueError("exclude_doc_ids_Q given but the Retriever has no doc_ids/doc_starts.")
    valid = ids >= 0
    docs = np.full(ids.shape, -1, np.int64)
    docs[valid] = self._doc_of(ids[valid])
    drop = valid & (docs == np.asarray(exclude_Q, np.int64)[:, None])
    return np.where(drop, -1, ids), np.where(drop, -np.inf, scores).astype(np.float32)

  def search(self, queries_QxD: np.ndarray, k: int,
             exclude_doc_ids_Q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k by exact dot product; ids int64 (-1 pads), scores float32 (-inf pads)."""
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    if queries_QxD.ndim != 2 or queries_QxD.shape[1] != self.dim:
      raise ValueError(f"queries have shape {queries_QxD.shape}; expected [Q, {self.dim}].")
    if exclude_doc_ids_Q is not None:
      exclude_doc_ids_Q = np.asarray(exclude_doc_ids_Q, np.int64)
      if exclude_doc_ids_Q.shape != (queries_QxD.shape[0],):
        raise ValueError(f"exclude_doc_ids_Q has shape {exclude_doc_ids_Q.shape}; expected "
                         f"({queries_QxD.shape[0]},).")
    all_ids, all_scores = [], []
    for shard in self.shards:
      # Exact scores and nothing to exclude: the shard's own top-k is all the merge needs.
      # (A removed chunk among them is dropped and its row refilled by _shard_candidates.)
      exact = self._skips_rescore(shard) and exclude_doc_ids_Q is None
      n = k if exact else k * self.overfetch
      ids, scores = self._shard_candidates(shard, queries_QxD, k, n, exclude_doc_ids_Q)
      all_ids.append(ids)
      all_scores.append(scores)
    ids, scores = index_lib.top_k_rows(np.concatenate(all_ids, 1), np.concatenate(all_scores, 1), k)
    return ids, scores

  # --------------------------------------------------------------------------------------------
  # Constructors.

  @classmethod
  def from_embeddings(cls, paths: Sequence[str], offsets: Sequence[int] | None = None,
                      config: index_lib.IndexConfig | None = None, **kwargs) -> "Retriever":
    """Builds in-memory shards (no serialisation) over explicit embedding files and offsets."""
    config = config or index_lib.IndexConfig()
    offsets = list(offsets) if offsets is not None else index_lib.shard_offsets(paths)
    shards = [index_lib.build_shard(p, o, config) for p, o in zip(paths, offsets)]
    return cls(shards, **kwargs)

  @classmethod
  def load(cls, shard_dirs: Sequence[str], embedding_paths_: Sequence[str] | None = None,
           verify: bool = True, config_overrides: dict | None = None, **kwargs) -> "Retriever":
    """Loads serialised shards (checksums verified); embeddings default to the manifests' paths."""
    embs = list(embedding_paths_) if embedding_paths_ is not None else [None] * len(shard_dirs)
    shards = [index_lib.load_shard(d, e, verify=verify, config_overrides=config_overrides)
              for d, e in zip(shard_dirs, embs)]
    return cls(shards, **kwargs)

  @classmethod
  def from_db(cls, db_dir: str, backend: str | None = None, **kwargs) -> "Retriever":
    """Loads `DB/index/<backend>/shard-XXXXX` for every `DB/embeddings/shard-XXXXX.npy` (backend
    None: the one built, see `db_backend`); removed documents (`DB/chunks/deletions.json`) are
    excluded unless `deleted_ranges` is passed."""
    backend = db_backend(db_dir, backend)
    if "deleted_ranges" not in kwargs:
      kwargs["deleted_ranges"] = db_deleted_ranges(db_dir)
    if backend == global_lib.BACKEND:  # its own files and the store's totals: no shard list
      return cls.from_global_index(db_dir, **kwargs)
    shards = db_embedding_shards(db_dir)
    out = str(layout.index_dir(db_dir, backend))
    r = cls.load([str(layout.index_shard_dir(out, i)) for i, _, _ in shards], [p for _, p, _ in shards], **kwargs)
    for s, (i, _, offset) in zip(r.shards, shards):
      if s.offset != offset:
        raise index_lib.IndexError_(
            f"Index shard {layout.index_shard_dir(out, i)} was built for offset {s.offset} but the database "
            f"puts shard {i} at {offset}; rebuild it (build_db --stages=index).")
    return r

  @classmethod
  def from_global_index(cls, db_dir: str, shards: Sequence[tuple[int, str, int]] | None = None,
                        serving: Sequence[int] | None = None, verify: bool = True,
                        config_overrides: dict | None = None, **kwargs) -> "Retriever":
    """The database's one global index (`DB/index/global`, retro_jax.retrieval.global_index):
    one searcher per serving shard, each over its partitions (a query visits its nearest
    partitions in any of them); `serving` limits it to those serving shards (what one service
    process answers for). The index must cover the database: its vector and source counts are
    checked against `shards` (default: the chunk store's manifest totals, one small read)."""
    root = global_lib.index_dir(db_dir)
    index = global_lib.GlobalIndex(root, serving=serving, verify_files=verify,
                                   nprobe=(config_overrides or {}).get("nprobe"))
    if shards is None:
      store = chunk_store_lib.ChunkStore.open(db_dir)
      want = global_lib.signature(store.num_chunks, store.num_shards)
    else:
      want = global_lib.signature(sum(index_lib.load_embeddings(p).shape[0] for _, p, _ in shards),
                                  len(shards))
    built = global_lib.signature(index.manifest["count"], index.manifest["num_sources"])
    if built != want:
      raise index_lib.IndexError_(
          f"The global index {root} covers {built['count']} vectors of {built['num_sources']} "
          f"embeddings shards but the database has {want['count']} of {want['num_sources']}; "
          "rebuild it (build_db --stages=index) or, after `edit_db --add`, rerun the edit to "
          "encode the new shard.")
    return cls([index.restricted([s]) for s in index.serving_ids], **kwargs)
