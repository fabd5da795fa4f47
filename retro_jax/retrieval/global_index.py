"""One global index over the whole database: one partitioner, one quantizer, serving shards.

faiss IVF-PQ fast-scan (4-bit PQ codes; the ANN benchmark in docs/benchmarks.md measures it against
ScaNN) with one coarse quantizer (`nlist` partitions) and one product quantizer, both trained on a
deterministic sample of the database's embeddings. Every vector is encoded once, streaming shard
by shard (a block of rows at a time; the database is never in RAM), into the partition its
nearest centroid names. Partitions are grouped into `S` serving shards (contiguous partition
ranges); a query is routed to its `nprobe` nearest partitions, in whichever serving shards hold
them, scanned there, and the best candidates of each serving shard are reranked against a compact
int8 copy of its own vectors kept on disk (memory-mapped), then merged. A serving host holds its
serving shards' files and nothing else.

In RAM per vector: the PQ code (`pq_m / 2` bytes; 48 at the default `pq_m=96`), its int64 id
(8 bytes) and the fast-scan block padding (each partition is stored in blocks of 32 codes): 61.9
bytes at the default store's 60k vectors, less as partitions grow; no float32 copy (a serving
shard whose ids are not 0..n-1 also searches its sorted ids: memory-mapped, or on gs:// held in
RAM, 8 more). On disk per vector: the same,
plus the int8 rerank copy (D bytes: 384 for MiniLM) and its id (8). `GlobalIndex.memory_bytes()`
reports the measured figure.

Layout (`DB/index/global/`, written through `retro_jax.db.layout`: atomic writes, manifest last):

    manifest.json                 totals, config, the trained files' sha256, one fingerprint of
                                  every serving shard's record (its size does not grow with N)
    trained.faiss                 the trained, empty index (coarse centroids + PQ codebooks)
    scale.npy                     float32 [D]: value = int8 * scale (per-dimension abs max / 127)
    serving/shard-S.faiss         serving shard S: the partitions [part_start, part_end)
    serving/shard-S.lists.npy     int64 [nlist + 1]: where each inverted list starts in its faiss
                                  file (entry nlist: the file's size), so that opening it reads
                                  no count per partition (retro_jax.retrieval.serving_lists)
    serving/shard-S.rerank.npy    int8 [n_S, D]: its vectors' copies, in id order
    serving/shard-S.ids.npy       int64 [n_S]: their ids, ascending
    serving/shard-S.json          its record: partitions, count, RAM bytes, sha256 of its files
                                  (the lists file's too; it is derived from the faiss file, so the
                                  manifest's content fingerprint leaves it out)

Built in steps, each recorded when finished: train (one), encode (one per group of
ENCODE_GROUP_SOURCES embeddings shards: its vectors' (partition, id, PQ code, int8 copy) as one
part file per serving shard, `parts/`), merge (one per serving shard: its parts read whole in
group order, the codes packed into fast-scan blocks (the bytes faiss's `add_with_ids` gives
shard by shard), the int8 copies and ids streamed to disk; its record last), finish (the
manifest; `parts/` removed). `build` runs them in turn in one process; the Beam build
(retro_jax/build/pipeline.py) runs them as transforms, encode and merge in parallel.

Ids are int64 global chunk ids. To the `Retriever` (which adds the same-document exclusion,
removed-document masking and the merge) each serving shard is one searcher, `GlobalIndex.restricted
([s])`, over ids anywhere in `[0, N)`; its scores are the int8 rerank dot products (within ~1e-3 of
the float32 ones), so the retriever skips its own float32 rescoring. One gRPC shard process serves
one serving shard the same way, so the service's merged answer is the in-process one.

Opening a local serving shard reads its faiss file's header and its lists file's header, not its
inverted lists: each list is read the first time a query probes it (its two offsets, then the
list: retro_jax.retrieval.serving_lists; faiss's own memory-mapped read does not map fast-scan
lists). The trained file (quantizer and codebooks: ~sqrt(N)) is memory-mapped, its two ends read:
opening reads the same bytes at any N; loading it touches a count per list and, with an HNSW
quantizer, its links (faiss checks them on load), its centroids paged in as routing uses them.
A serving shard of an index built before lists files (no "lists" in its
record) is opened by walking its faiss file's counts instead (8 bytes a partition), until
`build_db --stages=finalize` writes them (`write_lists_files`: one walk per serving shard). Their
sha256 is checked by `verify` (the audit), their sizes at open.

On gs:// the same layout is read and written through retro_jax.db.layout: faiss files as bytes
(serialize / deserialize, no local file; a serving shard's read whole at open), each rerank copy
and ids file written locally and uploaded when complete (`layout.staged_file`), and read back by
rows (retro_jax.db.npy_rows: ranged reads, nothing staged locally).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np
import scann
from etils import epath
from faiss.contrib import clustering as faiss_clustering

from retro_jax.db import layout, npy_rows
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import serving_lists

BACKEND = index_lib.GLOBAL_BACKEND
FORMAT_VERSION = 2  # 1: one rerank copy per embeddings shard, every file in the manifest
TRAINED = "trained.faiss"
SCALE = "scale.npy"
BLOCK_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class GlobalIndexConfig:
  """How the global index is trained and searched. None fields are derived from the size N."""
  nlist: int | None = None          # partitions; default ~ 2 * sqrt(N), >= 39 points each
  pq_m: int = 96                    # 4-bit PQ sub-quantizers: pq_m / 2 bytes per code
  nprobe: int = 48                  # partitions scanned per query
  rerank: int = 96                  # per serving shard, max(n, rerank) PQ candidates reranked
  serving_shards: int | None = None  # default: ceil(N / vectors_per_serving_shard)
  # 2^24 vectors (~1 GB of codes and ids): a host serves several; at 28e9 vectors, 1,669 serving
  # shards, so the merge and the neighbours search have at least that many keys.
  vectors_per_serving_shard: int = 1 << 24
  train_sample: int = 131_072       # deterministic sample for k-means and PQ training, raised
                                    # to min_points_per_centroid * nlist where that is more
  min_points_per_centroid: int = 39  # faiss's floor below which k-means is undertrained
  hnsw_quantizer_min_nlist: int = 2048  # from here on, an HNSW graph over the centroids routes
  two_level_min_nlist: int = 1024   # from here on, k-means in two levels (sqrt(nlist) first)
  # From a training sample of this many vectors (1.6 GB of float32) on, the partitioner trains
  # as many elements (`train_hierarchical`: coarse cells, each cell's share of the nlist
  # centroids trained apart) instead of one k-means over the whole sample in one process.
  parallel_train_min_sample: int = 1 << 20
  coarse_points_per_cell: int = 128  # that training's coarse k-means: sub-sample per coarse cell
  pq_train_sample: int = 65_536     # and its PQ codebooks' sub-sample
  kmeans_iters: int = 12
  seed: int = 0
  training_threads: int = 1         # 1 keeps the build repeatable on a busy machine
  # Within a serving shard: "faiss" scans its partitions' fast-scan codes; "scann" also builds a
  # ScaNN searcher over the serving shard (its own tree of ~2 sqrt(n) leaves, AH codes) and
  # searches that instead. Routing to serving shards and the int8 rerank are the same.
  searcher: str = "faiss"
  scann_leaves_to_search: float = 0.05  # fraction of a serving shard's ScaNN leaves searched

  def resolved(self, n: int) -> "GlobalIndexConfig":
    nlist = self.nlist or max(1, min(int(round(2 * math.sqrt(n))), n // 39 or 1))
    shards = self.serving_shards or max(1, math.ceil(n / self.vectors_per_serving_shard))
    sample = max(self.train_sample, self.min_points_per_centroid * nlist)
    if self.searcher not in SEARCHERS:
      raise index_lib.IndexError_(f"searcher={self.searcher!r}; expected one of {SEARCHERS}.")
    return dataclasses.replace(self, nlist=nlist, serving_shards=min(shards, nlist),
                               train_sample=sample)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for k, v in _OPTIONAL_DEFAULTS.items():  # recorded only when set: older records still match
      if out[k] == v:
        del out[k]
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "GlobalIndexConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


SEARCHERS = ("faiss", "scann")
_OPTIONAL_DEFAULTS = {"searcher": "faiss", "scann_leaves_to_search": 0.05,
                      "parallel_train_min_sample": 1 << 20, "coarse_points_per_cell": 128,
                      "pq_train_sample": 65_536}


# ----------------------------------------------------------------------------------------------
# Sources: (embeddings shard number, float32 [n, D] array-like (np.memmap or anything indexable
# by slices and sorted int arrays), first global id).

Source = tuple[int, Any, int]


def sample_picks(total: int, size: int, seed: int) -> np.ndarray:
  """int64 [min(size, total)]: the sorted global row numbers of the training sample (fixed
  seed; without replacement). O(size) memory, whatever `total`."""
  size = min(int(size), int(total))
  if size >= total:
    return np.arange(total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(int(total), size=size, replace=False))


def read_rows(sources: Sequence[Source], first: int, picks: np.ndarray) -> np.ndarray:
  """float32 [len(picks), D]: the rows of these sorted global row numbers, from consecutive
  `sources` whose first row is global row `first`, read shard by shard."""
  out = np.empty((len(picks), sources[0][1].shape[1]), np.float32)
  start, filled = int(first), 0
  for _, emb, _ in sources:
    n = int(emb.shape[0])
    mine = picks[(picks >= start) & (picks < start + n)] - start
    for b in range(0, mine.size, BLOCK_ROWS):
      rows = mine[b:b + BLOCK_ROWS]
      out[filled:filled + rows.size] = np.asarray(emb[rows], np.float32)
      filled += rows.size
    start += n
  return out


def sample_rows(sources: Sequence[Source], size: int, seed: int) -> np.ndarray:
  """float32 [min(size, N), D]: rows drawn without replacement (fixed seed), read shard by shard
  (the Beam build reads the same rows in parallel, per encode group: retro_jax/build/pipeline.py)."""
  total = sum(int(s[1].shape[0]) for s in sources)
  return read_rows(sources, 0, sample_picks(total, size, seed))


def _threads(n: int):
  class _Ctx:
    def __enter__(self):
      self.old = faiss.omp_get_max_threads()
      faiss.omp_set_num_threads(n)

    def __exit__(self, *a):
      faiss.omp_set_num_threads(self.old)
  return _Ctx()


def _factory(dim: int, c: GlobalIndexConfig) -> str:
  q = "_HNSW32" if c.nlist >= c.hnsw_quantizer_min_nlist else ""
  return f"IVF{c.nlist}{q},PQ{c.pq_m}x4fs"


def train(sources: Sequence[Source], config: GlobalIndexConfig):
  """(trained empty faiss index, per-dimension int8 scale [D], resolved config)."""
  n = sum(int(s[1].shape[0]) for s in sources)
  c = config.resolved(n)
  return (*train_sources(sources, c), c)


def train_sources(sources: Sequence[Source], c: GlobalIndexConfig):
  """(trained empty faiss index, int8 scale [D]) from the sources' training sample: in one
  k-means (`train_on`), or in the parallel training's steps (`train_hierarchical`) from
  parallel_train_min_sample vectors on."""
  offsets = np.concatenate([[0], np.cumsum([int(e.shape[0]) for _, e, _ in sources])])
  picks = sample_picks(int(offsets[-1]), max(c.train_sample, 0), c.seed)
  sample = read_rows(sources, 0, picks)
  if not trains_in_parallel(c, int(offsets[-1])):
    return train_on(sample, c)
  slices = [(a, b) for _, a, b in sample_groups(picks, offsets, len(sources))]
  return train_hierarchical(sample, c, slices)


# 4-bit PQ: k-means of 16 centroids per sub-quantizer needs at least 16 training points.
PQ_CENTROIDS = 16


def train_on(sample: np.ndarray, c: GlobalIndexConfig):
  """(trained empty faiss index, per-dimension int8 scale [D]) from the training sample.

  A database of fewer vectors than the PQ has centroids (a one-chunk database) trains on its
  sample repeated: the codes are then poor, but every vector is a rerank candidate
  (n <= `rerank`), so the search is exact on the int8 copy all the same."""
  dim = sample.shape[1]
  if 0 < sample.shape[0] < PQ_CENTROIDS:
    sample = np.resize(sample, (PQ_CENTROIDS * c.min_points_per_centroid, dim))  # repeated rows
  index = faiss.index_factory(dim, _factory(dim, c), faiss.METRIC_INNER_PRODUCT)
  ivf = faiss.extract_index_ivf(index)
  ivf.cp.niter = c.kmeans_iters
  ivf.cp.seed = c.seed
  ivf.cp.max_points_per_centroid = max(256, sample.shape[0] // max(c.nlist, 1) + 1)
  with _threads(c.training_threads):
    if c.nlist >= c.two_level_min_nlist:  # ~2 sqrt(nlist) distances per point, not nlist
      cent, _ = faiss_clustering.two_level_clustering(
          sample, int(round(math.sqrt(c.nlist))), c.nlist, clustering_niter=c.kmeans_iters,
          seed=c.seed)
      ivf.quantizer.add(np.ascontiguousarray(cent, np.float32))
    index.train(sample)  # the PQ (the coarse quantizer is kept when already filled)
  scale = (np.abs(sample).max(axis=0) / 127.0).astype(np.float32)
  scale = np.maximum(scale, 1e-8)
  return index, scale


# ----------------------------------------------------------------------------------------------
# The partitioner trained as many elements, from a training sample of parallel_train_min_sample
# vectors on (~1e9 vectors and up; below, `train_on`'s one k-means in one process). The sample is
# read per encode group (a sample group: the picks among that group's rows, `sample_groups`);
#   1. coarse (one element): ~2 sqrt(nlist) centroids (`coarse_cells`) trained on a sub-sample of
#      coarse_points_per_cell rows per cell, at fixed positions of the sample (`coarse_positions`);
#   2. assign (one element per sample group): its rows to their nearest coarse centroid;
#   3. cells (one element per coarse cell): the cell's rows, in sample order, train its share of
#      the nlist centroids, in proportion to its rows (`cell_centroids`: >= min_points_per_centroid
#      rows per centroid wherever the sample has that many per partition);
#   4. finish (one element): the cells' centroids in cell order are the coarse quantizer; the PQ
#      trains on pq_train_sample rows of the coarse sub-sample; the int8 scale is the whole
#      sample's per-dimension abs max (combined from the groups').
# `train_hierarchical` runs these steps in one process on the same group slices, so the plain
# build and the Beam build (retro_jax/build/pipeline.py) write the same bytes.


def trains_in_parallel(c: GlobalIndexConfig, n: int) -> bool:
  """True when a resolved config's training sample over n vectors takes the parallel path."""
  return min(int(n), c.train_sample) >= max(c.parallel_train_min_sample, PQ_CENTROIDS)


