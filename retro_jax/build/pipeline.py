r"""The retrieval-database build as Apache Beam pipelines over the stage functions.

Each stage (retro_jax/build/stages.py runs them in order, skipping finished ones) is one pipeline:

  tokenizer   one element: `prepare.build_tokenizer` (SentencePiece on a deterministic sample of the
              non-held-out documents, on one worker), or the given --tokenizer copied; a
              planned corpus (random-access tfds:, or files: directories, documentation trees,
              .jsonl, the Wikipedia leads): its training lines counted, sampled and read in
              parallel per range of documents (per unit of files), then one element trains on
              them (the whole read's model below prepare.INPUT_SENTENCE_SIZE lines).
  chunks      a planned corpus is classified in parallel blocks (of records; of files or a
              .jsonl's byte ranges, `corpus.FileCorpus`: the launcher lists names and sizes
              only), one element picks the documents (the ids and stats of a whole read), and
              each shard's worker reads only its own records (`chunk_store.write_store_shard_docs`);
              then one element writes the manifest (`finalize_chunk_store`). Any other corpus is
              read whole by the planner and by every shard's worker.
  embeddings  one element per block of `EMBED_BLOCK_ROWS` rows of a store shard: a DoFn that loads
              the JAX MiniLM once per worker (`setup`) embeds the block into a part file
              (`layout.embedding_part_path`, written atomically, so a finished part is never redone);
              the parts are grouped by shard and assembled into `embeddings/shard-XXXXX.npy`
              (the same bytes as `embed.embed_shard`'s, block for block).
  index       the global index (retro_jax.retrieval.global_index's build steps): SamplePicks
              (one element: the training sample's rows, by encode group) -> ReadSample (in
              parallel, per encode group) -> TrainOnSample (one element: partitioner, quantizer
              and int8 scale trained on the sample, written with a record; from a sample of
              parallel_train_min_sample vectors on, k-means in parallel instead: TrainCoarse (one
              element, a bounded sub-sample) -> AssignSample (per sample group) ->
              GroupByKey(coarse cell) -> TrainCell (per cell: its share of nlist) ->
              TrainOnSample (the cells' centroids and the PQ)) -> EncodeGroup (one
              element per encode group of embeddings shards, from plan ranges: the int8 rerank
              rows and the (partition, id, PQ code) of each serving shard as part files) ->
              GroupByKey(serving shard) -> MergeServingShard (serving/shard-XXXXX.faiss and its
              rerank copy from the parts, streamed in encode-group order: the plain build's
              bytes) -> Manifest (one writer, last). Per-shard backends: one element per
              embeddings shard.
  neighbours  the global index: a routed batch job over query blocks (NEIGHBOURS_BLOCK_ROWS rows
              of a store shard) in rounds: route each query to its nearest partitions (the
              trained quantizer only) -> GroupByKey(serving shard) -> search there (a worker
              loads that serving shard only; own-document exclusion and refill) -> GroupByKey
              (block) -> per-query top-k combine and the held-out filter
              (`neighbours.keep_round`); rows still short of k go to the next round with twice
              the candidates (the in-process `search_block`'s rounds, unrolled). Finished
              blocks are part files, assembled per store shard with the progress record: the
              in-process search's bytes. Per-shard backends: one element per store shard
              (`neighbours.neighbours_shard`), the index loaded once per worker.

Every element skips finished work, so a killed pipeline started again redoes only unfinished
blocks and shards. A rerun of a finished embeddings, index or neighbours stage runs a small
"check" pipeline over shard ranges instead (each shard's files against their recorded sizes), so
that a missing or cut-short file is rebuilt without the launcher statting every shard. Runner options are Beam's own flags (`--runner`, `--direct_num_workers`,
`--direct_running_mode`, Dataflow's `--project/--region/--temp_location`, ...): see docs/beam.md.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import json
import logging
import os
import re
import time
from typing import Any, Iterator, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    StandardOptions,
    _BeamArgumentParser,
)
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from etils import epath

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.build import plan as plan_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus as corpus_lib
from retro_jax.db import layout
from retro_jax.db import prepare as prepare_lib
from retro_jax.db import provenance
from retro_jax.db import tokenizer as tokenizer_lib
from retro_jax.db.layout import write_bytes_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.embedder import Embedder

# Rows per embedding element: embed.embed_to_npy's block, so the assembled shard is its bytes.
EMBED_BLOCK_ROWS = 4096


def unknown_options(beam_args: Sequence[str]) -> list[str]:
  """The arguments that no Beam PipelineOptions defines (Beam would drop them with a warning):
  parsed as Beam parses them, every options class's flags known."""
  parser = _BeamArgumentParser(allow_abbrev=False)  # Beam's own (value-provider arguments too)
  seen = set()
  for cls in PipelineOptions.__subclasses__():
    if cls.__name__ not in seen:  # (a class defined twice adds its flags once)
      seen.add(cls.__name__)
      cls._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(list(beam_args))
  return unknown


def pipeline_options(beam_args: Sequence[str] | None) -> PipelineOptions:
  """Beam's options from its flags; with none, the in-process DirectRunner. Local workers log
  critical errors only unless `--default_sdk_harness_log_level` says otherwise: a failing
  element's error comes back to the launcher in the exception."""
  args = list(beam_args or ["--runner=DirectRunner"])
  local = PipelineOptions(args).view_as(StandardOptions).runner in (None, "DirectRunner")
  if local and not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=CRITICAL")
  return PipelineOptions(args)


class WorkerUserError(UserError, RuntimeError):
  """A user error (bad corpus, mismatched inputs, ...) raised in a worker process."""


_REMOTE_ERROR = re.compile(r"^(retro_jax(?:\.\w+)+)\.(\w+): (.+)$", re.M)


def user_error_of(e: Exception) -> UserError | None:
  """The retro_jax UserError a worker process's traceback (in `e`'s message) ends with, if any,
  so that the command prints its one line instead of the worker's traceback."""
  if isinstance(e, UserError):
    return e
  for module, name, message in _REMOTE_ERROR.findall(str(e)):
    try:
      cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
      continue
    if isinstance(cls, type) and issubclass(cls, UserError):
      return WorkerUserError(message)
  return None


def pipeline(beam_args: Sequence[str] | None) -> beam.Pipeline:
  """A pipeline on the runner `beam_args` name. The DirectRunner is Beam's FnApiRunner here (its
  in-process, multi-threading and multi-processing modes), not the Prism runner that Beam's
  DirectRunner would first download from GitHub."""
  options = pipeline_options(beam_args)
  if options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
    return beam.Pipeline(options=options)
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  provision = fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
  return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision), options=options)


