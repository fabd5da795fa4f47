"""One global index over the whole database: one partitioner, one quantizer, serving shards.

faiss IVF-PQ fast-scan (4-bit PQ codes; the ANN benchmark in docs/benchmarks.md measures it against
ScaNN) with one coarse quantizer (`nlist` partitions) and one product quantizer, both trained on a
deterministic sample of the database's embeddings. Every vector is encoded once, streaming shard
by shard (a block of rows at a time; the database is never in RAM), into the partition its
nearest centroid names. Partitions are grouped into `S` serving shards (contiguous partition
ranges); a query is routed to its `nprobe` nearest partitions, in whichever serving shards hold
them, scanned there, and the best candidates of each serving shard are reranked against a compact
int8 copy of the vectors kept on disk (memory-mapped, per embeddings shard), then merged.

In RAM per vector: the PQ code (`pq_m / 2` bytes; 48 at the default `pq_m=96`), its int64 id
(8 bytes) and the fast-scan block padding (each partition is stored in blocks of 32 codes): 61.9
bytes at the default store's 60k vectors, less as partitions grow; no float32 copy. On disk per vector: the same, plus the int8
rerank copy (D bytes: 384 for MiniLM). `GlobalIndex.memory_bytes()` reports the measured figure.

Layout (`DB/index/global/`, written through `retro_jax.db.layout`: atomic writes, manifest last):

    manifest.json                 config, counts, partition -> serving shard, sha256 of every file
    trained.faiss                 the trained, empty index (coarse centroids + PQ codebooks)
    serving/shard-XXXXX.faiss     serving shard s: the partitions [part_start, part_end)
    rerank/shard-XXXXX.npy        int8 [chunks, D] copy of embeddings shard i (row = chunk id - offset)
    rerank/scale.npy              float32 [D]: value = int8 * scale (per-dimension abs max / 127)

Built in steps, each recorded under `parts/` when finished (removed with the manifest): train
(one), encode (one per embeddings shard: its rerank copy, and its vectors' (partition, id, PQ
code) per serving shard as part files), merge (one per serving shard: the parts appended in
embeddings-shard order and packed into fast-scan blocks: the bytes faiss's `add_with_ids` gives
shard by shard), finish (the manifest). `build` runs them in turn in one process; the Beam build
(retro_jax/db/pipeline.py) runs them as transforms, encode and merge in parallel.

Ids are int64 global chunk ids. To the `Retriever` (which adds the same-document exclusion,
removed-document masking and the merge) each serving shard is one searcher, `GlobalIndex.restricted
([s])`, over ids anywhere in `[0, N)`; its scores are the int8 rerank dot products (within ~1e-3 of
the float32 ones), so the retriever skips its own float32 rescoring. One gRPC shard process serves
one serving shard the same way, so the service's merged answer is the in-process one.

On gs:// the same layout is read and written through retro_jax.db.layout: faiss files as bytes
(serialize / deserialize, no local file), each rerank copy filled as a local np.memmap and uploaded
when complete (`layout.staged_file`), and read back by rows (retro_jax.db.npy_rows: ranged reads,
nothing staged locally).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from typing import Any, Sequence

import faiss
import numpy as np
from etils import epath
from faiss.contrib import clustering as faiss_clustering

from retro_jax.db import layout, npy_rows
from retro_jax.retrieval import index as index_lib

BACKEND = index_lib.GLOBAL_BACKEND
FORMAT_VERSION = 1
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
  kmeans_iters: int = 12
  seed: int = 0
  training_threads: int = 1         # 1 keeps the build repeatable on a busy machine

  def resolved(self, n: int) -> "GlobalIndexConfig":
    nlist = self.nlist or max(1, min(int(round(2 * math.sqrt(n))), n // 39 or 1))
    shards = self.serving_shards or max(1, math.ceil(n / self.vectors_per_serving_shard))
    sample = max(self.train_sample, self.min_points_per_centroid * nlist)
    return dataclasses.replace(self, nlist=nlist, serving_shards=min(shards, nlist),
                               train_sample=sample)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "GlobalIndexConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Sources: (embeddings shard number, float32 [n, D] array-like (np.memmap or anything indexable
# by slices and sorted int arrays), first global id).

Source = tuple[int, Any, int]


def sample_rows(sources: Sequence[Source], size: int, seed: int) -> np.ndarray:
  """float32 [min(size, N), D]: rows drawn without replacement (fixed seed), read shard by shard."""
  total = sum(int(s[1].shape[0]) for s in sources)
  size = min(size, total)
  rng = np.random.default_rng(seed)
  picks = np.sort(rng.choice(total, size=size, replace=False)) if size < total else np.arange(total)
  out = np.empty((size, sources[0][1].shape[1]), np.float32)
  start, filled = 0, 0
  for _, emb, _ in sources:
    n = int(emb.shape[0])
    mine = picks[(picks >= start) & (picks < start + n)] - start
    for b in range(0, mine.size, BLOCK_ROWS):
      rows = mine[b:b + BLOCK_ROWS]
      out[filled:filled + rows.size] = np.asarray(emb[rows], np.float32)
      filled += rows.size
    start += n
  return out


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
  sample = sample_rows(sources, max(c.train_sample, 0), c.seed)
  dim = sample.shape[1]
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
  return index, scale, c


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
# Encoding: every vector to (partition, id, PQ code), grouped by serving shard.
#
# Encoded = (partitions int64 [n], ids int64 [n], codes uint8 [n, code_size]): a source's
# vectors of one serving shard, in source row order. A serving shard's file is the trained index
# with each partition's entries appended in source order (then row order) and packed into
# fast-scan blocks, zero-padded: the bytes faiss's own `add_with_ids`, source by source, writes.

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


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


def encode_block(ivf, part_shard: np.ndarray, x_NxD: np.ndarray, ids_N: np.ndarray
                 ) -> dict[int, Encoded]:
  """One block of vectors, encoded, by serving shard. With several serving shards each shard's
  vectors are assigned again on their own (what adding them to that shard's faiss index does)."""
  parts = _assign(ivf, x_NxD)
  if len(part_shard) and part_shard[-1] == 0:  # one serving shard
    return {0: (parts, ids_N, _codes(ivf, x_NxD, parts))}
  owner = part_shard[parts]
  out = {}
  for s in np.unique(owner):
    m = owner == s
    xs = np.ascontiguousarray(x_NxD[m])
    ps = _assign(ivf, xs)
    out[int(s)] = (ps, ids_N[m], _codes(ivf, xs, ps))
  return out


def _concat(parts: Sequence[Encoded], code_size: int) -> Encoded:
  if not parts:
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, code_size), np.uint8))
  return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))