def coarse_cells(c: GlobalIndexConfig) -> int:
  """Coarse cells of the parallel training: ~2 sqrt(nlist) (1,157 at 2.8e10 vectors), each
  training ~sqrt(nlist) / 2 of the nlist centroids."""
  return max(1, min(int(c.nlist), int(round(2 * math.sqrt(c.nlist)))))


def _positions(total: int, size: int, seed: Sequence[int]) -> np.ndarray:
  """int64: sorted positions in [0, total), min(size, total) of them without replacement."""
  size = min(int(size), int(total))
  if size >= total:
    return np.arange(total, dtype=np.int64)
  return np.sort(np.random.default_rng(list(seed)).choice(int(total), size=size, replace=False))


def coarse_positions(sample_size: int, c: GlobalIndexConfig) -> np.ndarray:
  """The coarse k-means' rows: sorted positions in the training sample."""
  return _positions(sample_size, coarse_cells(c) * c.coarse_points_per_cell, (c.seed, 1))


def pq_positions(coarse_size: int, c: GlobalIndexConfig) -> np.ndarray:
  """The PQ's training rows: sorted positions in the coarse sub-sample."""
  return _positions(coarse_size, c.pq_train_sample, (c.seed, 2))


def sample_groups(picks: np.ndarray, offsets: np.ndarray, num_sources: int
                  ) -> list[tuple[int, int, int]]:
  """(encode group, a, b) for each group with rows in the sample: picks[a:b] are its rows
  (`offsets`: the sources' first global rows, and the total last)."""
  out = []
  for g in range(num_groups(num_sources)):
    mine = group_sources(g, num_sources)
    a, b = np.searchsorted(picks, [offsets[mine[0]], offsets[mine[-1] + 1]])
    if b > a:
      out.append((g, int(a), int(b)))
  return out


def _kmeans(x_NxD: np.ndarray, k: int, c: GlobalIndexConfig, seed: int,
            max_points: int = 256) -> np.ndarray:
  """float32 [k, D]: spherical k-means (as the IVF's own inner-product training)."""
  km = faiss.Kmeans(x_NxD.shape[1], int(k), niter=c.kmeans_iters, seed=int(seed), spherical=True,
                    max_points_per_centroid=int(max_points))
  with _threads(c.training_threads):
    km.train(np.ascontiguousarray(x_NxD, np.float32))
  return np.asarray(km.centroids, np.float32)


def train_coarse(x_NxD: np.ndarray, c: GlobalIndexConfig) -> np.ndarray:
  """float32 [coarse_cells, D]: the coarse centroids, from the coarse sub-sample."""
  return _kmeans(x_NxD, min(coarse_cells(c), len(x_NxD)), c, c.seed,
                 max(c.coarse_points_per_cell, 1))


def assign_coarse(coarse_CxD: np.ndarray, x_NxD: np.ndarray, threads: int = 1) -> np.ndarray:
  """int64 [N]: each row's nearest coarse centroid (L2, as the k-means assigns)."""
  q = faiss.IndexFlatL2(coarse_CxD.shape[1])
  q.add(np.ascontiguousarray(coarse_CxD, np.float32))
  with _threads(threads):
    _, cells = q.search(np.ascontiguousarray(x_NxD, np.float32), 1)
  return cells[:, 0].astype(np.int64)