def worker_env(beam_args: Sequence[str] | None, stage: str = "embeddings",
               cores: int | None = None) -> dict[str, str]:
  """Environment for local multi-processing workers of the stages with many elements (embeddings,
  neighbours): each worker's XLA and OpenMP (faiss) thread pools sized to its share of the cores,
  so that N workers do not each spin on every core. The index stage keeps every core per
  worker: its training step is one element."""
  if stage not in ("embeddings", "neighbours"):
    return {}
  opts = pipeline_options(beam_args).get_all_options()
  workers = opts.get("direct_num_workers") or 1
  if opts.get("direct_running_mode") != "multi_processing" or workers <= 1:
    return {}
  threads = max(1, (cores or os.cpu_count() or 1) // workers)
  xla = os.environ.get("XLA_FLAGS", "")
  if threads == 1:
    xla += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  return {"XLA_FLAGS": xla.strip(), "OMP_NUM_THREADS": str(threads),
          WORKER_CORES_ENV: str(threads)}


WORKER_CORES_ENV = "RETRO_JAX_BEAM_WORKER_CORES"


def pin_worker() -> None:
  """In a local multi-processing worker (worker_env set WORKER_CORES_ENV), binds this process's
  threads started from now on (XLA's, OpenMP's) to its own cores: worker i (the runner's
  WORKER_ID) gets cores [i * n, i * n + n) mod the cores, so that workers do not thrash."""
  per = int(os.environ.get(WORKER_CORES_ENV, "0") or 0)
  worker = os.environ.get("WORKER_ID", "").rpartition("_")[2]
  if per <= 0 or not worker.isdigit() or not hasattr(os, "sched_setaffinity"):
    return
  cores = sorted(os.sched_getaffinity(0))
  first = int(worker) * per % len(cores)
  os.sched_setaffinity(0, set(cores[first:first + per]) or set(cores))


# ------------------------------------------------------------------------------------------------
# Reading documents (cached per worker process: every chunk element needs its shard's documents
# and their global document ids, which depend on every earlier document).


@functools.lru_cache(maxsize=2)
def _documents(spec: str, max_docs: int | None) -> tuple[list[corpus_lib.Document], dict]:
  stats = corpus_lib.CorpusStats()
  docs = corpus_lib.read_documents(spec, stats, max_docs=max_docs)
  return docs, stats.to_json()


def _plan_store_shards(spec: str, cfg: dict[str, Any]) -> Iterator[int]:
  docs, _ = _documents(spec, cfg["max_docs"])
  yield from range(-(-len(docs) // cfg["docs_per_shard"]))


class _WriteStoreShard(beam.DoFn):
  """Tokenises and chunks one store shard (kept when finished); yields (shard, written)."""

  def __init__(self, db: str, cfg: dict[str, Any]):
    self._db, self._cfg = db, cfg

  def setup(self):
    cfg = self._cfg
    self._tok = prepare_lib.load_db_tokenizer(self._db)
    self._settings = chunk_store_lib.store_settings(
        self._tok, cfg["corpus"], cfg["chunk_size"], cfg["docs_per_shard"], cfg["heldout_fraction"],
        cfg["seed"], cfg["max_docs"])

  def process(self, shard: int):
    docs, stats = _documents(self._cfg["corpus"], self._cfg["max_docs"])
    num_store_shards = -(-len(docs) // self._cfg["docs_per_shard"])
    written = chunk_store_lib.write_store_shard(
        layout.chunks_dir(self._db), shard, docs, self._tok, self._settings,
        {**stats, "num_store_shards": num_store_shards})
    yield shard, written


class _WriteSelectedShard(_WriteStoreShard):
  """A store shard of a planned corpus (random-access or files): reads only its own record
  spans, planned by `_select_shards` (the same ids and corpus stats as reading the whole
  corpus)."""

  def __init__(self, db: str, cfg: dict[str, Any], source):
    super().__init__(db, cfg)
    self._source = source

  def process(self, item: tuple[int, list, int, dict]):
    shard, spans, num_docs, stats = item
    written = chunk_store_lib.write_store_shard_docs(
        layout.chunks_dir(self._db), shard, lambda: self._source.read(spans, num_docs), self._tok,
        self._settings, stats)
    yield shard, written


def _select_shards(scans: list[dict], source, cfg: dict[str, Any]
                   ) -> Iterator[tuple[int, list, int, dict]]:
  """(shard, its record spans, its document count, corpus stats) of every store shard."""
  sel = source.select(scans, cfg["max_docs"])
  per = cfg["docs_per_shard"]
  num_store_shards = -(-sel.num_docs // per)
  stats_json = {**sel.stats.to_json(), "num_store_shards": num_store_shards}
  for shard in range(num_store_shards):
    first, stop = shard * per, min(sel.num_docs, (shard + 1) * per)
    yield shard, sel.spans(first, stop), stop - first, stats_json


def _finalize(results: list[tuple[int, bool]], db: str) -> dict:
  chunk_store_lib.finalize_chunk_store(layout.chunks_dir(db))
  written = sorted(s for s, w in results if w)
  print(f"[build_db] chunks: wrote shards {written}, kept {len(results) - len(written)}", flush=True)
  return {"written": written}


# ------------------------------------------------------------------------------------------------
# Embeddings.


def _unfinished_blocks(rows: tuple[int, int], db: str, block_rows: int, shard_path
                       ) -> Iterator[tuple[int, int, int]]:
  """A plan range expanded by a worker: (store shard, first row, rows) of its blocks whose shard's
  output (`shard_path(db, shard)`) is not finished."""
  store = _store(db)
  finished: dict[int, bool] = {}
  for shard, a, n in plan_lib.blocks_in(store.shard_offsets, rows[0], rows[1], block_rows):
    if shard not in finished:
      finished[shard] = layout.is_finished(shard_path(db, shard))
    if not finished[shard]:
      yield shard, a, n


def _embedding_blocks_in(rows: tuple[int, int], db: str) -> Iterator[tuple[int, int, int]]:
  """(shard, start row, end row) of the blocks of unfinished embeddings shards in `rows`."""
  for shard, a, n in _unfinished_blocks(rows, db, EMBED_BLOCK_ROWS, layout.embeddings_path):
    yield shard, a, a + n


def _group_checksum(group: int, db: str, stage: str) -> tuple[int, str | None]:
  return group, provenance.group_sha256(db, stage, _store(db).num_shards, group)


def _record_outputs(group_shas: list[tuple[int, str | None]], db: str, stage: str) -> None:
  """The stage's outputs record, once every shard is finished (retro_jax.db.provenance); the
  neighbours stage's kept searches go then."""
  shas = [sha for _, sha in sorted(group_shas)]
  if provenance.write_outputs(db, stage, _store(db).num_shards, shas) is None:
    raise RuntimeError(f"{stage}: not every shard is finished")
  if stage == "neighbours" and _search_cache_dir(db).exists():
    _search_cache_dir(db).rmtree()


def _outputs_record(finished, db: str, stage: str):
  """After the last shard: its groups' checksums read in parallel, then the record written."""
  return (finished
          | "AllShards" >> beam.combiners.Count.Globally()
          | "OutputGroups" >> beam.FlatMap(
              lambda _: range(provenance.outputs_groups(_store(db).num_shards)))
          | "SpreadOutputGroups" >> beam.Reshuffle()
          | "GroupChecksum" >> beam.Map(_group_checksum, db, stage)
          | "GroupChecksums" >> beam.combiners.ToList()
          | "Record" >> beam.Map(_record_outputs, db, stage))


class _EmbedBlock(beam.DoFn):
  """Embeds one block of a shard into its part file, unless a finished part is there; the
  MiniLM is loaded once per worker. Yields (shard, (start, embedded?))."""

  def __init__(self, db: str, dtype: str, batch_size: int):
    self._db, self._dtype, self._batch_size = db, dtype, batch_size

  def setup(self):
    pin_worker()  # before XLA starts its threads
    self._embedder = Embedder.load(dtype=self._dtype, batch_size=self._batch_size)
    self._store = _store(self._db)
    self._tok = prepare_lib.load_db_tokenizer(self._db)

  def process(self, block: tuple[int, int, int]):
    shard, start, end = block
    part = layout.embedding_part_path(self._db, shard, start)
    if part.exists():
      yield shard, (start, False)
      return
    first_id = self._store.shard_span(shard)[1]
    texts = self._store.chunk_text(np.arange(first_id + start, first_id + end, dtype=np.int64),
                                   self._tok)
    vecs_BxD = np.asarray(self._embedder.embed(texts), np.float32)
    part.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(part, layout.npy_bytes(vecs_BxD))
    print(f"[build_db] embeddings: shard {shard} rows {start}..{end} embedded", flush=True)
    yield shard, (start, True)


class _AssembleShard(beam.DoFn):
  """Writes embeddings/shard-XXXXX.npy from its parts (row order), its finished progress record
  (as embed.embed_to_npy writes it), then removes the parts."""

  def __init__(self, db: str):
    self._db = db

  def setup(self):
    self._info = json.loads((layout.embeddings_dir(self._db) / layout.EMBEDDER_INFO).read_text())

  def process(self, item):
    shard, blocks = item
    blocks = sorted(blocks)
    count = _store(self._db).shard_span(shard)[2]
    starts = [s for s, _ in blocks]
    if starts != list(range(0, count, EMBED_BLOCK_ROWS)):
      raise RuntimeError(f"embeddings shard {shard}: blocks {starts} do not cover {count} rows")
    out = layout.embeddings_path(self._db, shard)
    layout.assemble_npy(out, (count, int(self._info["dim"])), np.float32,
                        [layout.embedding_part_path(self._db, shard, s) for s in starts])
    embed_lib.write_finished(out, count, EMBED_BLOCK_ROWS, self._info["fingerprint"],
                             self._info["dtype"])
    parts_dir = layout.embedding_part_path(self._db, shard, 0).parent
    if parts_dir.exists():
      parts_dir.rmtree()
    try:  # the last shard assembled removes embeddings/parts/ too
      if not any(parts_dir.parent.iterdir()):
        parts_dir.parent.rmdir()
    except (OSError, ValueError):  # another worker's parts are still there
      pass
    embedded = sum(1 for _, e in blocks if e)
    print(f"[build_db] embeddings: shard {shard} assembled ({embedded} blocks embedded, "
          f"{len(blocks) - embedded} kept)", flush=True)
    yield shard


# ------------------------------------------------------------------------------------------------
# Index: the global index as Beam transforms over global_index's build steps; the per-shard
# backends one element per embeddings shard.


def _build_index_shard(shard: int, db: str, backend: str) -> str:
  return build_index_lib.build_index(db, index_lib.IndexConfig(backend=backend), shards={shard})[0]


def _global_source(db: str, shard: int) -> global_lib.Source:
  """One embeddings shard as a memory map, with its first chunk id (from the store)."""
  path = layout.embeddings_path(db, shard)
  if not layout.is_finished(path):
    raise index_lib.IndexError_(f"Embeddings shard {path} is missing or unfinished; run the "
                                "embeddings stage first (--stages=embeddings).")
  return shard, index_lib.load_embeddings(str(path)), _store(db).shard_span(shard)[1]


def _sample_picks(_, db: str, c: global_lib.GlobalIndexConfig):
  """The training sample's global rows (global_index.sample_picks), split by encode group:
  yields (group, its picks, their first position in the sample, the sample's size); nothing
  when the index is trained already."""
  if global_lib.is_trained(global_lib.index_dir(db)):
    return
  store = _store(db)
  picks = global_lib.sample_picks(store.num_chunks, max(c.train_sample, 0), c.seed)
  for g, a, b in global_lib.sample_groups(picks, store.shard_offsets, store.num_shards):
    yield g, picks[a:b], a, len(picks)


def _read_sample(item, db: str, load: bool = False) -> np.ndarray | None:
  """One encode group's rows of the training sample into parts/sample-G.npy (kept if there);
  returns them when read, or when `load`."""
  g, picks = item[:2]
  path = global_lib.sample_part_path(global_lib.index_dir(db), g)
  if path.exists():
    return global_lib.read_sample_parts(global_lib.index_dir(db), [g]) if load else None
  sources = [_global_source(db, i) for i in global_lib.group_sources(g, _store(db).num_shards)]
  rows = global_lib.read_rows(sources, sources[0][2], picks)
  write_bytes_atomic(path, layout.npy_bytes(rows))
  return rows


def _read_sample_part(item, db: str) -> int:
  _read_sample(item, db)
  return item[0]


def _train_on_sample(groups: list[int], db: str, c: global_lib.GlobalIndexConfig) -> None:
  """The partitioner and quantizer trained on the sample parts, in group order (the rows
  `global_index.sample_rows` reads in one process)."""
  root = global_lib.index_dir(db)
  sample = None if global_lib.is_trained(root) else global_lib.read_sample_parts(root, groups)
  store = _store(db)
  trained = global_lib.train_step(None, root, c, sample=sample,
                                  sig=global_lib.signature(store.num_chunks, store.num_shards))
  print(f"[build_db] index: {'trained' if trained else 'kept the trained'} partitioner and "
        "quantizer", flush=True)


# The parallel training (global_index.train_hierarchical's steps, from parallel_train_min_sample
# vectors on): each sample group's rows read, its share of the coarse sub-sample and its abs max
# passed on -> one element trains the coarse centroids -> each sample group assigned to them ->
# GroupByKey(coarse cell) -> each cell's fine centroids -> one element: the quantizer and PQ.


def _read_sample_coarse(item, db: str, c: global_lib.GlobalIndexConfig):
  """(group, its rows of the coarse sub-sample, its rows' per-dimension abs max)."""
  g, _, a, total = item
  rows = _read_sample(item, db, load=True)
  pos = global_lib.coarse_positions(total, c)
  lo, hi = np.searchsorted(pos, [a, a + len(rows)])
  return g, rows[pos[lo:hi] - a], np.abs(rows).max(axis=0)


def _train_coarse(items: list, db: str, c: global_lib.GlobalIndexConfig) -> list[int]:
  """The coarse centroids (parts/coarse.npz, kept if there) from the groups' coarse rows, in
  group order; returns the sample groups (none when the index is trained)."""
  root = global_lib.index_dir(db)
  if global_lib.is_trained(root):
    return []
  items = sorted(items, key=lambda it: it[0])
  if not global_lib.coarse_part_path(root, c).exists():
    rows = np.concatenate([it[1] for it in items])
    coarse = global_lib.train_coarse(rows, c)
    global_lib.write_npz(global_lib.coarse_part_path(root, c), {
        "centroids": coarse, "pq_rows": rows[global_lib.pq_positions(len(rows), c)],
        "abs_max": np.max(np.stack([it[2] for it in items]), axis=0)})
    print(f"[build_db] index: {len(coarse)} coarse cells trained on {len(rows)} vectors",
          flush=True)
  return [it[0] for it in items]


class _AssignSample(beam.DoFn):
  """One sample group's rows to their coarse cells: yields (cell, (group, its rows there))."""

  def __init__(self, db: str, c: global_lib.GlobalIndexConfig):
    self._db, self._c, self._coarse = db, c, None

  def process(self, g: int):
    root = global_lib.index_dir(self._db)
    if self._coarse is None:  # written by this run's coarse element: read on first use
      self._coarse = global_lib.read_npz(global_lib.coarse_part_path(root, self._c))["centroids"]
    rows = global_lib.read_sample_parts(root, [g])
    cells = global_lib.assign_coarse(self._coarse, rows, self._c.training_threads)
    for cell, x in global_lib.split_by_cell(cells, rows):
      yield cell, (g, x)


def _cell_size(item) -> tuple[int, int]:
  cell, values = item
  return cell, sum(len(x) for _, x in values)


def _train_cell(item, db: str, c: global_lib.GlobalIndexConfig, sizes: list) -> int:
  """One coarse cell's fine centroids (parts/cell-C.npz, kept if there), its share of nlist
  from every cell's sample rows (`sizes`)."""
  cell, values = item
  path = global_lib.cell_part_path(global_lib.index_dir(db), c, cell)
  if not path.exists():
    t0 = time.perf_counter()
    all_sizes = np.zeros(global_lib.coarse_cells(c), np.int64)
    for k, n in sizes:
      all_sizes[k] = n
    k = int(global_lib.cell_centroids(all_sizes, c.nlist)[cell])
    rows = np.concatenate([x for _, x in sorted(values, key=lambda v: v[0])])
    global_lib.write_npz(path, {"centroids": global_lib.train_cell(cell, rows, k, c),
                                "seconds": np.float64(time.perf_counter() - t0)})
  return cell


def _finish_training(cells: list[int], db: str, c: global_lib.GlobalIndexConfig) -> None:
  """The quantizer from the cells' centroids in cell order, the PQ and the scale: trained.faiss,
  scale.npy and the train record."""
  root = global_lib.index_dir(db)
  trained = not global_lib.is_trained(root)
  if trained:
    t0 = time.perf_counter()
    parts = [global_lib.read_npz(global_lib.cell_part_path(root, c, k)) for k in sorted(cells)]
    coarse = global_lib.read_npz(global_lib.coarse_part_path(root, c))
    index, scale = global_lib.finish_training(
        np.concatenate([p["centroids"] for p in parts]), coarse["pq_rows"], coarse["abs_max"], c)
    store = _store(db)
    global_lib.write_trained(root, index, scale, c,
                             global_lib.signature(store.num_chunks, store.num_shards),
                             time.perf_counter() - t0 + sum(float(p["seconds"]) for p in parts))
  print(f"[build_db] index: {'trained' if trained else 'kept the trained'} partitioner and "
        f"quantizer ({global_lib.coarse_cells(c)} coarse cells in parallel)", flush=True)


def _train_index(p, db: str, c: global_lib.GlobalIndexConfig, parallel: bool):
  """The train step's transforms; their output (one element) follows training."""
  picked = (p | "Start" >> beam.Create([None])
            | "SamplePicks" >> beam.FlatMap(_sample_picks, db, c)
            | "SpreadSample" >> beam.Reshuffle())
  if not parallel:
    return (picked | "ReadSample" >> beam.Map(_read_sample_part, db)
            | "SampleGroups" >> beam.combiners.ToList()
            | "TrainOnSample" >> beam.Map(_train_on_sample, db, c))
  by_cell = (picked | "ReadSample" >> beam.Map(_read_sample_coarse, db, c)
             | "SampleGroups" >> beam.combiners.ToList()
             | "TrainCoarse" >> beam.Map(_train_coarse, db, c)
             | "AssignGroups" >> beam.FlatMap(lambda groups: groups)
             | "SpreadAssign" >> beam.Reshuffle()
             | "AssignSample" >> beam.ParDo(_AssignSample(db, c))
             | "ByCoarseCell" >> beam.GroupByKey())
  sizes = (by_cell | "CellSizes" >> beam.Map(_cell_size)
           | "AllCellSizes" >> beam.combiners.ToList())
  return (by_cell | "TrainCell" >> beam.Map(_train_cell, db, c, beam.pvalue.AsSingleton(sizes))
          | "Cells" >> beam.combiners.ToList()
          | "TrainOnSample" >> beam.Map(_finish_training, db, c))


class _EncodeGroup(beam.DoFn):
  """One encode group (ENCODE_GROUP_SOURCES embeddings shards) encoded (kept when finished);
  yields (serving shard, group) for every serving shard."""

  def __init__(self, db: str):
    self._db = db

  def setup(self):
    pin_worker()
    self._root = global_lib.index_dir(self._db)
    self._trained = global_lib.load_trained(self._root)

  def process(self, g: int):
    n = _store(self._db).num_shards
    sources = [_global_source(self._db, i) for i in global_lib.group_sources(g, n)]
    encoded = global_lib.encode_step(g, sources, self._root, self._trained)
    print(f"[build_db] index: embeddings shards {sources[0][0]}..{sources[-1][0]} "
          f"{'encoded' if encoded else 'kept'}", flush=True)
    for s in range(self._trained[2].serving_shards):
      yield s, g


class _MergeServingShard(beam.DoFn):
  """serving/shard-S.* from its parts, in group order; yields the shard."""

  def __init__(self, db: str):
    self._db = db

  def setup(self):
    self._root = global_lib.index_dir(self._db)
    self._trained = global_lib.load_trained(self._root)

  def process(self, item):
    s, groups = item
    global_lib.merge_step(s, sorted(groups), self._root, self._trained)
    yield s


def _finish_index(merged: list[int], db: str) -> None:
  store = _store(db)
  m = global_lib.finish_build(global_lib.signature(store.num_chunks, store.num_shards),
                              global_lib.index_dir(db))
  print(f"[build_db] index: {m['count']} vectors in {len(merged)} serving shards", flush=True)


def _global_index(p, db: str, config: global_lib.GlobalIndexConfig | None) -> None:
  """The launcher reads the store's manifest only; the encode groups are named by plan ranges."""
  _clear_caches()
  store = chunk_store_lib.ChunkStore.open(db)
  root = global_lib.index_dir(db)
  if build_index_lib.global_index_done(db, store.num_chunks):
    return
  c = global_lib.prepare_build_for(global_lib.signature(store.num_chunks, store.num_shards),
                                   root, config)
  group_ranges = plan_lib.ranges(global_lib.num_groups(store.num_shards))
  trained = _train_index(p, db, c, global_lib.trains_in_parallel(c, store.num_chunks))
  _ = (trained
       | "GroupRanges" >> beam.FlatMap(lambda _: group_ranges)
       | "SpreadRanges" >> beam.Reshuffle()
       | "EncodeGroups" >> beam.FlatMap(lambda r: range(*r))
       | "Distribute" >> beam.Reshuffle()
       | "EncodeGroup" >> beam.ParDo(_EncodeGroup(db))
       | "ByServingShard" >> beam.GroupByKey()
       | "MergeServingShard" >> beam.ParDo(_MergeServingShard(db))
       | "AllServingShards" >> beam.combiners.ToList()
       | "Manifest" >> beam.Map(_finish_index, db))


# ------------------------------------------------------------------------------------------------
# Neighbours. The global index: a routed batch job over query blocks (below); the per-shard
# backends: one element per store shard, the whole index loaded once per worker.


class _NeighboursShard(beam.DoFn):
  """One neighbours shard; the store and the index are loaded once per worker."""

  def __init__(self, db: str, k: int, backend: str):
    self._db, self._k, self._backend = db, k, backend

  def setup(self):
    pin_worker()  # before faiss starts its OpenMP threads
    self._store = chunk_store_lib.ChunkStore.open(self._db)
    self._retriever, self._backend = neighbours_lib.load_retriever(self._db, self._store,
                                                                   self._backend)

  def process(self, shard: int):
    stats = neighbours_lib.neighbours_shard(self._db, shard, self._retriever, self._store,
                                            self._backend, self._k)
    yield shard, stats["rows"]


# A query block: (store shard, first row) of NEIGHBOURS_BLOCK_ROWS rows (the last may be
# shorter); the unit of resumption, as neighbours.compute_shard's blocks. A round of a block:
# (block, (rows int64 [R] within it, fetch)). Round 1 asks every row for first_fetch candidates;
# rows still short of k after the held-out filter go to the next round with twice as many.
NEIGHBOURS_BLOCK_ROWS = 4096
_KV = Tuple[Any, Any]  # (key, value) for the GroupByKeys after the multi-output DoFns


# What the routed job's DoFns read, loaded once per worker process (not per DoFn instance: the
# unrolled rounds have one instance each); cleared by the launcher before each run.


@functools.lru_cache(maxsize=1)
def _store(db: str):
  return chunk_store_lib.ChunkStore.open(db)


@functools.lru_cache(maxsize=8)
def _shard_queries(db: str, shard: int):
  return neighbours_lib.shard_embeddings(db, _store(db), shard)


def _queries(db: str, block: tuple[int, int], rows: np.ndarray):
  """(float32 queries [R, D], their global chunk ids [R]) of these rows of a query block."""
  shard, start = block
  first_id = _store(db).shard_span(shard)[1]
  return np.asarray(_shard_queries(db, shard)[start + rows], np.float32), first_id + start + rows


@functools.lru_cache(maxsize=1)
def _router(db: str):
  """The global index without serving shards: the trained quantizer that routes queries."""
  return global_lib.GlobalIndex(global_lib.index_dir(db), serving=[], verify_files=False)


@functools.lru_cache(maxsize=1)
def _serving_retriever(db: str, s: int):
  """A retriever over serving shard s alone (one serving shard in memory at a time)."""
  index = global_lib.GlobalIndex(global_lib.index_dir(db), serving=[s], verify_files=False)
  return retriever_lib.Retriever([index], doc_ids=_store(db).doc_ids,
                                 deleted_ranges=retriever_lib.db_deleted_ranges(db))


# Per-process caches of the workers' reads; cleared by the launcher before each stage (the
# in-process runner's workers are this process).
_WORKER_CACHES = (_store, _shard_queries, _router, _serving_retriever)


def _route(db: str, block: tuple[int, int], rows: np.ndarray, fetch: int):
  """A round's queries routed to their nearest partitions (the trained quantizer only): yields
  (serving shard, (block, rows whose route reaches it, fetch)); every row reaches one or more."""
  index = _router(db)
  shards = int(index.config.serving_shards)
  group = plan_lib.search_group(_store(db).shard_offsets[block[0]] + block[1])
  if shards == 1:
    yield (0, group), (block, rows, fetch)
    return
  parts, _ = index.route(_queries(db, block, rows)[0], fetch * retriever_lib.OVERFETCH)
  for s in range(shards):
    mine = index.reaches(parts, [s])
    if mine.any():
      yield (s, group), (block, rows[mine], fetch)


def _route_block(element, db: str):
  block, (rows, fetch) = element
  yield from _route(db, block, rows, fetch)


SEARCH_CACHE = "search_cache"


def _search_cache_dir(db: str) -> epath.Path:
  return epath.Path(db) / layout.NEIGHBOURS_DIR / SEARCH_CACHE


def _search_cache_path(db: str, r: int, key: tuple[int, int]) -> epath.Path:
  """A finished search of round r, search key (serving shard, group), under the index's content
  fingerprint (a rebuilt index never meets an older index's results)."""
  index = _router(db)
  fp = str(index.manifest.get("content_sha256", "unknown"))[:16]
  return _search_cache_dir(db) / fp / f"round{r:02d}-serving{key[0]:05d}-group{key[1]:08d}.npz"


def _queries_sha(queries) -> str:
  h = hashlib.sha256()
  for block, rows, fetch in queries:
    h.update(np.asarray([*block, fetch], np.int64).tobytes())
    h.update(np.ascontiguousarray(rows, np.int64).tobytes())
  return h.hexdigest()


class _SearchServingShard(beam.DoFn):
  """All of one serving shard's queries of a round: a retriever over that serving shard alone
  (same-document exclusion and refill, removed documents); yields (block, (rows, ids, scores,
  fetch)), each row's best `fetch` there. Each finished search is kept (neighbours/search_cache/,
  removed when the stage finishes), so a killed run does not search its keys again: a round
  writes no block until every search of it is grouped."""

  def __init__(self, db: str, r: int):
    self._db, self._round = db, r

  def setup(self):
    pin_worker()

  def process(self, item):
    key, queries = item
    queries = sorted(queries, key=lambda q: q[0])  # one order, whatever the shuffle's
    s = key[0]
    path = _search_cache_path(self._db, self._round, key)
    sha = _queries_sha(queries)
    kept = None
    if path.exists():
      with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        if str(z["sha"]) == sha:
          kept = {k: z[k] for k in ("offsets", "found", "scores")}
    if kept is not None:
      for j, (block, rows, fetch) in enumerate(queries):
        a, b = kept["offsets"][j], kept["offsets"][j + 1]
        yield block, (s, rows, kept["found"][a:b], kept["scores"][a:b], fetch)
      return
    retriever = _serving_retriever(self._db, s)
    doc_ids = _store(self._db).doc_ids
    out = []
    for block, rows, fetch in queries:
      q, ids = _queries(self._db, block, rows)
      found, scores = retriever.search(q, fetch, doc_ids(ids))
      out.append((block, (s, rows, found, scores, fetch)))
    if len({f for _, _, f in queries}) == 1:  # one fetch a round: rows stack
      buf = io.BytesIO()
      np.savez(buf, sha=np.asarray(sha),
               offsets=np.cumsum([0] + [len(r) for _, r, _ in queries]).astype(np.int64),
               found=np.concatenate([o[1][2] for o in out]),
               scores=np.concatenate([o[1][3] for o in out]))
      path.parent.mkdir(parents=True, exist_ok=True)
      write_bytes_atomic(path, buf.getvalue())
    yield from out


class _CombineRound(beam.DoFn):
  """Per block and round: each row's best `fetch` over the serving shards that its route reached
  (index.top_k_rows, as Retriever.search merges), then neighbours.keep_round. Finished rows go
  out on the tag "done" as (block, (rows, ids)); rows still short of k are routed again with
  twice the candidates (the next round's elements)."""

  def __init__(self, db: str, k: int, total: int):
    self._db, self._k, self._total = db, k, total

  def process(self, item):
    block, found = item
    found = [f[1:] for f in sorted(found, key=lambda f: f[0])]  # serving-shard order
    store = _store(self._db)
    fetch = found[0][3]
    rows = np.unique(np.concatenate([f[0] for f in found]))  # the round's rows, in order
    ids, scores = [], []
    for found_rows, found_ids, found_scores, _ in found:
      at = np.searchsorted(rows, found_rows)
      i = np.full((len(rows), found_ids.shape[1]), -1, np.int64)
      sc = np.full((len(rows), found_ids.shape[1]), -np.inf, np.float32)
      i[at], sc[at] = found_ids, found_scores
      ids.append(i)
      scores.append(sc)
    best, _ = index_lib.top_k_rows(np.concatenate(ids, 1), np.concatenate(scores, 1), fetch)
    out, short = neighbours_lib.keep_round(best, store, self._k, fetch, self._total,
                                           store.heldout_doc_ids)
    yield beam.pvalue.TaggedOutput("done", (block, (rows[~short], out[~short])))
    if short.any():
      yield from _route(self._db, block, rows[short], neighbours_lib.next_fetch(fetch, self._total))


def _write_block(item, db: str, k: int) -> Iterator[tuple[int, int]]:
  """A block's rows into its part file (atomic); yields (store shard, first row)."""
  (shard, start), pieces = item
  count = _store(db).shard_span(shard)[2]
  out = np.full((min(NEIGHBOURS_BLOCK_ROWS, count - start), k), -1, np.int64)
  filled = np.zeros(len(out), bool)
  for rows, ids in pieces:
    out[rows], filled[rows] = ids, True
  if not filled.all():
    raise RuntimeError(f"neighbours shard {shard} block {start}: rows "
                       f"{np.flatnonzero(~filled)[:5]} were never finished")
  part = layout.neighbours_part_path(db, shard, start)
  part.parent.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(part, layout.npy_bytes(out))
  print(f"[build_db] neighbours: shard {shard} rows {start}..{start + len(out)} searched",
        flush=True)
  yield shard, start


class _AssembleNeighbours(beam.DoFn):
  """neighbours/shard-XXXXX.npy from its block parts (row order) and its finished progress
  record (as neighbours.compute_shard writes them), then the parts removed."""

  def __init__(self, db: str, k: int, total: int):
    self._db, self._k, self._total = db, k, total

  def setup(self):
    self._settings = neighbours_lib.search_settings(_store(self._db), global_lib.BACKEND,
                                                    self._total)

  def process(self, item):
    shard, starts = item
    starts = sorted(starts)
    _, first_id, count = _store(self._db).shard_span(shard)
    if starts != list(range(0, count, NEIGHBOURS_BLOCK_ROWS)):
      raise RuntimeError(f"neighbours shard {shard}: blocks {starts} do not cover {count} rows")
    out = layout.neighbours_path(self._db, shard)
    layout.assemble_npy(out, (count, self._k), np.int64,
                        [layout.neighbours_part_path(self._db, shard, s) for s in starts])
    neighbours_lib.write_finished(out, neighbours_lib.shard_record(
        count, first_id, self._k, NEIGHBOURS_BLOCK_ROWS, self._settings))
    _remove_parts(layout.neighbours_part_path(self._db, shard, 0).parent)
    print(f"[build_db] neighbours: shard {shard} assembled", flush=True)
    yield shard


def _remove_parts(parts_dir: epath.Path) -> None:
  """Removes one shard's parts directory, and the parts/ above it once empty."""
  if parts_dir.exists():
    parts_dir.rmtree()
  try:  # the last shard assembled removes parts/ too
    if not any(parts_dir.parent.iterdir()):
      parts_dir.parent.rmdir()
  except (OSError, ValueError):  # another worker's parts are still there
    pass


def _neighbour_blocks_in(rows: tuple[int, int], db: str, first: int):
  """A plan range expanded by a worker: its query blocks of unfinished neighbours shards, as
  (block, (rows, fetch)) to search, or on the tag "kept" as (store shard, first row) when the
  block's part file is already written."""
  for shard, a, n in _unfinished_blocks(rows, db, NEIGHBOURS_BLOCK_ROWS, layout.neighbours_path):
    if layout.neighbours_part_path(db, shard, a).exists():
      yield beam.pvalue.TaggedOutput("kept", (shard, a))
    else:
      yield (shard, a), (np.arange(n, dtype=np.int64), first)


def _clear_caches() -> None:
  for cache in _WORKER_CACHES:
    cache.cache_clear()


def _routed_neighbours(p, db: str, k: int) -> None:
  """Training neighbours over the global index as a batch job: plan ranges -> query blocks
  (expanded in the workers) -> rounds of (route -> search per (serving shard, search group) ->
  per-block combine) -> block part files -> shards assembled -> the outputs record. The launcher
  reads the store's and the index's manifests only."""
  _clear_caches()
  store = chunk_store_lib.ChunkStore.open(db)
  root = global_lib.index_dir(db)
  manifest = global_lib.read_manifest(root)
  total = int(manifest["count"])
  if total != store.num_chunks:
    raise index_lib.IndexError_(f"The global index {root} holds {total} vectors but the database "
                                f"has {store.num_chunks} chunks; rebuild it (--stages=index).")
  held = int(store.manifest["heldout"]["num_docs"]) > 0
  first = neighbours_lib.first_fetch(k, total, held)
  fetch, rounds = first, 1
  while held and fetch < total:  # rounds until the fetch reaches the whole index
    fetch, rounds = neighbours_lib.next_fetch(fetch, total), rounds + 1
  blocks = (p | "Ranges" >> beam.Create(plan_lib.ranges(store.num_chunks))
            | "SpreadRanges" >> beam.Reshuffle()
            | "QueryBlocks" >> beam.FlatMap(_neighbour_blocks_in, db, first).with_outputs(
                "kept", main="todo"))
  routed = (blocks.todo | "Distribute" >> beam.Reshuffle()
            | "Route" >> beam.FlatMap(_route_block, db))
  finished = []
  for r in range(rounds):  # each: search per serving shard, combine per block, route the rest
    combined = (routed | f"BySearchKey{r}" >> beam.GroupByKey()
                | f"SearchServingShard{r}" >> beam.ParDo(_SearchServingShard(db, r))
                | f"ByBlock{r}" >> beam.GroupByKey()
                | f"Combine{r}" >> beam.ParDo(_CombineRound(db, k, total)).with_output_types(
                    _KV).with_outputs("done", main="routed"))
    finished.append(combined.done)
    routed = combined.routed
  written = (tuple(finished) | "Finished" >> beam.Flatten()
             | "RowsByBlock" >> beam.GroupByKey()
             | "WriteBlock" >> beam.FlatMap(_write_block, db, k))
  _outputs_record((written, blocks.kept) | "AllBlocks" >> beam.Flatten()
                  | "ByStoreShard" >> beam.GroupByKey()
                  | "AssembleShard" >> beam.ParDo(_AssembleNeighbours(db, k, total)),
                  db, "neighbours")


# ------------------------------------------------------------------------------------------------
# The stages.


# The tokenizer of a planned corpus (every part tfds:, or every part files): its training lines
# counted and sampled in parallel, over ranges of TOKENIZER_RANGE_DOCS documents (random access)
# or one range per unit of files (corpus.FileCorpus: each range reads its own files only), then
# one element trains.
TOKENIZER_RANGE_DOCS = 4096


def _doc_ranges(sel) -> Iterator[tuple[int, int, int]]:
  for j, (a, b) in enumerate(sel.doc_ranges(TOKENIZER_RANGE_DOCS)):
    yield j, a, b


def _range_training(item, sel, source, cfg: dict[str, Any]) -> tuple[list[str], int]:
  """The training lines of documents [a, b) that are not held out, in order, and how many such
  documents there are."""
  _, a, b = item[:3]
  docs = [d for d in source.read(sel.spans(a, b), b - a)
          if not corpus_lib.is_heldout(d.key, cfg["heldout_fraction"], cfg["seed"])]
  return list(tokenizer_lib.training_sentences(d.text for d in docs)), len(docs)


def _count_lines(item, sel, source, cfg: dict[str, Any]) -> tuple:
  """(range, first doc, stop doc, its training lines, its documents not held out)."""
  lines, docs = _range_training(item, sel, source, cfg)
  return (*item, len(lines), docs)


def _picked_lines(item, sel, source, cfg: dict[str, Any]) -> list[str]:
  """The picked lines (item[3]: indices into the range's training lines) of one range, the
  range read once."""
  lines = _range_training(item, sel, source, cfg)[0]
  return [lines[i] for i in item[3]]


def _assign_line_picks(counts: list[tuple[int, int, int, int, int]], cfg: dict[str, Any]):
  """(range, first doc, stop doc, its picked line indices) of every range with a pick."""
  counts = sorted(counts)
  sizes = np.array([c[3] for c in counts], np.int64)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  picks = tokenizer_lib.line_picks(int(starts[-1]), prepare_lib.INPUT_SENTENCE_SIZE,
                                   cfg["seed"])
  for (j, a, b, *_), lo, hi in zip(counts, starts[:-1], starts[1:]):
    i, e = np.searchsorted(picks, [lo, hi])
    if e > i:
      yield j, a, b, picks[i:e] - lo


def _train_on_lines(picked: list[tuple[int, list[str]]], db: str, cfg: dict[str, Any],
                    counts: list[tuple], sel) -> None:
  """Trains on the picked lines in corpus order; the whole read's errors where it has none: no
  document that is not held out (`prepare.no_training_document`), or no line (SentencePiece's,
  from `train_sentencepiece`)."""
  lines = [line for _, ls in sorted(picked, key=lambda t: t[0]) for line in ls]
  if not sum(c[4] for c in counts):
    raise prepare_lib.no_training_document(cfg["corpus"], sel.stats)
  out = epath.Path(db) / layout.TOKENIZER_PATH
  tokenizer_lib.train_sentencepiece((), out, vocab_size=cfg["vocab_size"], seed=cfg["seed"],
                                    input_sentence_size=prepare_lib.INPUT_SENTENCE_SIZE,
                                    lines=lines)
  print(f"[build_db] tokenizer: trained on {len(lines)} lines sampled in parallel", flush=True)


def _classified_blocks(p, source, cfg: dict[str, Any]):
  """A planned corpus's records classified in parallel blocks (of records, or units of files):
  one element, every block's scan (what `source.select` plans from)."""
  return (p | "Blocks" >> beam.Create(source.blocks(cfg["max_docs"]))
          | "SpreadBlocks" >> beam.Reshuffle()
          | "Classify" >> beam.Map(source.scan)
          | "AllBlocks" >> beam.combiners.ToList())


def _parallel_tokenizer(p, db: str, cfg: dict[str, Any], source) -> None:
  """Classify (as the chunks stage) -> select the documents -> count each range's training lines
  -> pick lines (all of them up to prepare.INPUT_SENTENCE_SIZE: the whole read's sample) -> read
  the picked lines per range -> train, the lines in corpus order."""
  sel = (_classified_blocks(p, source, cfg)
         | "Select" >> beam.Map(source.select, cfg["max_docs"], False))  # checked by chunks
  side = beam.pvalue.AsSingleton(sel)
  counts = (sel | "DocRanges" >> beam.FlatMap(_doc_ranges)
            | "SpreadRanges" >> beam.Reshuffle()
            | "CountLines" >> beam.Map(_count_lines, side, source, cfg)
            | "AllCounts" >> beam.combiners.ToList())
  _ = (counts
       | "PickLines" >> beam.FlatMap(_assign_line_picks, cfg)
       | "SpreadPicks" >> beam.Reshuffle()
       | "ReadLines" >> beam.Map(lambda r, s: (r[0], _picked_lines(r, s, source, cfg)), side)
       | "AllLines" >> beam.combiners.ToList()
       | "TrainSentencePiece" >> beam.Map(_train_on_lines, db, cfg,
                                          beam.pvalue.AsSingleton(counts), side))


def _tokenizer(p, db: str, cfg: dict[str, Any]) -> None:
  source = None
  if not cfg["tokenizer"] and not (epath.Path(db) / layout.TOKENIZER_PATH).exists():
    source = corpus_lib.planned_corpus(cfg["corpus"], cfg["max_docs"])
  if source is not None:
    _parallel_tokenizer(p, db, cfg, source)
    return
  _ = (p | "Db" >> beam.Create([db])
       | "TrainSentencePiece" >> beam.Map(
           lambda d: prepare_lib.build_tokenizer(
               cfg["corpus"], d, vocab_size=cfg["vocab_size"], seed=cfg["seed"],
               heldout_fraction=cfg["heldout_fraction"], max_docs=cfg["max_docs"],
               tokenizer_path=cfg["tokenizer"]) and None))


def _chunks(p, db: str, cfg: dict[str, Any]) -> None:
  """A planned corpus (every part tfds:, or every part a directory, documentation tree, .jsonl
  or the Wikipedia leads) is classified in parallel blocks (of records; of files or byte ranges)
  and each shard's worker reads only its records; any other is read whole by the planner and
  every worker."""
  layout.chunks_dir(db).mkdir(parents=True, exist_ok=True)
  source = corpus_lib.planned_corpus(cfg["corpus"], cfg["max_docs"])
  if source is None:
    shards = (p | "Corpus" >> beam.Create([cfg["corpus"]])
              | "ReadAndPlan" >> beam.FlatMap(_plan_store_shards, cfg)
              | "Distribute" >> beam.Reshuffle()
              | "TokeniseAndChunk" >> beam.ParDo(_WriteStoreShard(db, cfg)))
  else:
    shards = (_classified_blocks(p, source, cfg)
              | "Select" >> beam.FlatMap(_select_shards, source, cfg)
              | "Distribute" >> beam.Reshuffle()
              | "TokeniseAndChunk" >> beam.ParDo(_WriteSelectedShard(db, cfg, source)))
  _ = (shards | "AllShards" >> beam.combiners.ToList()
       | "Finalize" >> beam.Map(_finalize, db))


def _embeddings(p, db: str, cfg: dict[str, Any]) -> None:
  _clear_caches()
  n = chunk_store_lib.ChunkStore.open(db).num_chunks
  assembled = (p | "Ranges" >> beam.Create(plan_lib.ranges(n))
       | "SpreadRanges" >> beam.Reshuffle()
       | "Blocks" >> beam.FlatMap(_embedding_blocks_in, db)
       | "SpreadBlocks" >> beam.Reshuffle()
       | "Embed" >> beam.ParDo(_EmbedBlock(db, cfg["embed_dtype"], cfg["embed_batch_size"]))
       | "ByShard" >> beam.GroupByKey()
       | "Assemble" >> beam.ParDo(_AssembleShard(db)))
  _outputs_record(assembled, db, "embeddings")


def _index(p, db: str, cfg: dict[str, Any]) -> None:
  backend = cfg["backend"]
  if backend == index_lib.GLOBAL_BACKEND:
    config = cfg.get("global_index_config")  # (tests set it)
    if config is None and cfg.get("index_searcher", "faiss") != "faiss":
      config = global_lib.GlobalIndexConfig(searcher=cfg["index_searcher"])
    _global_index(p, db, config)
    return
  store = chunk_store_lib.ChunkStore.open(db)
  _ = (p | "ShardRanges" >> beam.Create(plan_lib.ranges(store.num_shards))
       | "Shards" >> beam.FlatMap(lambda r: range(*r))
       | "Distribute" >> beam.Reshuffle()
       | "BuildIndex" >> beam.Map(_build_index_shard, db, backend))


def _neighbours(p, db: str, cfg: dict[str, Any]) -> None:
  if retriever_lib.db_backend(db, cfg["backend"]) == index_lib.GLOBAL_BACKEND:
    _routed_neighbours(p, db, cfg["k"])
    return
  _clear_caches()
  store = chunk_store_lib.ChunkStore.open(db)
  _outputs_record(
      p | "ShardRanges" >> beam.Create(plan_lib.ranges(store.num_shards))
      | "Shards" >> beam.FlatMap(
          lambda r: (s for s in range(*r) if not neighbours_lib.shard_is_done(db, s)))
      | "Reshuffle" >> beam.Reshuffle()
      | "Neighbours" >> beam.ParDo(_NeighboursShard(db, cfg["k"], cfg["backend"])),
      db, "neighbours")


# A finished embeddings or neighbours stage, checked by a rerun: each shard's .npy against its
# progress record (exists, done, at the recorded size), in parallel over shard ranges, so that the
# launcher reads one outputs record whatever the number of shards. A shard that is not whole is
# removed, and then the outputs record, so that the stage runs again and rebuilds just that shard.


def _not_whole_shards(rows: tuple[int, int], db: str, stage: str) -> Iterator[int]:
  shard_path = _SHARD_PATHS[stage]
  for shard in range(*rows):
    npy = shard_path(db, shard)
    if not layout.is_finished(npy):
      layout.remove_rows_output(npy)
      if layout.progress_path(npy).exists():
        layout.progress_path(npy).unlink()
      yield shard


def _forget_outputs(count: int, db: str, stage: str) -> None:
  if count and provenance.outputs_path(db, stage).exists():
    provenance.outputs_path(db, stage).unlink()


def _check_ranges(p, n: int, not_whole, combine, record) -> None:
  """The rerun's check: ranges of `n` shards spread over the workers, `not_whole(range)` yielding
  what is not whole in each, combined globally (`combine`) and handed to `record`."""
  _ = (p | "ShardRanges" >> beam.Create(plan_lib.ranges(n))
       | "SpreadShardRanges" >> beam.Reshuffle()
       | "NotWhole" >> beam.FlatMap(not_whole)
       | "Combine" >> combine
       | "Record" >> beam.Map(record))


def _check_whole(p, db: str, stage: str) -> None:
  _check_ranges(p, chunk_store_lib.ChunkStore.open(db).num_shards,
                functools.partial(_not_whole_shards, db=db, stage=stage),
                beam.combiners.Count.Globally(),
                functools.partial(_forget_outputs, db=db, stage=stage))


_SHARD_PATHS = {"embeddings": layout.embeddings_path, "neighbours": layout.neighbours_path}

# The same for a finished global index: each serving shard's record and files, checked by the
# workers over ranges of serving shards; what is not whole is listed in DB/index/global/
# damaged.json for the launcher, which removes the index so that the stage builds it again.
DAMAGED = "damaged.json"


def _damaged_serving_in(rows: tuple[int, int], db: str) -> Iterator[str]:
  yield from global_lib.damaged_serving_files(global_lib.index_dir(db), range(*rows))


def _write_damaged(damaged: list[str], db: str) -> None:
  if damaged:
    layout.write_json_atomic(global_lib.index_dir(db) / DAMAGED,
                             {"count": len(damaged), "first": sorted(damaged)[:8]})


def _check_global_index(p, db: str) -> None:
  _check_ranges(p, len(global_lib.serving_shard_ids(global_lib.read_manifest(
      global_lib.index_dir(db)))), functools.partial(_damaged_serving_in, db=db),
      beam.combiners.Sample.FixedSizeGlobally(64), functools.partial(_write_damaged, db=db))


def remove_shards_not_whole(stage: str, db: str | os.PathLike,
                            beam_args: Sequence[str] | None = None) -> bool:
  """Checks every shard of a finished embeddings or neighbours stage (a Beam pipeline: one stat
  and one small read per shard, on the workers); returns whether any was removed (the stage's
  outputs record is then gone and the stage runs again)."""
  db = os.fspath(db)
  with pipeline(stage_args(beam_args, "check")) as p:
    _check_whole(p, db, stage)
  return not provenance.outputs_path(db, stage).exists()


def global_index_not_whole(db: str | os.PathLike, beam_args: Sequence[str] | None = None
                           ) -> list[str]:
  """Checks every serving shard of a finished global index (a Beam pipeline: a record and a stat
  per file, on the workers); returns some of the files missing or not at their recorded size."""
  db = os.fspath(db)
  marker = global_lib.index_dir(db) / DAMAGED
  if marker.exists():
    marker.unlink()
  with pipeline(stage_args(beam_args, "check")) as p:
    _check_global_index(p, db)
  if not marker.exists():
    return []
  rec = json.loads(marker.read_text())
  marker.unlink()
  return rec["first"] + ([f"{rec['count'] - len(rec['first'])} more"]
                         if rec["count"] > len(rec["first"]) else [])


STAGE_PIPELINES = {"tokenizer": _tokenizer, "chunks": _chunks, "embeddings": _embeddings,
                   "index": _index, "neighbours": _neighbours}


# Stages that run in the launching process on the local runner: the tokenizer and chunks stages
# (planned per unit of files or block of records, but their work on the corpora built here is
# small beside a worker process's start-up; another runner spreads the units over its workers),
# and a stat per shard (the rerun's "check"). The embeddings, index and neighbours stages run in the worker processes asked for.
IN_PROCESS_LOCALLY = ("tokenizer", "chunks", "check")


def stage_args(beam_args: Sequence[str] | None, stage: str) -> list[str] | None:
  """`beam_args` for `stage`: on the local runner, the stages of IN_PROCESS_LOCALLY run in this
  process (Beam's in_memory mode); other runners get the arguments unchanged."""
  if stage not in IN_PROCESS_LOCALLY or not beam_args:
    return None if not beam_args else list(beam_args)
  opts = pipeline_options(beam_args).get_all_options()
  if opts.get("runner") not in (None, "DirectRunner") or opts.get("direct_running_mode") in (
      None, "in_memory"):
    return list(beam_args)
  keep, skip = [], False
  for a in beam_args:
    if skip:  # the value of a dropped "--flag value"
      skip = False
    elif a in ("--direct_running_mode", "--direct_num_workers"):
      skip = True
    elif not a.startswith(("--direct_running_mode=", "--direct_num_workers=")):
      keep.append(a)
  return keep + ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def plan_bytes(p: beam.Pipeline) -> int:
  """Serialized size of a pipeline's job graph (Beam's runner API proto, as a job request)."""
  return len(p.to_runner_api().SerializeToString())


def run_stage(stage: str, db: str | os.PathLike, cfg: dict[str, Any],
              beam_args: Sequence[str] | None = None, plan_only: bool = False) -> int | None:
  """Runs one stage's pipeline to completion (the next stage reads all of its output). With
  `plan_only`, builds the pipeline without running it and returns its serialized size."""
  db = os.fspath(db)
  if plan_only:
    p = beam.Pipeline(runner=fn_runner.FnApiRunner(), options=pipeline_options(beam_args))
    STAGE_PIPELINES[stage](p, db, cfg)
    return plan_bytes(p)
  beam_args = stage_args(beam_args, stage)
  if stage == "embeddings":  # the embedder every block must match, recorded before any runs
    embedder = Embedder.load(dtype=cfg["embed_dtype"], batch_size=cfg["embed_batch_size"])
    embed_lib.check_or_write_info(embedder, layout.embeddings_dir(db))
    epath.Path(layout.embeddings_dir(db)).mkdir(parents=True, exist_ok=True)
  beam_logger = logging.getLogger("apache_beam")
  level = beam_logger.level
  beam_logger.setLevel(logging.CRITICAL)  # a failing element's traceback: the exception has it
  env = worker_env(beam_args, stage)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # inherited by the local runner's worker processes
  try:
    with pipeline(beam_args) as p:
      STAGE_PIPELINES[stage](p, db, cfg)
  except Exception as e:
    user_error = user_error_of(e)
    if user_error is None or user_error is e:
      raise
    raise user_error from e
  finally:
    beam_logger.setLevel(level)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