def encode_source(trained, part_shard: np.ndarray, emb, offset: int, rerank_path: epath.Path,
                  scale_D: np.ndarray, threads: int = 1) -> dict[int, Encoded]:
  """Encodes one embeddings shard, a block of rows at a time, and writes its int8 rerank copy.
  Returns its vectors by serving shard (every serving shard, empty ones too)."""
  ivf = _ivf(trained)
  n, dim = int(emb.shape[0]), int(emb.shape[1])
  blocks: dict[int, list[Encoded]] = {}
  with layout.staged_file(rerank_path) as tmp, _threads(threads):
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8, shape=(n, dim))
    for a in range(0, n, BLOCK_ROWS):
      x = np.ascontiguousarray(emb[a:a + BLOCK_ROWS], np.float32)
      out[a:a + len(x)] = to_int8(x, scale_D)
      ids = np.arange(offset + a, offset + a + len(x), dtype=np.int64)
      for s, enc in encode_block(ivf, part_shard, x, ids).items():
        blocks.setdefault(s, []).append(enc)
    out.flush()
    del out
  shards = int(part_shard[-1]) + 1 if len(part_shard) else 1
  return {s: _concat(blocks.get(s, []), ivf.code_size) for s in range(shards)}


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
  lists, ids, codes = _concat(parts, ivf.code_size)
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
# The build, as steps (the plain `build` runs them in turn; retro_jax/db/pipeline.py runs each
# step's elements as Beam transforms): prepare; train (one); encode (one per source); merge (one
# per serving shard); finish (one: the manifest, last). Each step's output is written atomically
# with a record under `parts/` naming it finished, so a killed build redoes only unfinished
# elements; `finish` writes the manifest and removes `parts/`.

PARTS = "parts"
TRAINED_RECORD = "trained.json"