def split_by_cell(cells_N: np.ndarray, x_NxD: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
  """(cell, its rows in their order) for every cell these rows fall in, ascending."""
  order = np.argsort(cells_N, kind="stable")
  names, starts = np.unique(cells_N[order], return_index=True)
  ends = np.append(starts[1:], len(order))
  for cell, a, b in zip(names, starts, ends):
    yield int(cell), x_NxD[order[a:b]]


def cell_centroids(sizes_C: np.ndarray, nlist: int) -> np.ndarray:
  """int64 [C]: each coarse cell's share of the nlist centroids, in proportion to its sample
  rows (cumulative rounding: they sum to nlist); never more than its rows."""
  cum = np.cumsum(np.asarray(sizes_C, np.int64))
  if not len(cum) or cum[-1] < nlist:
    raise index_lib.IndexError_(f"{int(cum[-1]) if len(cum) else 0} training vectors for nlist="
                                f"{nlist} partitions; the sample must hold at least one each.")
  alloc = cum * int(nlist) // cum[-1]
  alloc[1:] -= alloc[:-1].copy()
  return alloc


def train_cell(cell: int, x_NxD: np.ndarray, k: int, c: GlobalIndexConfig) -> np.ndarray:
  """float32 [k, D]: coarse cell `cell`'s fine centroids from its sample rows."""
  if k <= 0:
    return np.zeros((0, x_NxD.shape[1]), np.float32)
  if k >= len(x_NxD):  # as many centroids as rows: the rows
    return np.ascontiguousarray(x_NxD[:k], np.float32)
  return _kmeans(x_NxD, k, c, c.seed + 1 + int(cell))


def finish_training(fine_KxD: np.ndarray, pq_rows_NxD: np.ndarray, abs_max_D: np.ndarray,
                    c: GlobalIndexConfig):
  """(trained empty faiss index, int8 scale [D]): the nlist fine centroids as the coarse
  quantizer (its HNSW graph built over them from hnsw_quantizer_min_nlist on), the PQ trained on
  its sub-sample."""
  if len(fine_KxD) != c.nlist:
    raise index_lib.IndexError_(f"{len(fine_KxD)} trained centroids for nlist={c.nlist}.")
  dim = fine_KxD.shape[1]
  index = faiss.index_factory(dim, _factory(dim, c), faiss.METRIC_INNER_PRODUCT)
  with _threads(c.training_threads):
    faiss.extract_index_ivf(index).quantizer.add(np.ascontiguousarray(fine_KxD, np.float32))
    index.train(np.ascontiguousarray(pq_rows_NxD, np.float32))  # the PQ only
  return index, np.maximum(np.asarray(abs_max_D, np.float32) / 127.0, 1e-8).astype(np.float32)


def train_hierarchical(sample: np.ndarray, c: GlobalIndexConfig,
                       slices: Sequence[tuple[int, int]]):
  """(trained empty faiss index, int8 scale [D]): the parallel training's steps in this process,
  the sample assigned in the sample groups' `slices` (positions [a, b), in order)."""
  coarse_rows = sample[coarse_positions(len(sample), c)]
  coarse = train_coarse(coarse_rows, c)
  per_cell: dict[int, list[np.ndarray]] = {}
  for a, b in slices:
    rows = sample[a:b]
    for cell, x in split_by_cell(assign_coarse(coarse, rows, c.training_threads), rows):
      per_cell.setdefault(cell, []).append(x)
  sizes = np.zeros(len(coarse), np.int64)
  for cell, xs in per_cell.items():
    sizes[cell] = sum(len(x) for x in xs)
  alloc = cell_centroids(sizes, c.nlist)
  fine = [train_cell(cell, np.concatenate(per_cell[cell]), int(alloc[cell]), c)
          for cell in sorted(per_cell)]
  return finish_training(np.concatenate(fine), coarse_rows[pq_positions(len(coarse_rows), c)],
                         np.abs(sample).max(axis=0), c)


def to_int8(x_NxD: np.ndarray, scale_D: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x_NxD / scale_D), -127, 127).astype(np.int8)


def _partition_shard(nlist: int, shards: int) -> np.ndarray:
  """int32 [nlist]: the serving shard of each partition (contiguous, equal partition ranges)."""
  return (np.arange(nlist, dtype=np.int64) * shards // nlist).astype(np.int32)


def _set_quantizer_search(index, nprobe: int) -> None:
  q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
  if isinstance(q, faiss.IndexHNSW):
    q.hnsw.efSearch = max(64, 2 * nprobe)


# ----------------------------------------------------------------------------------------------
# Encoding: every vector to (partition, id, PQ code, int8 copy), grouped by serving shard.
#
# Encoded = (partitions int64 [n], ids int64 [n], codes uint8 [n, code_size], int8 copies
# [n, D]): a source's vectors of one serving shard, in source row order (ids ascending). A serving
# shard's faiss file is the trained index with each partition's entries appended in source order
# (then row order) and packed into fast-scan blocks, zero-padded: the bytes faiss's own
# `add_with_ids`, source by source, writes. Its rerank copy holds its vectors' int8 copies in id
# order, beside their ids.

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _ivf(index):
  return faiss.downcast_index(faiss.extract_index_ivf(index))


def _assign(ivf, x_NxD: np.ndarray) -> np.ndarray:
  _, parts = ivf.quantizer.search(x_NxD, 1)  # faiss's IndexIVF.add_with_ids assigns the same way
  return parts[:, 0].astype(np.int64)


def _codes(ivf, x_NxD: np.ndarray, parts_N: np.ndarray) -> np.ndarray:
  out = np.empty((len(x_NxD), ivf.code_size), np.uint8)
  if len(x_NxD):
    ivf.encode_vectors(len(x_NxD), faiss.swig_ptr(x_NxD), faiss.swig_ptr(parts_N),
                       faiss.swig_ptr(out), False)
  return out


def encode_block(ivf, part_shard: np.ndarray, x_NxD: np.ndarray, ids_N: np.ndarray,
                 scale_D: np.ndarray) -> dict[int, Encoded]:
  """One block of vectors, encoded, by serving shard. With several serving shards each shard's
  vectors are assigned again on their own (what adding them to that shard's faiss index does)."""
  parts = _assign(ivf, x_NxD)
  if len(part_shard) and part_shard[-1] == 0:  # one serving shard
    return {0: (parts, ids_N, _codes(ivf, x_NxD, parts), to_int8(x_NxD, scale_D))}
  owner = part_shard[parts]
  out = {}
  for s in np.unique(owner):
    m = owner == s
    xs = np.ascontiguousarray(x_NxD[m])
    ps = _assign(ivf, xs)
    out[int(s)] = (ps, ids_N[m], _codes(ivf, xs, ps), to_int8(xs, scale_D))
  return out


def _concat(parts: Sequence[Encoded], code_size: int, dim: int) -> Encoded:
  if not parts:
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, code_size), np.uint8),
            np.zeros((0, dim), np.int8))
  return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))


def encode_source(trained, part_shard: np.ndarray, emb, offset: int, scale_D: np.ndarray,
                  threads: int = 1) -> dict[int, Encoded]:
  """Encodes one embeddings shard, a block of rows at a time. Returns its vectors by serving
  shard (every serving shard, empty ones too)."""
  ivf = _ivf(trained)
  n, dim = int(emb.shape[0]), int(emb.shape[1])
  blocks: dict[int, list[Encoded]] = {}
  with _threads(threads):
    for a in range(0, n, BLOCK_ROWS):
      x = np.ascontiguousarray(emb[a:a + BLOCK_ROWS], np.float32)
      ids = np.arange(offset + a, offset + a + len(x), dtype=np.int64)
      for s, enc in encode_block(ivf, part_shard, x, ids, scale_D).items():
        blocks.setdefault(s, []).append(enc)
  shards = int(part_shard[-1]) + 1 if len(part_shard) else 1
  return {s: _concat(blocks.get(s, []), ivf.code_size, dim) for s in range(shards)}


