"""Index shards: one nearest-neighbour searcher per contiguous chunk-id range.

Each shard covers global chunk ids `[offset, offset + count)` (count < 2^31, document aligned; the
chunk store provides the ranges) and holds a searcher over that shard's float32, L2-normalised
embeddings (`[count, D]`, read with `np.load(mmap_mode='r')`). Three backends share one interface
(`IndexShard.search(queries_QxD, n) -> (local_ids_QxN int64, scores_QxN float32)`):

- `scann` (default): spherical tree + SOAR + anisotropic hashing + float32 reorder.
- `exact`: JAX brute force, blocked over the database (never the whole shard in one array).
- `faiss`: a faiss `index_factory` string (e.g. `IVF286,PQ192x4fs,RFlat`), for comparison.

A shard is serialised to a directory with `manifest.json` (offset, count, backend config, package
versions, sha256 of every serialised file), written last so that its presence marks a finished
shard. Loading verifies the checksums and raises `IndexError_` naming the file on any mismatch.

Shard directories and embeddings may be on gs:// (through retro_jax.db.layout): a shard is
serialised in a local scratch directory and copied into place, manifest last (`layout.staged_dir`);
ScaNN reads its searcher only from a local directory, so a remote shard is copied once into the
local cache (`layout.local_dir`, keyed by the manifest: bounded by the index shard's size, not the
database's); faiss files are read as bytes. Embeddings are read by rows (retro_jax.db.npy_rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import metadata
from typing import Any, Sequence

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import scann
from etils import epath

from retro_jax.db import layout, npy_rows
from retro_jax.db.layout import sha256_file
from retro_jax.errors import UserError
from retro_jax.retrieval.backends import (  # noqa: F401 -- index_lib.GLOBAL_BACKEND etc.
    ALL_BACKENDS, BACKENDS, DEFAULT_BACKEND, GLOBAL_BACKEND)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_SHARD_POINTS = 2**31 - 1  # ScaNN point indices are 32-bit.


class IndexError_(UserError, ValueError):  # noqa: N801 -- avoid shadowing the builtin IndexError.
  """A missing, corrupt or mismatched index shard (the message names the file and the fix)."""


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """How to build and search a shard. Fields that are None are derived from the shard size."""
  backend: str = DEFAULT_BACKEND
  # ScaNN.
  # Defaults chosen with bench/ann_recall.py: 2*sqrt(n) leaves, 6% of them searched, 60 reordered.
  num_leaves: int | None = None        # default ~ 2 * sqrt(count)
  leaves_to_search: int | None = None  # default ~ leaves_to_search_frac * num_leaves
  leaves_to_search_frac: float = 0.06
  reorder: int = 60                    # candidates rescored in float32 inside ScaNN
  soar_lambda: float | None = 1.5      # None disables SOAR
  overretrieve_factor: float = 1.2
  spherical: bool = True
  quantize_centroids: bool = False     # int8 centroid scoring in the tree
  dims_per_block: int = 2
  aq_threshold: float = 0.2
  training_sample_size: int = 100_000
  training_threads: int = 1            # 1 keeps the build repeatable
  # Exact (JAX) backend.
  block_size: int = 16_384
  # faiss backend. The factory may name {nlist} (IVF lists, default ~1.37 * sqrt(count)) and {pq}
  # (fast-scan sub-quantizers: half the embedding width); settings chosen with bench/ann_recall.py.
  faiss_factory: str = "IVF{nlist},PQ{pq}x4fs,RFlat"
  faiss_nlist: int | None = None
  faiss_min_points: int = 4096  # smaller shards: exact "Flat" (PQ training needs data)
  faiss_nprobe: int = 32
  faiss_k_factor: int = 4

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"Unknown index backend {self.backend!r}; expected one of {BACKENDS}.")

  def resolved(self, count: int) -> "IndexConfig":
    """Fills in the size-dependent defaults for a shard of `count` points."""
    num_leaves = self.num_leaves or max(1, min(int(round(2 * math.sqrt(count))), count // 50 or 1))
    leaves_to_search = self.leaves_to_search or max(
        1, int(round(self.leaves_to_search_frac * num_leaves)))
    nlist = self.faiss_nlist or max(1, min(int(round(1.37 * math.sqrt(count))), count // 39 or 1))
    factory = self.faiss_factory
    if count < self.faiss_min_points and factory == IndexConfig.faiss_factory:
      factory = "Flat"
    return dataclasses.replace(self, num_leaves=num_leaves,
                               leaves_to_search=min(leaves_to_search, num_leaves),
                               faiss_nlist=nlist, faiss_factory=factory)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "IndexConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def package_versions() -> dict[str, str]:
  out = {}
  for name in ("scann", "faiss-cpu", "jax", "numpy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def load_embeddings(path: str) -> np.ndarray:
  """Opens a `[n, D]` float32 embeddings `.npy` file for row reads (memory-mapped, or ranged reads
  on gs://), with a clear error when it is wrong."""
  if not epath.Path(path).exists():
    raise IndexError_(f"Embeddings file {path} does not exist; run the embedding stage first.")
  try:
    emb_NxD = npy_rows.open_rows(path)
  except ValueError as e:
    raise IndexError_(f"Embeddings file {path} is not a readable .npy array ({e}); rebuild it.")
  if emb_NxD.ndim != 2 or emb_NxD.dtype != np.float32:
    raise IndexError_(f"Embeddings file {path} has shape {emb_NxD.shape} dtype {emb_NxD.dtype}; "
                      "expected a 2-D float32 array.")
  if emb_NxD.shape[0] > MAX_SHARD_POINTS:
    raise IndexError_(f"Embeddings file {path} has {emb_NxD.shape[0]} rows, over the 2^31 "
                      "per-shard limit; split it into more shards.")
  return emb_NxD


def _top_k_merge(ids_a, scores_a, ids_b, scores_b, k):
  """Merges two (ids, scores) candidate sets per row into the top k by score (ties: lower id)."""
  ids = np.concatenate([ids_a, ids_b], axis=1)
  scores = np.concatenate([scores_a, scores_b], axis=1)
  return top_k_rows(ids, scores, k)


def top_k_rows(ids_QxC: np.ndarray, scores_QxC: np.ndarray, k: int):
  """Top k per row by descending score, ties broken by ascending id; -inf entries count as empty."""
  q, c = ids_QxC.shape
  # lexsort over the last axis: primary key last.
  order_QxC = np.lexsort((ids_QxC, -scores_QxC), axis=1)[:, :k]
  ids = np.take_along_axis(ids_QxC, order_QxC, axis=1)
  scores = np.take_along_axis(scores_QxC, order_QxC, axis=1)
  if c < k:
    ids = np.concatenate([ids, np.full((q, k - c), -1, np.int64)], axis=1)
    scores = np.concatenate([scores, np.full((q, k - c), -np.inf, np.float32)], axis=1)
  ids = np.where(np.isneginf(scores), -1, ids).astype(np.int64)
  return ids, scores.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Backends.


class IndexShard:
  """A searcher over one contiguous chunk-id range `[offset, offset + count)`."""

  # True when `search` already returns exact float32 dot products against the stored embeddings
  # (the exact backend; ScaNN's float32 reorder), so the retriever may skip its own rescoring.
  exact_scores = False
  # True: the shard holds exactly the ids [offset, offset + count) (the per-shard backends); the
  # global index's serving shards hold their partitions' members instead.
  contiguous_ids = True

  def __init__(self, embeddings_path: str, offset: int, config: IndexConfig):
    self.embeddings_path = embeddings_path
    self.embeddings_NxD = load_embeddings(embeddings_path)
    self.offset = int(offset)
    self.count = int(self.embeddings_NxD.shape[0])
    self.config = config.resolved(self.count)

  @property
  def dim(self) -> int:
    return int(self.embeddings_NxD.shape[1])

  def search(self, queries_QxD: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (local_ids_QxN int64, approximate scores_QxN float32); -1 ids pad missing slots."""
    raise NotImplementedError

  def reached(self, queries_QxD: np.ndarray, n: int) -> np.ndarray:
    """bool [Q]: the queries a search for n candidates visits this searcher for (all of them;
    a serving shard of the global index only those whose route reaches its partitions)."""
    return np.ones(len(queries_QxD), bool)

  def save(self, directory: str) -> list[str]:
    """Writes the backend's files into `directory`; returns their names (relative)."""
    raise NotImplementedError

  def load(self, directory: str) -> None:
    raise NotImplementedError

  def build(self) -> None:
    raise NotImplementedError


class ExactShard(IndexShard):
  """JAX brute force: blocked `Q x B` matmuls with a running `lax.top_k` merge."""

  exact_scores = True

  def build(self) -> None:
    pass

  def save(self, directory: str) -> list[str]:
    return []  # Reads the embeddings themselves; their checksum is in the manifest.

  def load(self, directory: str) -> None:
    pass

  def search(self, queries_QxD, n):
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    q = queries_QxD.shape[0]
    bsz = min(self.config.block_size, self.count)
    best_ids = np.full((q, 0), -1, np.int64)
    best_scores = np.full((q, 0), -np.inf, np.float32)
    q_dev = jnp.asarray(queries_QxD)
    for start in range(0, self.count, bsz):
      block = np.asarray(self.embeddings_NxD[start:start + bsz], np.float32)
      valid = block.shape[0]
      if valid < bsz:  # Pad the last block so that every call has one shape (one compile).
        block = np.concatenate([block, np.zeros((bsz - valid, block.shape[1]), np.float32)])
      s, i = _block_top_k(q_dev, jnp.asarray(block), valid, min(n, bsz))
      best_ids, best_scores = _top_k_merge(best_ids, best_scores, np.asarray(i, np.int64) + start,
                                           np.asarray(s, np.float32), n)
    if best_ids.shape[1] < n:
      best_ids, best_scores = top_k_rows(best_ids, best_scores, n)
    return best_ids, best_scores


def _block_top_k_impl(q_QxD, block_BxD, valid, k):
  s_QxB = jnp.dot(q_QxD, block_BxD.T, precision=jax.lax.Precision.HIGHEST)
  s_QxB = jnp.where(jnp.arange(block_BxD.shape[0])[None, :] < valid, s_QxB, -jnp.inf)
  return jax.lax.top_k(s_QxB, k)


def _block_top_k(q_QxD, block_BxD, valid, k):
  global _block_top_k_jit
  if _block_top_k_jit is None:
    _block_top_k_jit = jax.jit(_block_top_k_impl, static_argnames="k")
  return _block_top_k_jit(q_QxD, block_BxD, valid, k=k)


_block_top_k_jit = None


class ScannShard(IndexShard):
  """ScaNN: spherical k-means tree (+ SOAR spilling), AH scoring, float32 reorder."""

  exact_scores = True  # every returned neighbour went through the float32 reorder

  searcher = None

  def build(self) -> None:
    c = self.config
    db_NxD = np.ascontiguousarray(self.embeddings_NxD, np.float32)  # ScaNN copies it anyway.
    k = max(1, min(10, self.count))
    b = scann.scann_ops_pybind.builder(db_NxD, k, "dot_product")
    b = b.set_n_training_threads(c.training_threads)
    if c.num_leaves > 1:
      tree_kw = dict(num_leaves=c.num_leaves, num_leaves_to_search=c.leaves_to_search,
                     training_sample_size=min(c.training_sample_size, self.count),
                     spherical=c.spherical, quantize_centroids=c.quantize_centroids,
                     random_init=False)
      if c.soar_lambda is not None:
        tree_kw.update(soar_lambda=c.soar_lambda, overretrieve_factor=c.overretrieve_factor)
      b = b.tree(**tree_kw)
    b = b.score_ah(c.dims_per_block, anisotropic_quantization_threshold=c.aq_threshold)
    b = b.reorder(c.reorder)
    self.searcher = b.build()

  def save(self, directory: str) -> list[str]:
    self.searcher.serialize(directory, relative_path=True)
    return sorted(os.listdir(directory))

  def load(self, directory: str) -> None:
    manifest = epath.Path(directory) / MANIFEST
    key = sha256_file(manifest) if manifest.exists() else ""
    self.searcher = scann.scann_ops_pybind.load_searcher(layout.local_dir(directory, key))

  def set_num_threads(self, n: int) -> None:
    self.searcher.set_num_threads(n)

  def search(self, queries_QxD, n, leaves_to_search=None, reorder=None):
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    n_eff = min(n, self.count)
    pre = max(reorder or self.config.reorder, n_eff)
    idx, dist = self.searcher.search_batched_parallel(
        queries_QxD, final_num_neighbors=n_eff, pre_reorder_num_neighbors=pre,
        leaves_to_search=leaves_to_search or self.config.leaves_to_search)
    idx = np.asarray(idx).astype(np.int64)
    dist = np.asarray(dist, np.float32)
    if idx.shape[1] < n:
      pad = n - idx.shape[1]
      idx = np.concatenate([idx, np.full((idx.shape[0], pad), -1, np.int64)], axis=1)
      dist = np.concatenate([dist, np.full((idx.shape[0], pad), -np.inf, np.float32)], axis=1)
    dist = np.where(idx < 0, -np.inf, dist).astype(np.float32)
    return idx, dist


class FaissShard(IndexShard):
  """faiss `index_factory(D, factory, METRIC_INNER_PRODUCT)` (the default backend)."""

  index = None
  FILE = "faiss.index"

  def build(self) -> None:
    c = self.config
    db_NxD = np.ascontiguousarray(self.embeddings_NxD, np.float32)
    factory = c.faiss_factory.format(nlist=c.faiss_nlist, pq=db_NxD.shape[1] // 2)
    self.index = faiss.index_factory(db_NxD.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(c.training_threads)  # OpenMP spin-waits badly on a busy machine.
    try:
      self.index.train(db_NxD)
      self.index.add(db_NxD)
    finally:
      faiss.omp_set_num_threads(threads)
    self._set_params()

  def _set_params(self):
    c = self.config
    try:
      ivf = faiss.extract_index_ivf(self.index)
      ivf.nprobe = c.faiss_nprobe
    except RuntimeError:
      pass
    if isinstance(self.index, faiss.IndexRefine):
      self.index.k_factor = c.faiss_k_factor

  def save(self, directory: str) -> list[str]:
    faiss.write_index(self.index, os.path.join(directory, self.FILE))
    return [self.FILE]

  def load(self, directory: str) -> None:
    data = (epath.Path(directory) / self.FILE).read_bytes()  # local or gs://
    self.index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    self._set_params()

  def search(self, queries_QxD, n):
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    scores, idx = self.index.search(queries_QxD, n)
    idx = idx.astype(np.int64)
    scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
    return idx, scores


_BACKEND_CLASSES = {"scann": ScannShard, "exact": ExactShard, "faiss": FaissShard}


def make_shard(embeddings_path: str, offset: int, config: IndexConfig) -> IndexShard:
  return _BACKEND_CLASSES[config.backend](embeddings_path, offset, config)


# ----------------------------------------------------------------------------------------------
# Build / save / load with a manifest.


def build_shard(embeddings_path: str, offset: int, config: IndexConfig,
                out_dir: str | None = None) -> IndexShard:
  """Builds the searcher for one shard; if `out_dir` is given, serialises it there atomically."""
  shard = make_shard(embeddings_path, offset, config)
  shard.build()
  if out_dir is not None:
    save_shard(shard, out_dir)
  return shard


def save_shard(shard: IndexShard, out_dir: str) -> None:
  """Writes `out_dir/` (backend files + manifest.json) in a local scratch directory, then puts it
  in place (a rename locally; on gs:// an upload, manifest last: layout.staged_dir)."""
  emb = shard.embeddings_path
  with layout.staged_dir(out_dir, last=MANIFEST) as tmp:
    files = shard.save(tmp)
    manifest = {
        "format_version": FORMAT_VERSION,
        "backend": shard.config.backend,
        "offset": shard.offset,
        "count": shard.count,
        "dim": int(shard.embeddings_NxD.shape[1]),
        "config": shard.config.to_json(),
        "versions": package_versions(),
        "embeddings": {"path": os.fspath(emb) if layout.is_remote(emb) else os.path.abspath(emb),
                       "bytes": layout.file_size(emb), "sha256": sha256_file(emb)},
        "files": {f: sha256_file(os.path.join(tmp, f)) for f in files},
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)


def read_manifest(shard_dir: str) -> dict[str, Any]:
  path = epath.Path(shard_dir) / MANIFEST
  if not path.exists():
    raise IndexError_(f"Index shard manifest {path} is missing: the shard was never built or its "
                      "build was interrupted; rerun `python -m retro_jax.build_db --stages=index`.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexError_(f"Index shard manifest {path} is corrupt ({e}); delete {shard_dir} and "
                      "rerun `python -m retro_jax.build_db --stages=index`.")


def verify_shard(shard_dir: str, manifest: dict[str, Any] | None = None,
                 embeddings_path: str | None = None, check_embeddings: bool = True) -> None:
  """Checks every serialised file (and the embeddings) against the manifest's sha256 sums."""
  manifest = manifest or read_manifest(shard_dir)
  fix = f"delete {shard_dir} and rerun `python -m retro_jax.build_db --stages=index`"
  for name, digest in manifest["files"].items():
    path = epath.Path(shard_dir) / name
    if not path.exists():
      raise IndexError_(f"Index shard file {path} is missing; {fix}.")
    if sha256_file(path) != digest:
      raise IndexError_(f"Index shard file {path} is corrupt (sha256 mismatch with "
                        f"{epath.Path(shard_dir) / MANIFEST}); {fix}.")
  emb = embeddings_path or manifest["embeddings"]["path"]
  if not epath.Path(emb).exists():
    raise IndexError_(f"Embeddings file {emb} used by index shard {shard_dir} is missing.")
  if check_embeddings:
    if (layout.file_size(emb) != manifest["embeddings"]["bytes"]
        or sha256_file(emb) != manifest["embeddings"]["sha256"]):
      raise IndexError_(f"Embeddings file {emb} differs from the one index shard {shard_dir} was "
                        f"built from (sha256 mismatch); {fix}.")


def load_shard(shard_dir: str, embeddings_path: str | None = None, verify: bool = True,
               config_overrides: dict[str, Any] | None = None) -> IndexShard:
  """Loads a serialised shard after verifying its checksums (`IndexError_` naming the bad file)."""
  manifest = read_manifest(shard_dir)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise IndexError_(f"Index shard {shard_dir} has format version "
                      f"{manifest.get('format_version')}, expected {FORMAT_VERSION}; rebuild it.")
  emb = embeddings_path or manifest["embeddings"]["path"]
  if verify:
    verify_shard(shard_dir, manifest, emb)
  config = IndexConfig.from_json(manifest["config"])
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  shard = make_shard(emb, manifest["offset"], config)
  if shard.count != manifest["count"]:
    raise IndexError_(f"Embeddings file {emb} has {shard.count} rows but index shard {shard_dir} "
                      f"was built for {manifest['count']}; rebuild the shard.")
  shard.load(shard_dir)
  return shard


def shard_offsets(embedding_paths: Sequence[str]) -> list[int]:
  """Global id offsets for contiguous shards: the running sum of the shards' row counts."""
  offsets, total = [], 0
  for p in embedding_paths:
    offsets.append(total)
    total += int(load_embeddings(p).shape[0])
  return offsets
