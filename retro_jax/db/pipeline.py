r"""The retrieval-database build as Apache Beam pipelines over the stage functions.

Each stage (retro_jax/db/build.py runs them in order, skipping finished ones) is one pipeline:

  tokenizer   one element: `prepare.build_tokenizer` (SentencePiece on a deterministic sample of the
              non-held-out documents, on one worker), or the given --tokenizer copied.
  chunks      the corpus is read and planned into chunk-store shards; one element per shard:
              tokenise and chunk its documents (`chunk_store.write_store_shard`); then one element
              writes the manifest (`finalize_chunk_store`). A random-access corpus (TFDS
              ArrayRecord) is instead classified in parallel blocks of records, one element picks
              the documents (the ids and stats of a whole read), and each shard's worker reads only
              its own records.
  embeddings  one element per block of `EMBED_BLOCK_ROWS` rows of a store shard: a DoFn that loads
              the JAX MiniLM once per worker (`setup`) embeds the block into a part file
              (`layout.embedding_part_path`, written atomically, so a finished part is never redone);
              the parts are grouped by shard and assembled into `embeddings/shard-XXXXX.npy`
              (the same bytes as `embed.embed_shard`'s, block for block).
  index       the global index (one element: partitioner and quantizer trained on a sample, every
              vector encoded, partitions grouped into serving shards), or one element per
              embeddings shard for the per-shard backends.
  neighbours  one element per store shard: `neighbours.neighbours_shard`, the index loaded once per
              worker.

Every element skips finished work, so a killed pipeline started again redoes only unfinished
blocks and shards. Runner options are Beam's own flags (`--runner`, `--direct_num_workers`,
`--direct_running_mode`, Dataflow's `--project/--region/--temp_location`, ...): see docs/beam.md.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import logging
import os
import re
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus as corpus_lib
from retro_jax.db import layout
from retro_jax.db import neighbours as neighbours_lib
from retro_jax.db import prepare as prepare_lib
from retro_jax.db.layout import write_bytes_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval.embedder import Embedder

# Rows per embedding element: embed.embed_to_npy's block, so the assembled shard is its bytes.
EMBED_BLOCK_ROWS = 4096


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
  so that N workers do not each spin on every core. The index stage is one element: all cores."""
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
  """A store shard of a random-access corpus: reads only its own record spans, planned by
  `_select_shards` (the same ids and corpus stats as reading the whole corpus)."""

  def __init__(self, db: str, cfg: dict[str, Any], parts: list[corpus_lib.RandomAccessPart]):
    super().__init__(db, cfg)
    self._parts = parts

  def process(self, item: tuple[int, list[tuple[int, int, int]], int, dict]):
    shard, spans, num_docs, stats = item
    written = chunk_store_lib.write_store_shard_docs(
        layout.chunks_dir(self._db), shard,
        lambda: corpus_lib.read_spans(self._parts, spans, num_docs), self._tok, self._settings,
        stats)
    yield shard, written


def _select_shards(scans: list[dict], parts: list[corpus_lib.RandomAccessPart],
                   cfg: dict[str, Any]) -> Iterator[tuple[int, list, int, dict]]:
  """(shard, its record spans, its document count, corpus stats) of every store shard."""
  sel = corpus_lib.select_documents(cfg["corpus"], parts, scans, cfg["max_docs"])
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


def embedding_blocks(db: str) -> list[tuple[int, int, int]]:
  """(shard, start row, end row) of every block of every unfinished embeddings shard."""
  store = chunk_store_lib.ChunkStore.open(db)
  out = []
  for shard, _, count in store.shard_spans():
    if layout.is_finished(layout.embeddings_path(db, shard)):
      continue
    out += [(shard, a, min(a + EMBED_BLOCK_ROWS, count)) for a in range(0, count, EMBED_BLOCK_ROWS)]
  return out


def _npy_bytes(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, a, allow_pickle=False)
  return buf.getvalue()


class _EmbedBlock(beam.DoFn):
  """Embeds one block of a shard into its part file, unless a finished part is there; the
  MiniLM is loaded once per worker. Yields (shard, (start, embedded?))."""

  def __init__(self, db: str, dtype: str, batch_size: int):
    self._db, self._dtype, self._batch_size = db, dtype, batch_size

  def setup(self):
    pin_worker()  # before XLA starts its threads
    self._embedder = Embedder.load(dtype=self._dtype, batch_size=self._batch_size)
    self._store = chunk_store_lib.ChunkStore.open(self._db)
    self._tok = prepare_lib.load_db_tokenizer(self._db)

  def process(self, block: tuple[int, int, int]):
    shard, start, end = block
    part = layout.embedding_part_path(self._db, shard, start)
    if part.exists():
      yield shard, (start, False)
      return
    first_id = self._store.shard_spans()[shard][1]
    texts = self._store.chunk_text(np.arange(first_id + start, first_id + end, dtype=np.int64),
                                   self._tok)
    vecs_BxD = np.asarray(self._embedder.embed(texts), np.float32)
    part.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(part, _npy_bytes(vecs_BxD))
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
    count = chunk_store_lib.ChunkStore.open(self._db).shard_spans()[shard][2]
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
# Index and neighbours.