def _list_entries(ivf, part: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n], flat codes [n, code_size]) of one partition of a built index."""
  il, n = ivf.invlists, ivf.invlists.list_size(part)
  if not n:
    return np.zeros(0, np.int64), np.zeros((0, ivf.code_size), np.uint8)
  ids = faiss.rev_swig_ptr(il.get_ids(part), n).copy()
  packer, bbs = ivf.get_CodePacker(), ivf.bbs
  nb = -(-n // bbs)
  block_bytes = packer.block_size
  packed = faiss.rev_swig_ptr(il.get_codes(part), nb * block_bytes)
  flat = np.empty((nb * bbs, ivf.code_size), np.uint8)
  for b in range(nb):
    blk = np.ascontiguousarray(packed[b * block_bytes:(b + 1) * block_bytes])
    packer.unpack_all(faiss.swig_ptr(blk), faiss.swig_ptr(flat[b * bbs:(b + 1) * bbs]))
  return ids.astype(np.int64), flat[:n]


def _set_list(ivf, part: int, ids_N: np.ndarray, codes_NxC: np.ndarray) -> None:
  """Replaces one partition's entries: codes packed into zero-padded fast-scan blocks."""
  il, n = ivf.invlists, len(ids_N)
  ivf.ntotal -= il.list_size(part)
  il.resize(part, 0)
  if not n:
    return
  packer, bbs = ivf.get_CodePacker(), ivf.bbs
  nb = -(-n // bbs)
  flat = np.zeros((nb * bbs, ivf.code_size), np.uint8)
  flat[:n] = codes_NxC
  blocks = np.zeros(nb * packer.block_size, np.uint8)
  for b in range(nb):
    packer.pack_all(faiss.swig_ptr(flat[b * bbs:(b + 1) * bbs]),
                    faiss.swig_ptr(blocks[b * packer.block_size:(b + 1) * packer.block_size]))
  ids = np.ascontiguousarray(ids_N, np.int64)
  il.add_entries(part, n, faiss.swig_ptr(ids), faiss.swig_ptr(blocks))  # empty list: a copy
  ivf.ntotal += n


def append_encoded(index, parts: Sequence[Encoded]) -> None:
  """Appends encoded vectors (in order) to `index`'s partitions, after the entries there."""
  ivf = _ivf(index)
  if not parts:
    return
  lists, ids, codes = (np.concatenate([p[j] for p in parts]) for j in range(3))
  order = np.argsort(lists, kind="stable")
  lists, ids, codes = lists[order], ids[order], codes[order]
  bounds = np.searchsorted(lists, np.arange(ivf.nlist + 1))
  for p in np.flatnonzero(np.diff(bounds)):
    a, b = bounds[p], bounds[p + 1]
    old_ids, old_codes = _list_entries(ivf, int(p))
    _set_list(ivf, int(p), np.concatenate([old_ids, ids[a:b]]),
              np.concatenate([old_codes, codes[a:b]]))
  if ivf is not index:
    index.ntotal = ivf.ntotal


def memory_bytes(index) -> int:
  """Bytes the inverted lists hold in RAM: codes (fast-scan blocks of `bbs`) and int64 ids."""
  ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
  sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
  bbs = getattr(ivf, "bbs", 1)
  if bbs > 1:  # fast-scan: blocks of bbs codes, M2 / 2 bytes each
    code_bytes = int(np.sum(-(-sizes // bbs) * bbs)) * ivf.M2 // 2
  else:
    code_bytes = int(sizes.sum()) * ivf.code_size
  return code_bytes + int(sizes.sum()) * 8


def _write_index(index, path: epath.Path) -> None:
  layout.write_bytes_atomic(path, faiss.serialize_index(index).tobytes())


def _read_index(path: epath.Path):
  return faiss.deserialize_index(np.frombuffer(epath.Path(path).read_bytes(), np.uint8))


# ----------------------------------------------------------------------------------------------
# The build, as steps (the plain `build` runs them in turn; retro_jax/build/pipeline.py runs each
# step's elements as Beam transforms): prepare; train (one); encode (one per group of
# ENCODE_GROUP_SOURCES sources); merge (one per serving shard); finish (one: the manifest, last).
# Each step's output is written atomically with a record naming it finished, so a killed build
# redoes only unfinished elements; `finish` writes the manifest and removes `parts/`.
#
# An encode group writes one part per serving shard (`parts/group-G.serving-S.npz`), so a serving
# shard's merge reads one file per group, each whole and in group order (a few reads in flight):
# at 2.8e10 vectors, 21,400 groups of ~1,300 vectors per serving shard, not a read per partition.

PARTS = "parts"
TRAINED_RECORD = "trained.json"
ENCODE_GROUP_SOURCES = 16  # sources per encode element: ~1.3M vectors, ~0.6 GB encoded in RAM
MERGE_READS_IN_FLIGHT = 8
MERGE_READ_AHEAD_BYTES = 256 << 20
FINISH_READS_IN_FLIGHT = 32  # the finish step's record reads


def signature(count: int, num_sources: int) -> dict[str, int]:
  """What a build's records are checked against: the vector and source counts (read from the
  chunk store's manifest by the Beam build's launcher; the sources' contents are the stage's
  provenance record's business)."""
  return {"count": int(count), "num_sources": int(num_sources)}


def _signature(sources: Sequence[Source]) -> dict[str, int]:
  return signature(sum(int(e.shape[0]) for _, e, _ in sources), len(sources))


def num_groups(num_sources: int) -> int:
  return -(-int(num_sources) // ENCODE_GROUP_SOURCES)


def group_sources(g: int, num_sources: int) -> range:
  """The source (embeddings shard) numbers of encode group g."""
  return range(g * ENCODE_GROUP_SOURCES, min((g + 1) * ENCODE_GROUP_SOURCES, int(num_sources)))


def _part_path(out_dir: epath.Path, g: int, s: int) -> epath.Path:
  """parts/group-G.serving-S.npz: `partitions` [L] and `starts` [L + 1] (each partition's rows),
  `ids` [n] and `codes` [n, code_size] (sorted by partition, source order within), `rerank` int8
  [n, D] and `rerank_ids` [n] (id order)."""
  return out_dir / PARTS / f"group-{g:05d}.serving-{s:05d}.npz"


def _encoded_record(out_dir: epath.Path, g: int) -> epath.Path:
  return out_dir / PARTS / f"group-{g:05d}.encoded.json"


def _merge_seconds(out_dir: epath.Path, s: int) -> epath.Path:
  return out_dir / PARTS / f"serving-{s:05d}.seconds.json"


def serving_path(out_dir, s: int, what: str) -> epath.Path:
  """serving/shard-S.{faiss, lists.npy, rerank.npy, ids.npy, json, scann/} of serving shard s;
  `what` may name a file of the ScaNN searcher's directory (scann/NAME)."""
  if what.startswith("scann/"):
    return serving_path(out_dir, s, "scann") / what.split("/", 1)[1]
  ext = {"faiss": "faiss", "lists": "lists.npy", "rerank": "rerank.npy", "ids": "ids.npy",
         "record": "json", "scann": "scann"}[what]
  return epath.Path(out_dir) / "serving" / f"{layout.shard_name(s)}.{ext}"


def _scann_leaves(n: int, fraction: float) -> tuple[int, int]:
  """(leaves, leaves searched) of a serving shard's ScaNN tree over n vectors."""
  leaves = max(1, int(round(2 * math.sqrt(n))))
  return leaves, max(1, round(fraction * leaves))


def _build_scann(out_dir: epath.Path, s: int, c: GlobalIndexConfig, scale_D: np.ndarray
                 ) -> dict[str, dict]:
  """serving/shard-S.scann/: a ScaNN searcher (spherical tree of ~2 sqrt(n) leaves, AH codes, no
  reorder: the int8 rerank follows) over the serving shard's int8 copies scaled back to float32,
  row r = its r-th vector in id order. Returns its files' records."""
  rows = npy_rows.open_rows(serving_path(out_dir, s, "rerank"))
  n = int(rows.shape[0])
  x = np.empty((n, rows.shape[1]), np.float32)
  for a in range(0, n, BLOCK_ROWS):
    x[a:a + BLOCK_ROWS] = np.asarray(rows[a:a + BLOCK_ROWS], np.float32) * scale_D
  b = scann.scann_ops_pybind.builder(x, 10, "dot_product").set_n_training_threads(
      c.training_threads)
  leaves, searched = _scann_leaves(n, c.scann_leaves_to_search)
  if leaves > 1 and n > leaves:
    b = b.tree(num_leaves=leaves, num_leaves_to_search=searched,
               training_sample_size=min(n, 100_000), spherical=True, random_init=False)
  searcher = b.score_ah(2, anisotropic_quantization_threshold=0.2).build()
  del x
  with layout.staged_dir(serving_path(out_dir, s, "scann")) as tmp:
    searcher.serialize(tmp, relative_path=True)
    return {f"scann/{name}": _file_record(os.path.join(tmp, name))
            for name in sorted(os.listdir(tmp))}


SERVING_FILES = ("faiss", "rerank", "ids")
# A serving shard's files derived from another of its files (the lists file: the faiss file's
# offsets): recorded with their sha256, but not part of the index's content fingerprint, so that
# writing them into an older index (`write_lists_files`) leaves its manifest, and what was
# built from it (the neighbours' provenance), as they were.
DERIVED_FILES = ("lists",)


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None


def prepare_build(sources: Sequence[Source], out_dir, config: GlobalIndexConfig | None = None
                  ) -> GlobalIndexConfig:
  """Before the steps: removes any manifest (an unfinished build is never taken for a finished
  one) and the records of a build of other sources or settings. Returns the resolved config."""
  return prepare_build_for(_signature(sources), out_dir, config)


def prepare_build_for(sig: dict[str, int], out_dir, config: GlobalIndexConfig | None = None
                      ) -> GlobalIndexConfig:
  """`prepare_build` from the sources' `signature` alone (a few small reads)."""
  out_dir = epath.Path(out_dir)
  man_path = out_dir / layout.MANIFEST
  if man_path.exists():
    man_path.unlink()
  c = (config or GlobalIndexConfig()).resolved(sig["count"])
  rec = _read_json(out_dir / PARTS / TRAINED_RECORD)
  if rec is not None and (rec.get("config") != c.to_json() or rec.get("sources") != sig
                          or rec.get("format_version") != FORMAT_VERSION):
    (out_dir / PARTS).rmtree()
  if rec is None or not (out_dir / PARTS).exists():  # serving files of another build: stale
    for old in ("serving", "rerank"):
      if (out_dir / old).exists():
        (out_dir / old).rmtree()
  for sub in ("serving", PARTS):
    (out_dir / sub).mkdir(parents=True, exist_ok=True)
  return c


def is_trained(out_dir) -> bool:
  return _read_json(epath.Path(out_dir) / PARTS / TRAINED_RECORD) is not None


def sample_part_path(out_dir, g: int) -> epath.Path:
  """parts/sample-G.npy: encode group g's rows of the training sample (the Beam build)."""
  return epath.Path(out_dir) / PARTS / f"sample-{g:05d}.npy"


def _training_key(c: GlobalIndexConfig) -> str:
  """Names the parallel training's parts by its settings: a build killed before its train
  record and started again with other settings does not take them."""
  return layout.sha256_bytes(json.dumps(c.to_json(), sort_keys=True).encode())[:12]


def coarse_part_path(out_dir, c: GlobalIndexConfig) -> epath.Path:
  """parts/coarse-KEY.npz: the parallel training's coarse centroids, PQ rows and abs max."""
  return epath.Path(out_dir) / PARTS / f"coarse-{_training_key(c)}.npz"


def cell_part_path(out_dir, c: GlobalIndexConfig, cell: int) -> epath.Path:
  """parts/cell-KEY-C.npz: coarse cell C's fine centroids (the parallel training)."""
  return epath.Path(out_dir) / PARTS / f"cell-{_training_key(c)}-{cell:05d}.npz"


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
  _write_npz(epath.Path(path), arrays)


def read_npz(path) -> dict[str, np.ndarray]:
  return _read_part(epath.Path(path))


def read_sample_parts(out_dir, groups: Sequence[int]) -> np.ndarray:
  """The training sample from its groups' parts, in group order: `sample_rows`'s rows."""
  return np.concatenate([_load_npy(sample_part_path(out_dir, g)) for g in sorted(groups)])


def train_step(sources: Sequence[Source] | None, out_dir, c: GlobalIndexConfig,
               sample: np.ndarray | None = None, sig: dict[str, int] | None = None) -> bool:
  """Trains the partitioner and quantizer (kept when trained for these sources and settings):
  trained.faiss and scale.npy, then the record. Returns True when it trained. The sample is
  drawn from `sources` here, or given (`sample`, with the sources' `sig`nature)."""
  out_dir = epath.Path(out_dir)
  if is_trained(out_dir):
    return False
  t0 = time.perf_counter()
  trained, scale = train_sources(sources, c) if sample is None else train_on(sample, c)
  write_trained(out_dir, trained, scale, c, sig if sig is not None else _signature(sources),
                time.perf_counter() - t0)
  return True


def write_trained(out_dir, trained, scale_D: np.ndarray, c: GlobalIndexConfig,
                  sig: dict[str, int], seconds: float) -> None:
  """trained.faiss and scale.npy, then the record that marks the train step finished."""
  out_dir = epath.Path(out_dir)
  _write_index(trained, out_dir / TRAINED)
  layout.write_bytes_atomic(out_dir / SCALE, layout.npy_bytes(scale_D))
  layout.write_json_atomic(out_dir / PARTS / TRAINED_RECORD, {
      "format_version": FORMAT_VERSION, "config": c.to_json(), "sources": sig,
      "seconds": seconds})


def load_trained(out_dir) -> tuple[Any, np.ndarray, GlobalIndexConfig]:
  """(trained index, int8 scale, resolved config) of a build whose train step is finished."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(out_dir / PARTS / TRAINED_RECORD)
  if rec is None:
    raise index_lib.IndexError_(f"{out_dir}: the index is not trained yet (no "
                                f"{PARTS}/{TRAINED_RECORD}); run the train step first.")
  scale = _load_npy(out_dir / SCALE).astype(np.float32)
  return _read_index(out_dir / TRAINED), scale, GlobalIndexConfig.from_json(rec["config"])


def _write_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  layout.write_bytes_atomic(path, buf.getvalue())


def encode_step(g: int, sources: Sequence[Source], out_dir, trained=None) -> bool:
  """Encodes group g (its sources, in order): per serving shard one part file, then the group's
  record. Kept when recorded. Returns True when it encoded."""
  out_dir = epath.Path(out_dir)
  if _read_json(_encoded_record(out_dir, g)) is not None:
    return False
  t0 = time.perf_counter()
  trained, scale, c = trained or load_trained(out_dir)
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  ivf = _ivf(trained)
  per_source = [encode_source(trained, part_shard, emb, off, scale, c.training_threads)
                for _, emb, off in sources]
  dim = int(trained.d)
  counts = []
  for s in range(c.serving_shards):
    lists, ids, codes, rows = _concat([e[s] for e in per_source], ivf.code_size, dim)
    order = np.argsort(lists, kind="stable")  # by partition, source order within each
    names, starts = np.unique(lists[order], return_index=True)
    _write_npz(_part_path(out_dir, g, s), {
        "partitions": names, "starts": np.append(starts, lists.size).astype(np.int64),
        "ids": ids[order], "codes": codes[order], "rerank": rows, "rerank_ids": ids})
    counts.append(int(ids.size))
  layout.write_json_atomic(_encoded_record(out_dir, g), {
      "sources": [int(i) for i, _, _ in sources], "count": int(sum(counts)),
      "seconds": time.perf_counter() - t0})
  return True


def _read_part(path: epath.Path) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f:  # each member read once, straight into its array
    with np.load(f, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}


class _NpyStream:
  """A .npy of rows [?, *tail] written front to back into a local file: rows appended, the header
  (of a fixed 128 bytes, so the rows need not move) written when the count is known."""

  HEADER = 128

  def __init__(self, path: str, dtype, tail: tuple[int, ...]):
    self.f, self.dtype, self.tail, self.rows = open(path, "wb"), np.dtype(dtype), tail, 0
    self.f.write(b"\0" * self.HEADER)

  def append(self, a: np.ndarray) -> None:
    self.f.write(np.ascontiguousarray(a, self.dtype).tobytes())
    self.rows += len(a)

  def close(self) -> None:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                "fortran_order": False,
                                                "shape": (self.rows, *self.tail)})
    if len(head.getvalue()) != self.HEADER:
      raise ValueError(f"npy header of {len(head.getvalue())} bytes, not {self.HEADER}")
    self.f.seek(0)
    self.f.write(head.getvalue())
    self.f.close()


def _read_ahead(paths: Sequence[epath.Path]) -> Iterator[dict[str, np.ndarray]]:
  """The parts at `paths`, in order, read ahead by at most MERGE_READS_IN_FLIGHT parts and
  MERGE_READ_AHEAD_BYTES (a pool's map would read them all before the first is used; a part of a
  small database's only serving shard holds a whole encode group)."""
  sizes = [epath.Path(p).stat().length for p in paths]
  with concurrent.futures.ThreadPoolExecutor(MERGE_READS_IN_FLIGHT) as pool:
    pending: collections.deque = collections.deque()
    for path, size in zip(paths, sizes):
      while pending and (len(pending) >= MERGE_READS_IN_FLIGHT
                         or sum(b for _, b in pending) + size > MERGE_READ_AHEAD_BYTES):
        yield pending.popleft()[0].result()
      pending.append((pool.submit(_read_part, path), size))
    while pending:
      yield pending.popleft()[0].result()


def _file_record(path) -> dict[str, Any]:
  return {"sha256": layout.sha256_file(path), "bytes": layout.file_size(path)}


def _bytes_record(data: bytes) -> dict[str, Any]:
  return {"sha256": layout.sha256_bytes(data), "bytes": len(data)}


def _lists_at(out_dir: epath.Path, nlist: int) -> int:
  """Where the inverted lists start in every serving shard's faiss file (trained.faiss's size)."""
  return serving_lists.trained_lists_offset((epath.Path(out_dir) / TRAINED).stat().length, nlist)


def _write_lists_file(out_dir: epath.Path, s: int, offsets: np.ndarray | None
                      ) -> dict[str, dict]:
  """Serving shard s's lists file from its faiss file's `offsets` (none for another faiss
  layout); returns its record ({} when none)."""
  if offsets is None:
    return {}
  data = serving_lists.lists_file_bytes(offsets)
  layout.write_bytes_atomic(serving_path(out_dir, s, "lists"), data)
  return {"lists": _bytes_record(data)}


def _write_serving_faiss(out_dir: epath.Path, s: int, index, nlist: int) -> dict[str, dict]:
  """Serving shard s's faiss file and its lists file (one walk over the bytes in memory);
  returns their records."""
  data = faiss.serialize_index(index).tobytes()
  layout.write_bytes_atomic(serving_path(out_dir, s, "faiss"), data)
  offsets = serving_lists.read_offsets(lambda o, n: data[o:o + n], len(data),
                                       _lists_at(out_dir, nlist), nlist)
  return {"faiss": _bytes_record(data), **_write_lists_file(out_dir, s, offsets)}


def merge_step(s: int, groups: Sequence[int], out_dir, trained=None) -> dict[str, Any]:
  """Serving shard s from every group's part for it, read whole in group order (a few reads in
  flight): its int8 rerank copy and ids streamed to disk as they come, its codes into the faiss
  file and that file's lists file. Then its record (serving/shard-S.json: counts and checksums),
  which marks it merged. Kept when recorded. Returns the record. In RAM: the serving shard's codes
  and ids."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(serving_path(out_dir, s, "record"))
  if rec is not None:
    return rec
  t0 = time.perf_counter()
  trained, _, c = trained or load_trained(out_dir)
  index = faiss.clone_index(trained)
  ivf = _ivf(index)
  lists, ids, codes = [], [], []
  files = {}
  with layout.staged_file(serving_path(out_dir, s, "rerank")) as rr_tmp, \
      layout.staged_file(serving_path(out_dir, s, "ids")) as ids_tmp:
    rr, rr_ids = _NpyStream(rr_tmp, np.int8, (int(trained.d),)), _NpyStream(ids_tmp, np.int64, ())
    for part in _read_ahead([_part_path(out_dir, g, s) for g in sorted(groups)]):
      rr.append(part["rerank"])
      rr_ids.append(part["rerank_ids"])
      sizes = np.diff(part["starts"])
      lists.append(np.repeat(part["partitions"].astype(np.int32), sizes))
      ids.append(part["ids"])
      codes.append(part["codes"])
    rr.close()
    rr_ids.close()
    files["rerank"], files["ids"] = _file_record(rr_tmp), _file_record(ids_tmp)
  if lists:
    lists_n = np.concatenate(lists)
    order = np.argsort(lists_n, kind="stable")  # by partition; group, source, row order within
    bounds = np.searchsorted(lists_n[order], np.arange(ivf.nlist + 1))
    del lists, lists_n
    ids_n, codes_n = np.concatenate(ids), np.concatenate(codes)
    del ids, codes
    for p in np.flatnonzero(np.diff(bounds)):  # one partition's entries gathered at a time
      mine = order[bounds[p]:bounds[p + 1]]
      _set_list(ivf, int(p), ids_n[mine], codes_n[mine])
    index.ntotal = ivf.ntotal
  files.update(_write_serving_faiss(out_dir, s, index, c.nlist))
  scann_s = 0.0
  if c.searcher == "scann":
    t1 = time.perf_counter()
    files.update(_build_scann(out_dir, s, c, _load_npy(out_dir / SCALE).astype(np.float32)))
    scann_s = time.perf_counter() - t1
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  rec = {"shard": int(s), "part_start": int(np.searchsorted(part_shard, s)),
         "part_end": int(np.searchsorted(part_shard, s, side="right")),
         "count": int(index.ntotal), "ram_bytes": memory_bytes(index), "files": files}
  # the time beside it under parts/ (the record, which marks the shard merged, is deterministic)
  layout.write_json_atomic(_merge_seconds(out_dir, s), {"seconds": time.perf_counter() - t0,
                                                        "scann_seconds": scann_s})
  layout.write_json_atomic(serving_path(out_dir, s, "record"), rec)
  return rec


def _content_sha256(top_files: dict[str, dict], serving: Sequence[dict]) -> str:
  """One fingerprint of every file's recorded checksum (the index's content; DERIVED_FILES left
  out)."""
  shas = [top_files[f]["sha256"] for f in sorted(top_files)]
  shas += [r["files"][f]["sha256"] for r in serving
           for f in SERVING_FILES + tuple(sorted(set(r["files"]) - set(SERVING_FILES)
                                                 - set(DERIVED_FILES)))]
  return layout.sha256_bytes(json.dumps(shas).encode())


def finish_build(sig: dict[str, int], out_dir) -> dict[str, Any]:
  """Writes the manifest (fixed size: totals, config, the trained files' checksums and one
  fingerprint over every serving shard's record; build seconds per step, summed over elements)
  once every group is encoded and every serving shard merged, then removes `parts/`. Returns the
  manifest."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(out_dir / PARTS / TRAINED_RECORD)
  c = GlobalIndexConfig.from_json(rec["config"])
  groups = num_groups(sig["num_sources"])
  with concurrent.futures.ThreadPoolExecutor(FINISH_READS_IN_FLIGHT) as pool:
    # Small records, one per serving shard and per encode group (tens of thousands at 2.8e10
    # chunks): read concurrently, as a bucket serves them, in order.
    serving = list(pool.map(_read_json, [serving_path(out_dir, s, "record")
                                         for s in range(c.serving_shards)]))
    encoded = list(pool.map(_read_json, [_encoded_record(out_dir, g) for g in range(groups)]))
    merge_s = list(pool.map(_read_json, [_merge_seconds(out_dir, s)
                                         for s in range(c.serving_shards)]))
  if any(m is None for m in serving + encoded):
    raise index_lib.IndexError_(f"{out_dir}: not every group is encoded and every serving "
                                "shard merged; run those steps first.")
  count = sum(int(r["count"]) for r in serving)
  if count != sig["count"]:
    raise index_lib.IndexError_(f"{out_dir}: the serving shards hold {count} vectors, the "
                                f"sources {sig['count']}; rebuild the index.")
  seconds = {"train": rec["seconds"], "encode": sum(e["seconds"] for e in encoded),
             "merge": sum((m or {}).get("seconds", 0.0) for m in merge_s)}
  if c.searcher == "scann":  # part of the merge seconds above
    seconds["scann_within_merge"] = sum((m or {}).get("scann_seconds", 0.0) for m in merge_s)
  manifest = _manifest(out_dir, c, sig, serving)
  manifest["build_seconds"] = {**seconds, "total": seconds["train"] + seconds["encode"]
                                                   + seconds["merge"]}
  layout.write_json_atomic(out_dir / layout.MANIFEST, manifest)
  (out_dir / PARTS).rmtree()
  return manifest


def build(sources: Sequence[Source], out_dir, config: GlobalIndexConfig | None = None,
          progress: bool = False) -> dict[str, Any]:
  """Trains on a sample, encodes every source once, writes `out_dir` (manifest last): the steps
  in turn, in this process (resumable like the Beam build, which runs the same steps). Returns
  the manifest (with `build_seconds` per step)."""
  out_dir = epath.Path(out_dir)
  c = prepare_build(sources, out_dir, config)
  train_step(sources, out_dir, c)
  trained = load_trained(out_dir)
  groups = range(num_groups(len(sources)))
  for g in groups:
    mine = [sources[i] for i in group_sources(g, len(sources))]
    if progress:
      print(f"  encoding embeddings shards {mine[0][0]}..{mine[-1][0]}", flush=True)
    encode_step(g, mine, out_dir, trained)
  for s in range(c.serving_shards):
    merge_step(s, groups, out_dir, trained)
  return finish_build(_signature(sources), out_dir)


def _load_npy(path: epath.Path) -> np.ndarray:
  return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)


def _manifest(out_dir: epath.Path, c: GlobalIndexConfig, sig: dict[str, int],
              serving: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`serving`: each serving shard's record (serving/shard-S.json)."""
  top_files = {f: _file_record(out_dir / f) for f in (TRAINED, SCALE)}
  trained = _read_index(out_dir / TRAINED)
  return {
      "format_version": FORMAT_VERSION, "backend": BACKEND, "count": int(sig["count"]),
      "num_sources": int(sig["num_sources"]), "dim": int(trained.d), "config": c.to_json(),
      "factory": _factory(int(trained.d), c), "versions": index_lib.package_versions(),
      "ram_bytes": int(sum(int(r["ram_bytes"]) for r in serving)),
      "files": top_files, "content_sha256": _content_sha256(top_files, serving),
  }


def read_manifest(index_dir) -> dict[str, Any]:
  path = epath.Path(index_dir) / layout.MANIFEST
  if not path.exists():
    raise index_lib.IndexError_(
        f"Global index manifest {path} is missing: the index was never built or its build was "
        "interrupted; rerun `python -m retro_jax.build_db --stages=index`.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise index_lib.IndexError_(f"Global index manifest {path} is corrupt ({e}); rebuild it.")


def serving_shard_ids(manifest: dict[str, Any]) -> list[int]:
  return list(range(int(manifest["config"]["serving_shards"])))


def read_serving_record(index_dir, s: int) -> dict[str, Any]:
  path = serving_path(index_dir, s, "record")
  rec = _read_json(path)
  if rec is None:
    raise index_lib.IndexError_(f"Global index serving shard record {path} is missing or "
                                "corrupt; rerun `python -m retro_jax.build_db --stages=index`.")
  return rec


_FIX = "rerun `python -m retro_jax.build_db` with the database's flags: it rebuilds the index"
_FIX_CONTENT = ("rerun `python -m retro_jax.build_db` with the database's flags and --audit (which "
                "reads the whole index): it rebuilds the index")


def _check_file(path: epath.Path, rec: dict[str, Any], data: bytes | None = None,
                content: bool = True) -> None:
  """A file against its recorded size and (with `content`) sha256: of `data` when the caller
  has read the file already, else read here."""
  if data is None and not path.exists():
    raise index_lib.IndexError_(f"Global index file {path} is missing; {_FIX}.")
  size = len(data) if data is not None else path.stat().length
  if size != rec["bytes"]:
    raise index_lib.IndexError_(f"Global index file {path} is damaged ({size} bytes, its record "
                                f"says {rec['bytes']}); {_FIX}.")
  if content and (layout.sha256_bytes(data) if data is not None
                  else layout.sha256_file(path)) != rec["sha256"]:
    raise index_lib.IndexError_(f"Global index file {path} is damaged (its sha256 differs from "
                                f"its record); {_FIX_CONTENT}.")


def damaged_top_files(index_dir, manifest: dict[str, Any]) -> list[str]:
  """The index's files outside the serving shards (a few, whatever its size) that are missing or
  not at their recorded size."""
  index_dir = epath.Path(index_dir)
  return [str(index_dir / n) for n, rec in manifest["files"].items()
          if not (index_dir / n).exists() or (index_dir / n).stat().length != rec["bytes"]]


def damaged_serving_files(index_dir, shards: Iterable[int]) -> list[str]:
  """The files of serving shards `shards` that are missing or not at the size their record names
  (one small record and a stat per file)."""
  out = []
  for s in shards:
    rec = _read_json(serving_path(index_dir, s, "record"))
    if rec is None:
      out.append(str(serving_path(index_dir, s, "record")))
      continue
    for what, f in rec["files"].items():
      path = serving_path(index_dir, s, what)
      if not path.exists() or path.stat().length != f["bytes"]:
        out.append(str(path))
  return out


def damaged_files(index_dir, manifest: dict[str, Any] | None = None) -> list[str]:
  """The index's files that are missing or whose size differs from their record (a stat per file
  and one small record per serving shard; the build's rerun checks the serving shards in a Beam
  pipeline instead; `verify` reads the contents)."""
  manifest = manifest or read_manifest(epath.Path(index_dir))
  return (damaged_top_files(index_dir, manifest)
          + damaged_serving_files(index_dir, serving_shard_ids(manifest)))


def verify(index_dir, manifest: dict[str, Any] | None = None) -> None:
  """Every file of the index against its recorded sha256 (reads the whole index: the audit)."""
  index_dir = epath.Path(index_dir)
  manifest = manifest or read_manifest(index_dir)
  for name, rec in manifest["files"].items():
    _check_file(index_dir / name, rec)
  records = [read_serving_record(index_dir, s) for s in serving_shard_ids(manifest)]
  for s, r in zip(serving_shard_ids(manifest), records):
    for what, rec in r["files"].items():
      _check_file(serving_path(index_dir, s, what), rec)
  if _content_sha256(manifest["files"], records) != manifest.get("content_sha256"):
    raise index_lib.IndexError_(f"Global index {index_dir}: its serving shard records differ from "
                                f"its manifest; {_FIX}.")


# ----------------------------------------------------------------------------------------------
# The lists files of an index built before them: the upgrade (`build_db --stages=finalize`).

LISTS_WRITES_IN_FLIGHT = 8  # serving shards walked at once (each walk: small reads in turn)


def _has_lists_layout(root: epath.Path, nlist: int) -> bool:
  """Whether the serving shards' faiss files hold fast-scan block lists (36 bytes of the trained
  file read): the layout lists files describe."""
  at = _lists_at(root, nlist)
  if at < 16:
    return False
  with (root / TRAINED).open("rb") as f:
    f.seek(at)
    return serving_lists.has_block_lists(f.read(36), nlist)


def lists_files_missing(index_dir) -> list[int]:
  """The serving shards of a finished index whose lists file is not recorded, or missing or not
  at its recorded size (a record and a stat per serving shard, read concurrently); [] when no
  index of this format is built, or its faiss layout has no lists files."""
  root = epath.Path(index_dir)
  if not (root / layout.MANIFEST).exists():
    return []
  m = read_manifest(root)
  if m.get("format_version") != FORMAT_VERSION:
    return []
  if not _has_lists_layout(root, int(m["config"]["nlist"])):
    return []

  def missing(s: int) -> bool:
    rec = read_serving_record(root, s)
    lists = rec["files"].get("lists")
    path = serving_path(root, s, "lists")
    return lists is None or not path.exists() or path.stat().length != lists["bytes"]

  shards = serving_shard_ids(m)
  with concurrent.futures.ThreadPoolExecutor(FINISH_READS_IN_FLIGHT) as pool:
    return [s for s, bad in zip(shards, pool.map(missing, shards)) if bad]


def _write_lists_of(root: epath.Path, s: int, nlist: int) -> None:
  """Serving shard s's lists file from one walk over its faiss file's counts (local: a small
  read per partition; gs://: the file read whole), then its record with the lists file's."""
  rec = read_serving_record(root, s)
  path = serving_path(root, s, "faiss")
  _check_file(path, rec["files"]["faiss"], content=False)
  at = _lists_at(root, nlist)
  try:
    if layout.is_remote(path):
      data = path.read_bytes()
      offsets = serving_lists.read_offsets(lambda o, n: data[o:o + n], len(data), at, nlist)
    else:
      offsets = serving_lists.file_offsets(os.fspath(path), at, nlist)
  except serving_lists.Damaged as e:
    raise index_lib.IndexError_(f"Global index file {path} is damaged ({e}); {_FIX}.") from None
  files = {**rec["files"], **_write_lists_file(root, s, offsets)}
  layout.write_json_atomic(serving_path(root, s, "record"), {**rec, "files": files})


def write_lists_files(index_dir) -> list[int]:
  """Writes the lists file of every serving shard of a finished index that lacks one (or whose
  lists file is missing or not at its recorded size), each with its record; returns those
  serving shards. The faiss files and the manifest are left as they are (the lists files are
  DERIVED_FILES). Raises IndexError_ naming a faiss file whose lists do not add up."""
  root = epath.Path(index_dir)
  shards = lists_files_missing(root)
  if shards:
    nlist = int(read_manifest(root)["config"]["nlist"])
    with concurrent.futures.ThreadPoolExecutor(LISTS_WRITES_IN_FLIGHT) as pool:
      list(pool.map(lambda s: _write_lists_of(root, s, nlist), shards))
  return shards


# ----------------------------------------------------------------------------------------------
# Search.


class GlobalIndex(index_lib.IndexShard):
  """The whole database (or serving shards of it) as one searcher over global ids `[0, N)`."""

  exact_scores = True  # scores are the int8 rerank's; the retriever need not rescore
  contiguous_ids = False  # a serving shard's ids are its partitions' members, anywhere in [0, N)

  def __init__(self, index_dir, serving: Sequence[int] | None = None, verify_files: bool = True,
               nprobe: int | None = None, searcher: str | None = None, lazy_lists: bool = True):
    """Reads the manifest, the scale, and each of `serving`'s (default: every serving shard)
    record and the header of its faiss file: the same few reads at any database size. Locally
    the trained file (the coarse quantizer, ~2 sqrt(N) centroids) is memory-mapped and each
    serving shard's inverted lists are read when a query first probes them
    (retro_jax.retrieval.serving_lists: opening reads the trained file's header and the faiss
    file's and its lists file's, or, without a lists file, one count per partition); on gs://, or
    with `lazy_lists=False`, the trained file and the faiss files are read whole at open.
    `verify_files`: what is read whole is checked against its sha256, the rest (the mapped
    trained file, the faiss file read by lists, the memory-mapped rerank copy and ids) by size
    (`verify` reads every file whole)."""
    self.index_dir = epath.Path(index_dir)
    self.manifest = read_manifest(self.index_dir)
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise index_lib.IndexError_(f"Global index {self.index_dir} has format version "
                                  f"{self.manifest.get('format_version')}, this code reads "
                                  f"{FORMAT_VERSION}; rebuild it (build_db --stages=index).")
    self.config = GlobalIndexConfig.from_json(self.manifest["config"])
    if nprobe:
      self.config = dataclasses.replace(self.config, nprobe=nprobe)
    self.searcher = searcher or self.config.searcher
    if self.searcher == "scann" and self.config.searcher != "scann":
      raise index_lib.IndexError_(f"Global index {self.index_dir} was built without ScaNN "
                                  "searchers; rebuild it with --index_searcher=scann.")
    self.offset, self.total = 0, int(self.manifest["count"])
    self._dim = int(self.manifest["dim"])
    files = self.manifest["files"]
    self.nlist = int(self.config.nlist)
    scale = (self.index_dir / SCALE).read_bytes()
    if verify_files:
      _check_file(self.index_dir / SCALE, files[SCALE], scale)
    self.scale_D = np.load(io.BytesIO(scale), allow_pickle=False).astype(np.float32)
    # Locally the trained file is memory-mapped (serving_lists.TrainedFile: its centroids paged in
    # as queries use them, its sha256 checked by `verify`); on gs://, or for another faiss layout,
    # read whole and checked.
    mapped = None
    if lazy_lists and not layout.is_remote(self.index_dir):
      _check_file(self.index_dir / TRAINED, files[TRAINED], content=False)
      mapped = serving_lists.TrainedFile(os.fspath(self.index_dir / TRAINED),
                                         int(files[TRAINED]["bytes"]), self.nlist)
      if mapped.geometry is None:
        mapped = None
    if mapped is not None:
      trained = mapped.index()
    else:
      data = (self.index_dir / TRAINED).read_bytes()
      if verify_files:
        _check_file(self.index_dir / TRAINED, files[TRAINED], data)
      trained = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    self.quantizer = faiss.extract_index_ivf(trained).quantizer
    self._trained = trained
    _set_quantizer_search(trained, self.config.nprobe)
    self.part_shard = _partition_shard(self.nlist, int(self.config.serving_shards))
    all_shards = serving_shard_ids(self.manifest)
    self.serving_ids = list(all_shards if serving is None else serving)
    bad = sorted(set(self.serving_ids) - set(all_shards))
    if bad:
      raise index_lib.IndexError_(f"Global index {self.index_dir} has serving shards "
                                  f"0..{len(all_shards) - 1}; {bad} do not exist.")
    self.serving, self._lists, self._rr, self._rr_ids, self._scann = {}, {}, {}, {}, {}
    self._ram = {}
    for s in self.serving_ids:
      rec = read_serving_record(self.index_dir, s)
      self._ram[s] = int(rec["ram_bytes"])
      path = serving_path(self.index_dir, s, "faiss")
      if mapped is not None:  # headers (older indexes: a count per partition); lists when probed
        _check_file(path, rec["files"]["faiss"], content=False)
        lists = rec["files"].get("lists")  # its size checked by ServingLists
        self._lists[s] = serving_lists.ServingLists(
            os.fspath(path), mapped, int(rec["files"]["faiss"]["bytes"]),
            None if lists is None else os.fspath(serving_path(self.index_dir, s, "lists")),
            None if lists is None else int(lists["bytes"]))
        self.serving[s] = self._lists[s].index
      else:
        whole = path.read_bytes()
        if verify_files:
          _check_file(path, rec["files"]["faiss"], whole)
        self._lists[s] = None
        self.serving[s] = faiss.deserialize_index(np.frombuffer(whole, np.uint8))
      if verify_files:
        for what in ("rerank", "ids"):
          _check_file(serving_path(self.index_dir, s, what), rec["files"][what], content=False)
      # memory-mapped, or ranged reads on gs://
      self._rr[s] = npy_rows.open_rows(serving_path(self.index_dir, s, "rerank"))
      ids = npy_rows.open_rows(serving_path(self.index_dir, s, "ids"))
      n = int(ids.shape[0])
      # ids 0..n-1 (one serving shard): a row's id is its row number
      contiguous = n == 0 or (int(ids[0]) == 0 and int(ids[n - 1]) == n - 1)
      # else its sorted ids: searched memory-mapped locally, read whole on gs:// (8 B a vector)
      self._rr_ids[s] = (None if contiguous else ids if isinstance(ids, np.ndarray)
                         else np.asarray(ids[0:n], np.int64))
      if self.searcher == "scann":
        key = layout.sha256_bytes(json.dumps(rec["files"], sort_keys=True).encode())
        self._scann[s] = (scann.scann_ops_pybind.load_searcher(
            layout.local_dir(serving_path(self.index_dir, s, "scann"), key)), n)
        self._scann[s][0].set_num_threads(faiss.omp_get_max_threads())
    self._set_count()

  @property
  def dim(self) -> int:
    return self._dim

  def _set_count(self) -> None:
    """`count`: the vectors this searcher holds (its serving shards'); ids span `[0, total)`."""
    self.count = int(sum(self.serving[s].ntotal for s in self.serving_ids))

  def restricted(self, serving: Sequence[int]) -> "GlobalIndex":
    """The same index limited to these serving shards (shares the loaded files)."""
    other = object.__new__(GlobalIndex)
    other.__dict__.update(self.__dict__)
    other.serving_ids = list(serving)
    other.serving = {s: self.serving[s] for s in serving}
    other._lists = {s: self._lists[s] for s in serving}
    other._ram = {s: self._ram[s] for s in serving}
    other._rr = {s: self._rr[s] for s in serving}
    other._rr_ids = {s: self._rr_ids[s] for s in serving}
    other._scann = {s: self._scann[s] for s in serving if s in self._scann}
    other._set_count()
    return other

  def memory_bytes(self) -> int:
    """The serving shards' inverted lists in RAM, every list read (lazily read ones included:
    their records' figure, what `memory_bytes` of the whole index gave when it was written)."""
    return sum(memory_bytes(self.serving[s]) if self._lists[s] is None else self._ram[s]
               for s in self.serving_ids)

  def _nprobe(self, n: int) -> int:
    """nprobe grows with the number of candidates asked for (the retriever's refills)."""
    per_list = max(1.0, self.total / self.nlist)
    need = math.ceil(2 * max(n, self.config.rerank) / per_list)
    return int(min(self.nlist, max(self.config.nprobe, need)))

  def route(self, queries_QxD: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(partition ids [Q, nprobe] int64, centroid scores [Q, nprobe]): where each query goes."""
    nprobe = self._nprobe(n)
    _set_quantizer_search(self._trained, nprobe)
    dis, parts = self.quantizer.search(queries_QxD, nprobe)
    return parts.astype(np.int64), dis.astype(np.float32)

  def reaches(self, parts_QxP: np.ndarray, serving: Sequence[int] | None = None) -> np.ndarray:
    """bool [Q]: the routed queries (partitions from `route`) with a partition in these serving
    shards (default: this searcher's)."""
    serving = self.serving_ids if serving is None else serving
    mine = np.isin(self.part_shard[np.maximum(parts_QxP, 0)], serving)
    return (mine & (parts_QxP >= 0)).any(axis=1)

  def reached(self, queries_QxD: np.ndarray, n: int) -> np.ndarray:
    if len(self.serving_ids) == int(self.config.serving_shards):  # every partition is here
      return np.ones(len(queries_QxD), bool)
    return self.reaches(self.route(np.ascontiguousarray(queries_QxD, np.float32), n)[0])

  def _scan_scann(self, s: int, queries_QxD, reach_Q: np.ndarray, r: int):
    """ScaNN over serving shard s for the queries routed to it: its best r by AH score."""
    searcher, n = self._scann[s]
    out = np.full((len(queries_QxD), r), -1, np.int64)
    if not reach_Q.any() or n == 0:
      return out
    found, _ = searcher.search_batched_parallel(
        np.ascontiguousarray(queries_QxD[reach_Q]), final_num_neighbors=min(r, n),
        leaves_to_search=_scann_leaves(n, self.config.scann_leaves_to_search)[1])
    found = found.astype(np.int64)
    ids = self._rr_ids[s]
    out[reach_Q, :found.shape[1]] = found if ids is None else ids[found]
    return out

  def _scan(self, s: int, queries_QxD, parts_QxP, dis_QxP, r: int):
    mask = (parts_QxP >= 0) & (self.part_shard[np.maximum(parts_QxP, 0)] == s)
    if not mask.any():
      return None
    if self.searcher == "scann":
      return self._scan_scann(s, queries_QxD, mask.any(axis=1), r)
    assign = np.ascontiguousarray(np.where(mask, parts_QxP, -1), np.int64)
    dis = np.ascontiguousarray(dis_QxP, np.float32)
    q, p = assign.shape
    d_QxR = np.empty((q, r), np.float32)
    i_QxR = np.empty((q, r), np.int64)
    params = faiss.SearchParametersIVF()
    params.nprobe = p
    if self._lists[s] is not None:
      self._lists[s].ensure(assign)
    idx = self.serving[s]
    idx.search_preassigned_c(q, faiss.swig_ptr(queries_QxD), r, faiss.swig_ptr(assign),
                             faiss.swig_ptr(dis), faiss.swig_ptr(d_QxR), faiss.swig_ptr(i_QxR),
                             False, params)
    return i_QxR

  def rerank_scores(self, s: int, queries_QxD: np.ndarray, ids_QxR: np.ndarray) -> np.ndarray:
    """float32 [Q, R]: dot products with serving shard s's int8 copies of these ids (its own
    members; -inf where id < 0)."""
    q, r = ids_QxR.shape
    valid = ids_QxR >= 0
    flat = np.where(valid, ids_QxR, 0).reshape(-1)
    ids = self._rr_ids[s]
    local = flat if ids is None else np.searchsorted(ids, flat)
    if ids is not None and len(flat):
      local = np.minimum(local, int(ids.shape[0]) - 1)
    rows = np.asarray(self._rr[s][local], np.int8) if len(flat) else np.zeros((0, self.dim), np.int8)
    rows_QxRxD = rows.reshape(q, r, self.dim)
    q_scaled = (queries_QxD * self.scale_D)[:, :, None]
    scores = np.empty((q, r), np.float32)
    for a in range(0, q, 64):  # blocks small enough for the cache: int8 -> float32, batched gemv
      scores[a:a + 64] = np.matmul(rows_QxRxD[a:a + 64].astype(np.float32), q_scaled[a:a + 64])[..., 0]
    return np.where(valid, scores, -np.inf).astype(np.float32)

  def search_serving(self, s: int, queries_QxD, parts_QxP, dis_QxP, n: int):
    """Serving shard s's best n (ids, int8-reranked scores) among its partitions in the route."""
    r = max(n, self.config.rerank)
    ids = self._scan(s, queries_QxD, parts_QxP, dis_QxP, r)
    if ids is None:
      q = queries_QxD.shape[0]
      return np.full((q, n), -1, np.int64), np.full((q, n), -np.inf, np.float32)
    return index_lib.top_k_rows(ids, self.rerank_scores(s, queries_QxD, ids), n)

  def search(self, queries_QxD, n):
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    if self.searcher == "scann" and int(self.config.serving_shards) == 1:  # nothing to route
      parts = np.zeros((len(queries_QxD), 1), np.int64)
      dis = np.zeros((len(queries_QxD), 1), np.float32)
    else:
      parts, dis = self.route(queries_QxD, n)
    got = [self.search_serving(s, queries_QxD, parts, dis, n) for s in self.serving_ids]
    if len(got) == 1:
      return got[0]
    return index_lib.top_k_rows(np.concatenate([g[0] for g in got], 1),
                                np.concatenate([g[1] for g in got], 1), n)


def index_dir(db_dir) -> epath.Path:
  """DB/index/global."""
  return layout.index_dir(db_dir, BACKEND)


# ----------------------------------------------------------------------------------------------
# Serving-side state of a built index: is it built for these sources, add new sources.


def is_built(root, sources: Sequence[Source]) -> bool:
  """True when `root` has a manifest of this format over these sources (their count and number;
  the `parts/` of a build killed after its manifest was written are removed)."""
  if not (epath.Path(root) / layout.MANIFEST).exists():
    return False
  if (epath.Path(root) / PARTS).exists():
    (epath.Path(root) / PARTS).rmtree()
  m = read_manifest(root)
  return (m.get("format_version") == FORMAT_VERSION
          and signature(m["count"], m["num_sources"]) == _signature(sources))


def _append_rows(path: epath.Path, new: np.ndarray) -> dict[str, Any]:
  """Rewrites a rows .npy with `new` rows after its own (staged, atomic); returns its record."""
  old = npy_rows.open_rows(path)
  with layout.staged_file(path) as tmp:
    out = _NpyStream(tmp, old.dtype, tuple(old.shape[1:]))
    for a in range(0, int(old.shape[0]), BLOCK_ROWS):
      out.append(np.asarray(old[a:a + BLOCK_ROWS]))
    out.append(new)
    out.close()
    rec = _file_record(tmp)
  return rec


def add_sources(root, sources: Sequence[Source]) -> dict[str, Any]:
  """Encodes the sources (all of the database's embeddings shards, in order) that the built
  index does not hold yet (documents added by `retro_jax.build.edit`: the last ones) with the
  trained partitioner and quantizer: each new vector goes to its partition's serving shard, whose
  files are rewritten atomically (the new ids are the largest, so its rerank copy stays in id
  order), then its record, then the manifest (removed first, so an interrupted add is never
  mistaken for a finished index)."""
  root = epath.Path(root)
  manifest = read_manifest(root)
  verify(root, manifest)
  have = int(manifest["num_sources"])
  new = list(sources[have:])
  if not new:
    return manifest
  c = GlobalIndexConfig.from_json(manifest["config"])
  trained = _read_index(root / TRAINED)
  scale = _load_npy(root / SCALE).astype(np.float32)
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  encoded = [encode_source(trained, part_shard, emb, off, scale, c.training_threads)
             for _, emb, off in new]
  (root / layout.MANIFEST).unlink()
  records = []
  for s in serving_shard_ids(manifest):
    rec = read_serving_record(root, s)
    idx = _read_index(serving_path(root, s, "faiss"))
    mine = [e[s] for e in encoded]
    append_encoded(idx, mine)
    files = {**_write_serving_faiss(root, s, idx, c.nlist),
             "rerank": _append_rows(serving_path(root, s, "rerank"),
                                    np.concatenate([m[3] for m in mine])),
             "ids": _append_rows(serving_path(root, s, "ids"), np.concatenate([m[1] for m in mine]))}
    rec = {**rec, "count": int(idx.ntotal), "ram_bytes": memory_bytes(idx), "files": files}
    layout.write_json_atomic(serving_path(root, s, "record"), rec)
    records.append(rec)
  sig = _signature(sources)
  out = _manifest(root, c, sig, records)
  out["build_seconds"] = manifest.get("build_seconds")
  layout.write_json_atomic(root / layout.MANIFEST, out)
  return out