def signature(count: int, num_sources: int) -> dict[str, int]:
  """What a build's records are checked against: the vector and source counts (read from the
  chunk store's manifest by the Beam build's launcher; the sources' contents are the stage's
  provenance record's business)."""
  return {"count": int(count), "num_sources": int(num_sources)}


def _signature(sources: Sequence[Source]) -> dict[str, int]:
  return signature(sum(int(e.shape[0]) for _, e, _ in sources), len(sources))


def _encoded_path(out_dir: epath.Path, i: int, s: int, name: str) -> epath.Path:
  """parts/shard-i.serving-s.NAME.npy: `partitions` [L] and `starts` [L + 1] (each partition's
  rows), `ids` [n] and `codes` [n, code_size] (sorted by partition, source order within)."""
  return out_dir / PARTS / f"{layout.shard_name(i)}.serving-{s:05d}.{name}.npy"


def _encoded_record(out_dir: epath.Path, i: int) -> epath.Path:
  return out_dir / PARTS / f"{layout.shard_name(i)}.encoded.json"


def _merged_record(out_dir: epath.Path, s: int) -> epath.Path:
  return out_dir / PARTS / f"serving-{s:05d}.merged.json"


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
  if rec is not None and (rec.get("config") != c.to_json() or rec.get("sources") != sig):
    (out_dir / PARTS).rmtree()
  for sub in ("rerank", "serving", PARTS):
    (out_dir / sub).mkdir(parents=True, exist_ok=True)
  return c


def train_step(sources: Sequence[Source], out_dir, c: GlobalIndexConfig) -> bool:
  """Trains the partitioner and quantizer (kept when trained for these sources and settings):
  trained.faiss and rerank/scale.npy, then the record. Returns True when it trained."""
  out_dir = epath.Path(out_dir)
  if _read_json(out_dir / PARTS / TRAINED_RECORD) is not None:
    return False
  t0 = time.perf_counter()
  trained, scale, c2 = train(sources, c)
  assert c2 == c, (c2, c)
  _write_index(trained, out_dir / TRAINED)
  layout.write_bytes_atomic(out_dir / "rerank" / SCALE, layout.npy_bytes(scale))
  layout.write_json_atomic(out_dir / PARTS / TRAINED_RECORD, {
      "config": c.to_json(), "sources": _signature(sources),
      "seconds": time.perf_counter() - t0})
  return True