def _build_index_shard(shard: int | None, db: str, backend: str) -> str:
  if backend == index_lib.GLOBAL_BACKEND:
    build_index_lib.build_global_index(db)
    return str(layout.index_dir(db, backend))
  return build_index_lib.build_index(db, index_lib.IndexConfig(backend=backend), shards={shard})[0]


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


# ------------------------------------------------------------------------------------------------
# The stages.


def _tokenizer(p, db: str, cfg: dict[str, Any]) -> None:
  _ = (p | "Db" >> beam.Create([db])
       | "TrainSentencePiece" >> beam.Map(
           lambda d: prepare_lib.build_tokenizer(
               cfg["corpus"], d, vocab_size=cfg["vocab_size"], seed=cfg["seed"],
               heldout_fraction=cfg["heldout_fraction"], max_docs=cfg["max_docs"],
               tokenizer_path=cfg["tokenizer"]) and None))


def _chunks(p, db: str, cfg: dict[str, Any]) -> None:
  """A random-access corpus (every part tfds:) is classified in parallel blocks and each shard's
  worker reads only its records; any other is read whole by the planner and every worker."""
  layout.chunks_dir(db).mkdir(parents=True, exist_ok=True)
  parts = corpus_lib.random_access_parts(cfg["corpus"])
  if parts is None:
    shards = (p | "Corpus" >> beam.Create([cfg["corpus"]])
              | "ReadAndPlan" >> beam.FlatMap(_plan_store_shards, cfg)
              | "Distribute" >> beam.Reshuffle()
              | "TokeniseAndChunk" >> beam.ParDo(_WriteStoreShard(db, cfg)))
  else:
    shards = (p | "Blocks" >> beam.Create(corpus_lib.scan_blocks(parts, cfg["max_docs"]))
              | "SpreadBlocks" >> beam.Reshuffle()
              | "Classify" >> beam.Map(lambda block: corpus_lib.scan_block(parts, block))
              | "AllBlocks" >> beam.combiners.ToList()
              | "Select" >> beam.FlatMap(_select_shards, parts, cfg)
              | "Distribute" >> beam.Reshuffle()
              | "TokeniseAndChunk" >> beam.ParDo(_WriteSelectedShard(db, cfg, parts)))
  _ = (shards | "AllShards" >> beam.combiners.ToList()
       | "Finalize" >> beam.Map(_finalize, db))


def _embeddings(p, db: str, cfg: dict[str, Any]) -> None:
  blocks = embedding_blocks(db)
  if not blocks:
    return
  _ = (p | "Blocks" >> beam.Create(blocks)
       | "Embed" >> beam.ParDo(_EmbedBlock(db, cfg["embed_dtype"], cfg["embed_batch_size"]))
       | "ByShard" >> beam.GroupByKey()
       | "Assemble" >> beam.ParDo(_AssembleShard(db)))


def _index(p, db: str, cfg: dict[str, Any]) -> None:
  backend = cfg["backend"]
  store = chunk_store_lib.ChunkStore.open(db)
  shards = ([None] if backend == index_lib.GLOBAL_BACKEND
            else [s for s, _, _ in store.shard_spans()])
  _ = (p | "Shards" >> beam.Create(shards)
       | "BuildIndex" >> beam.Map(_build_index_shard, db, backend))


def _neighbours(p, db: str, cfg: dict[str, Any]) -> None:
  store = chunk_store_lib.ChunkStore.open(db)
  todo = [s for s, _, _ in store.shard_spans() if not neighbours_lib.shard_is_done(db, s)]
  if not todo:
    return
  _ = (p | "Shards" >> beam.Create(todo)
       | "Reshuffle" >> beam.Reshuffle()
       | "Neighbours" >> beam.ParDo(_NeighboursShard(db, cfg["k"], cfg["backend"])))


STAGE_PIPELINES = {"tokenizer": _tokenizer, "chunks": _chunks, "embeddings": _embeddings,
                   "index": _index, "neighbours": _neighbours}


# Stages that run in the launching process on the local runner: each is one or a few elements
# whose work is small beside a worker process's start-up (importing JAX, faiss, reading the
# corpus again); the embeddings stage is the one that gains from parallel local workers.
IN_PROCESS_LOCALLY = ("tokenizer", "chunks", "index", "neighbours")


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


def run_stage(stage: str, db: str | os.PathLike, cfg: dict[str, Any],
              beam_args: Sequence[str] | None = None) -> None:
  """Runs one stage's pipeline to completion (the next stage reads all of its output)."""
  db = os.fspath(db)
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