def load_trained(out_dir) -> tuple[Any, np.ndarray, GlobalIndexConfig]:
  """(trained index, int8 scale, resolved config) of a build whose train step is finished."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(out_dir / PARTS / TRAINED_RECORD)
  if rec is None:
    raise index_lib.IndexError_(f"{out_dir}: the index is not trained yet (no "
                                f"{PARTS}/{TRAINED_RECORD}); run the train step first.")
  scale = _load_npy(out_dir / "rerank" / SCALE).astype(np.float32)
  return _read_index(out_dir / TRAINED), scale, GlobalIndexConfig.from_json(rec["config"])


def encode_step(source: Source, out_dir, trained=None) -> bool:
  """Encodes one source: its rerank copy and, per serving shard, its (partitions, ids, codes)
  as a part file, then its record. Kept when recorded. Returns True when it encoded."""
  out_dir = epath.Path(out_dir)
  i, emb, off = source
  if _read_json(_encoded_record(out_dir, i)) is not None:
    return False
  t0 = time.perf_counter()
  trained, scale, c = trained or load_trained(out_dir)
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  encoded = encode_source(trained, part_shard, emb, off,
                          out_dir / "rerank" / f"{layout.shard_name(i)}.npy", scale,
                          c.training_threads)
  for s, (lists, ids, codes) in encoded.items():
    order = np.argsort(lists, kind="stable")  # by partition, source order within each
    lists = lists[order]
    names, starts = np.unique(lists, return_index=True)
    arrays = {"partitions": names, "starts": np.append(starts, lists.size).astype(np.int64),
              "ids": ids[order], "codes": codes[order]}
    for name, a in arrays.items():
      layout.write_bytes_atomic(_encoded_path(out_dir, i, s, name), layout.npy_bytes(a))
  layout.write_json_atomic(_encoded_record(out_dir, i), {
      "counts": [int(encoded[s][1].size) for s in sorted(encoded)],
      "seconds": time.perf_counter() - t0})
  return True


def _open_encoded(out_dir: epath.Path, i: int, s: int) -> tuple[dict[int, tuple[int, int]], Any,
                                                                 Any]:
  """One part: ({partition: (first row, end row)}, ids, codes); ids and codes memory-mapped (or
  read by ranges on gs://), so a merge holds one partition's entries at a time."""
  names = _load_npy(_encoded_path(out_dir, i, s, "partitions")).tolist()
  starts = _load_npy(_encoded_path(out_dir, i, s, "starts")).tolist()
  rows = {p: (a, b) for p, a, b in zip(names, starts[:-1], starts[1:])}
  return (rows, npy_rows.open_rows(_encoded_path(out_dir, i, s, "ids")),
          npy_rows.open_rows(_encoded_path(out_dir, i, s, "codes")))


def merge_encoded(index, parts: Sequence[tuple[dict[int, tuple[int, int]], Any, Any]]) -> None:
  """Fills an empty (trained) index from parts in order: each partition gets its entries of the
  first part, then the second's, ... (one partition in memory at a time)."""
  ivf = _ivf(index)
  for p in sorted(set().union(*(rows for rows, _, _ in parts))):
    got = [(ids[rows[p][0]:rows[p][1]], codes[rows[p][0]:rows[p][1]])
           for rows, ids, codes in parts if p in rows]
    _set_list(ivf, int(p), np.concatenate([np.asarray(g[0], np.int64) for g in got]),
              np.concatenate([np.asarray(g[1], np.uint8) for g in got]))
  index.ntotal = ivf.ntotal


def merge_step(s: int, source_shards: Sequence[int], out_dir, trained=None) -> dict[str, int]:
  """Assembles serving/shard-s.faiss from every source's part for it (in source order), then its
  record. Kept when recorded. Returns {"count", "ram_bytes"}. In RAM: the serving shard's index
  and one partition's entries."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(_merged_record(out_dir, s))
  if rec is not None:
    return {"count": rec["count"], "ram_bytes": rec["ram_bytes"]}
  t0 = time.perf_counter()
  trained = (trained or load_trained(out_dir))[0]
  index = faiss.clone_index(trained)
  merge_encoded(index, [_open_encoded(out_dir, i, s) for i in sorted(source_shards)])
  _write_index(index, out_dir / "serving" / f"{layout.shard_name(s)}.faiss")
  stats = {"count": int(index.ntotal), "ram_bytes": memory_bytes(index)}
  layout.write_json_atomic(_merged_record(out_dir, s),
                           {**stats, "seconds": time.perf_counter() - t0})
  return stats


def finish_build(sources: Sequence[Source], out_dir) -> dict[str, Any]:
  """Writes the manifest (sha256 of every file; build seconds per step, summed over elements)
  once every serving shard is merged, then removes `parts/`. Returns the manifest."""
  out_dir = epath.Path(out_dir)
  rec = _read_json(out_dir / PARTS / TRAINED_RECORD)
  c = GlobalIndexConfig.from_json(rec["config"])
  merged = [_read_json(_merged_record(out_dir, s)) for s in range(c.serving_shards)]
  encoded = [_read_json(_encoded_record(out_dir, i)) for i, _, _ in sources]
  if any(m is None for m in merged + encoded):
    raise index_lib.IndexError_(f"{out_dir}: not every source is encoded and every serving "
                                "shard merged; run those steps first.")
  manifest = _manifest(out_dir, c, sources, merged)
  seconds = {"train": rec["seconds"], "encode": sum(e["seconds"] for e in encoded),
             "merge": sum(m["seconds"] for m in merged)}
  manifest["build_seconds"] = {**seconds, "total": sum(seconds.values())}
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
  for src in sources:
    if progress:
      print(f"  encoding embeddings shard {src[0]} ({src[1].shape[0]} rows)", flush=True)
    encode_step(src, out_dir, trained)
  for s in range(c.serving_shards):
    merge_step(s, [i for i, _, _ in sources], out_dir, trained)
  return finish_build(sources, out_dir)


def _load_npy(path: epath.Path) -> np.ndarray:
  return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)


def _manifest(out_dir: epath.Path, c: GlobalIndexConfig, sources: Sequence[Source],
              serving: Sequence[dict[str, int]]) -> dict[str, Any]:
  """`serving`: {"count", "ram_bytes"} of each serving shard."""
  files = [TRAINED, f"rerank/{SCALE}"]
  files += [f"serving/{layout.shard_name(s)}.faiss" for s in range(len(serving))]
  files += [f"rerank/{layout.shard_name(i)}.npy" for i, _, _ in sources]
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  n = sum(int(e.shape[0]) for _, e, _ in sources)
  return {
      "format_version": FORMAT_VERSION, "backend": BACKEND, "count": n,
      "dim": int(sources[0][1].shape[1]), "config": c.to_json(),
      "factory": _factory(int(sources[0][1].shape[1]), c),
      "versions": index_lib.package_versions(),
      "embeddings_shards": [{"shard": int(i), "offset": int(off), "count": int(e.shape[0])}
                            for i, e, off in sources],
      "serving_shards": [{"shard": s, "part_start": int(np.searchsorted(part_shard, s)),
                          "part_end": int(np.searchsorted(part_shard, s, side="right")),
                          "count": int(st["count"]), "ram_bytes": int(st["ram_bytes"])}
                         for s, st in enumerate(serving)],
      "files": {f: {"sha256": layout.sha256_file(out_dir / f),
                    "bytes": (out_dir / f).stat().length} for f in files},
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


def verify(index_dir, manifest: dict[str, Any] | None = None) -> None:
  index_dir = epath.Path(index_dir)
  manifest = manifest or read_manifest(index_dir)
  fix = "rerun `python -m retro_jax.build_db --stages=index`"
  for name, rec in manifest["files"].items():
    path = index_dir / name
    if not path.exists():
      raise index_lib.IndexError_(f"Global index file {path} is missing; {fix}.")
    if path.stat().length != rec["bytes"] or layout.sha256_file(path) != rec["sha256"]:
      raise index_lib.IndexError_(f"Global index file {path} is corrupt (sha256 mismatch with "
                                  f"{index_dir / layout.MANIFEST}); {fix}.")


# ----------------------------------------------------------------------------------------------
# Search.


class GlobalIndex(index_lib.IndexShard):
  """The whole database (or serving shards of it) as one searcher over global ids `[0, N)`."""

  exact_scores = True  # scores are the int8 rerank's; the retriever need not rescore
  contiguous_ids = False  # a serving shard's ids are its partitions' members, anywhere in [0, N)

  def __init__(self, index_dir, serving: Sequence[int] | None = None, verify_files: bool = True,
               nprobe: int | None = None):
    self.index_dir = epath.Path(index_dir)
    self.manifest = read_manifest(self.index_dir)
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise index_lib.IndexError_(f"Global index {self.index_dir} has format version "
                                  f"{self.manifest.get('format_version')}; rebuild it.")
    if verify_files:
      verify(self.index_dir, self.manifest)
    self.config = GlobalIndexConfig.from_json(self.manifest["config"])
    if nprobe:
      self.config = dataclasses.replace(self.config, nprobe=nprobe)
    self.offset, self.total = 0, int(self.manifest["count"])
    self._dim = int(self.manifest["dim"])
    trained = _read_index(self.index_dir / TRAINED)
    self.quantizer = faiss.extract_index_ivf(trained).quantizer
    self._trained = trained
    _set_quantizer_search(trained, self.config.nprobe)
    self.nlist = int(self.config.nlist)
    self.part_shard = _partition_shard(self.nlist, int(self.config.serving_shards))
    all_shards = [s["shard"] for s in self.manifest["serving_shards"]]
    self.serving_ids = list(all_shards if serving is None else serving)
    bad = sorted(set(self.serving_ids) - set(all_shards))
    if bad:
      raise index_lib.IndexError_(f"Global index {self.index_dir} has serving shards "
                                  f"{all_shards}; {bad} do not exist.")
    self.serving = {s: _read_index(self.index_dir / "serving" / f"{layout.shard_name(s)}.faiss")
                    for s in self.serving_ids}
    self._set_count()
    self.scale_D = _load_npy(self.index_dir / "rerank" / SCALE).astype(np.float32)
    es = self.manifest["embeddings_shards"]
    self._rr_offsets = np.array([e["offset"] for e in es], np.int64)
    self._rr = [npy_rows.open_rows(self.index_dir / "rerank" / f"{layout.shard_name(e['shard'])}.npy")
                for e in es]  # memory-mapped, or ranged reads on gs://

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
    other._set_count()
    return other

  def memory_bytes(self) -> int:
    return sum(memory_bytes(i) for i in self.serving.values())

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

  def _scan(self, s: int, queries_QxD, parts_QxP, dis_QxP, r: int):
    mask = (parts_QxP >= 0) & (self.part_shard[np.maximum(parts_QxP, 0)] == s)
    if not mask.any():
      return None
    assign = np.ascontiguousarray(np.where(mask, parts_QxP, -1), np.int64)
    dis = np.ascontiguousarray(dis_QxP, np.float32)
    q, p = assign.shape
    d_QxR = np.empty((q, r), np.float32)
    i_QxR = np.empty((q, r), np.int64)
    params = faiss.SearchParametersIVF()
    params.nprobe = p
    idx = self.serving[s]
    idx.search_preassigned_c(q, faiss.swig_ptr(queries_QxD), r, faiss.swig_ptr(assign),
                             faiss.swig_ptr(dis), faiss.swig_ptr(d_QxR), faiss.swig_ptr(i_QxR),
                             False, params)
    return i_QxR

  def rerank_scores(self, queries_QxD: np.ndarray, ids_QxR: np.ndarray) -> np.ndarray:
    """float32 [Q, R]: dot products with the int8 copies of these ids (-inf where id < 0)."""
    q, r = ids_QxR.shape
    valid = ids_QxR >= 0
    flat = np.where(valid, ids_QxR, 0).reshape(-1)
    rows = np.empty((flat.size, self.dim), np.int8)
    which = np.searchsorted(self._rr_offsets, flat, side="right") - 1
    if len(self._rr) == 1:
      rows[:] = self._rr[0][flat]
    else:
      for j in np.unique(which):
        m = which == j
        rows[m] = self._rr[j][flat[m] - self._rr_offsets[j]]
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
    return index_lib.top_k_rows(ids, self.rerank_scores(queries_QxD, ids), n)

  def search(self, queries_QxD, n):
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
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
  """True when `root` has a manifest covering exactly these embeddings shards (the `parts/` of
  a build killed after its manifest was written are removed)."""
  if not (epath.Path(root) / layout.MANIFEST).exists():
    return False
  if (epath.Path(root) / PARTS).exists():
    (epath.Path(root) / PARTS).rmtree()
  built = [(e["shard"], e["offset"], e["count"]) for e in read_manifest(root)["embeddings_shards"]]
  return built == [(int(i), int(off), int(e.shape[0])) for i, e, off in sources]


def add_sources(root, sources: Sequence[Source]) -> dict[str, Any]:
  """Encodes the sources (all of the database's embeddings shards) that the built index does not
  hold yet (documents added by `retro_jax.db.edit`) with the trained partitioner and quantizer:
  each new vector goes to its partition's serving shard, whose file is rewritten atomically, then
  the manifest (removed first, so an interrupted add is never mistaken for a finished index)."""
  root = epath.Path(root)
  manifest = read_manifest(root)
  verify(root, manifest)
  have = {e["shard"] for e in manifest["embeddings_shards"]}
  new = [src for src in sources if src[0] not in have]
  if not new:
    return manifest
  c = GlobalIndexConfig.from_json(manifest["config"])
  trained = _read_index(root / TRAINED)
  scale = _load_npy(root / "rerank" / SCALE).astype(np.float32)
  part_shard = _partition_shard(c.nlist, c.serving_shards)
  serving = [_read_index(root / "serving" / f"{layout.shard_name(s['shard'])}.faiss")
             for s in manifest["serving_shards"]]
  encoded = [encode_source(trained, part_shard, emb, off,
                           root / "rerank" / f"{layout.shard_name(i)}.npy", scale,
                           c.training_threads) for i, emb, off in new]
  (root / layout.MANIFEST).unlink()
  for s, idx in enumerate(serving):
    append_encoded(idx, [e[s] for e in encoded])
    _write_index(idx, root / "serving" / f"{layout.shard_name(s)}.faiss")
  done = sorted([src for src in sources if src[0] in have] + new, key=lambda t: t[2])
  out = _manifest(root, c, done, [{"count": int(i.ntotal), "ram_bytes": memory_bytes(i)}
                                  for i in serving])
  out["build_seconds"] = manifest.get("build_seconds")
  layout.write_json_atomic(root / layout.MANIFEST, out)
  return out
