"""The `examples` stage: the training examples joined with their neighbours, written ahead of time.

    python -m retro_jax.build_db --db=DB --stages=examples --config=experiments/tiny.py

An Apache Beam pipeline (the runner `beam_args` name, as the database stages: retro_jax.build.
pipeline) over fixed-size groups of example indices: the launcher reads the chunk store's metadata
and puts at most `plan.PLAN_RANGES` shard ranges into the graph (retro_jax.build.plan); a worker
expands its range into shards, skips the finished ones and writes each one's `examples_per_shard`
records (`SequenceSource[i]` for the i the random path's order gives; the format:
retro_jax.training.joined_examples). The last element writes the manifest. Restartable: a killed
build redoes only the shards not written; a finished matching set is skipped; a set of other inputs
stops the build unless `rebuild`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import apache_beam as beam
import grain
import numpy as np
from array_record.python import array_record_module
from etils import epath

from retro_jax.build import pipeline as pipeline_lib
from retro_jax.build import plan as plan_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.training import experiment
from retro_jax.training import input_pipeline
from retro_jax.training import joined_examples as joined


def settings_from_experiment(c) -> joined.Settings:
  """The training split's settings of an experiment (retro_jax.training.experiment): what
  retro_jax.training.loop asks the loader for."""
  c = experiment.with_defaults(c)
  cfg = experiment.model_config(c)
  return joined.Settings(split="train", seq_len=int(c.seq_len), retrieval=bool(cfg.retrieval),
                         num_neighbours=(int(c.num_neighbours or cfg.num_neighbours)
                                         if cfg.retrieval else 0),
                         neighbour_len=int(cfg.neighbour_len), seed=int(c.seed),
                         self_neighbour_rate=(float(c.self_neighbour_rate) if cfg.retrieval
                                              else 0.0),
                         neighbour_shift=int(c.neighbour_shift) if cfg.retrieval else 0)


def num_sequences(store, settings: joined.Settings) -> int:
  """How many sequences the split has (SequenceSource's length), from the store's metadata."""
  stream = input_pipeline.ChunkStream.for_split(store, settings.split)
  return stream.size // (settings.seq_len // int(store.chunk_size))


def element_order(n: int, settings: joined.Settings, epochs: int) -> grain.MapDataset:
  """Global element j -> sequence index: the random path's `source -> shuffle -> repeat` order
  (input_pipeline.order over the same n) for `epochs` epochs."""
  return input_pipeline.order(grain.MapDataset.range(n), settings.seed, settings.shuffle, epochs)


def plan(db: str | os.PathLike, settings: joined.Settings, epochs: int = 1,
         examples_per_shard: int = joined.EXAMPLES_PER_SHARD) -> dict[str, Any]:
  """The build's record (building.json, and the manifest's body): totals only."""
  store = chunk_store_lib.ChunkStore.open(db)
  if settings.seq_len <= 0 or settings.seq_len % int(store.chunk_size):
    raise joined.JoinedExamplesError(f"seq_len={settings.seq_len} must be a positive multiple "
                                     f"of the chunk size {store.chunk_size} of {db}.")
  if epochs < 1 or examples_per_shard < 1:
    raise joined.JoinedExamplesError(f"epochs={epochs} and examples_per_shard="
                                     f"{examples_per_shard} must be >= 1.")
  n = num_sequences(store, settings)
  records = n * epochs
  return {"format_version": joined.FORMAT_VERSION, "settings": settings.to_json(),
          "epochs": int(epochs),
          "db_fingerprint": joined.db_fingerprint(db, store), "num_sequences": n,
          "num_records": records, "examples_per_shard": int(examples_per_shard),
          "num_shards": -(-records // examples_per_shard),
          "token_dtype": joined.token_dtype(store).name,
          "shapes": joined.record_shapes(settings, int(store.chunk_size))}


def start(db: str | os.PathLike, settings: joined.Settings, epochs: int, examples_per_shard: int,
          rebuild: bool = False) -> tuple[epath.Path, dict[str, Any], bool]:
  """(directory, record, finished): a finished matching set is left alone; a set built from
  other inputs is an error unless `rebuild` (then cleared); an unfinished one of other inputs is
  cleared (its shards are not these)."""
  directory = joined.examples_dir(db, settings)
  record = plan(db, settings, epochs, examples_per_shard)
  manifest = joined.read_json(directory / joined.MANIFEST)
  if manifest is not None:
    if _same_build(manifest, record):
      return directory, record, True
    if not rebuild:
      raise joined.JoinedExamplesError(
          f"{directory} holds examples of another database state or layout "
          f"({'; '.join(_differences(manifest, record))}); rerun with --rebuild to rewrite them")
  building = joined.read_json(directory / joined.BUILDING)
  if manifest is not None or (building is not None and not _same_build(building, record)):
    _clear(directory)
  directory.mkdir(parents=True, exist_ok=True)
  layout.write_json_atomic(directory / joined.BUILDING, record)
  return directory, record, False


def _same_build(a: dict, b: dict) -> bool:
  return not _differences(a, b)


def _differences(have: dict, want: dict) -> list[str]:
  keys = ("format_version", "settings", "epochs", "db_fingerprint", "num_records",
          "examples_per_shard", "token_dtype", "shapes")
  return [f"{k}: {have.get(k)} != {want.get(k)}" for k in keys if have.get(k) != want.get(k)]


def _clear(directory: epath.Path) -> None:
  if directory.exists():
    for p in directory.iterdir():
      p.unlink()


class ShardWriter:
  """Writes shards of one examples set (one per worker: the SequenceSource opened once)."""

  def __init__(self, db: str, settings: joined.Settings, record: dict[str, Any]):
    self.directory = joined.examples_dir(db, settings)
    self.record = record
    self.source = input_pipeline.SequenceSource(
        db, settings.seq_len, settings.split, settings.retrieval,
        settings.num_neighbours if settings.retrieval else None, settings.neighbour_len,
        self_neighbour_rate=settings.self_neighbour_rate, seed=settings.seed,
        neighbour_shift=settings.neighbour_shift)
    self.order = element_order(len(self.source), settings, record["epochs"])
    self.dtype = np.dtype(record["token_dtype"])

  def write(self, s: int) -> int:
    """Writes shard `s` (skipped when present: a shard appears whole); returns its records."""
    per = self.record["examples_per_shard"]
    lo, hi = s * per, min((s + 1) * per, self.record["num_records"])
    out = joined.shard_path(self.directory, s)
    if out.exists():
      return hi - lo
    remote = layout.is_remote(out)  # ArrayRecord writes local files: gs:// gets an upload
    with tempfile.TemporaryDirectory(prefix=".examples-",
                                     dir=None if remote else os.fspath(out.parent)) as tmp:
      local = os.path.join(tmp, out.name)
      writer = array_record_module.ArrayRecordWriter(local, joined.WRITER_OPTIONS)
      try:
        for j in range(lo, hi):
          writer.write(joined.encode(self.source[self.order[j]], self.dtype))
      finally:
        writer.close()
      if remote:  # one object, created whole when the upload completes
        epath.Path(local).copy(out, overwrite=True)
      else:
        os.replace(local, os.fspath(out))
    return hi - lo


def finish(db: str | os.PathLike, settings: joined.Settings, record: dict[str, Any]
           ) -> dict[str, Any]:
  """The manifest, written last (after every shard), when every shard is present."""
  directory = joined.examples_dir(db, settings)
  missing = [s for s in range(record["num_shards"])
             if not joined.shard_path(directory, s).exists()]
  if missing:
    raise joined.JoinedExamplesError(f"{directory}: shards {missing[:5]} are missing after the "
                                     "build")
  layout.write_json_atomic(directory / joined.MANIFEST, record)
  return record


class _WriteShard(beam.DoFn):
  """Writes shards of the examples set (the SequenceSource opened once per worker)."""

  def __init__(self, db: str, settings: joined.Settings, record: dict[str, Any]):
    self.db, self.settings, self.record = db, settings, record

  def setup(self):
    self.writer = ShardWriter(self.db, self.settings, self.record)

  def process(self, shard: int):
    yield self.writer.write(shard)


def _pipeline(p, db: str, settings: joined.Settings, record: dict[str, Any]) -> None:
  _ = (p | "Ranges" >> beam.Create(plan_lib.ranges(record["num_shards"]))
       | "SpreadRanges" >> beam.Reshuffle()
       | "Shards" >> beam.FlatMap(lambda r: range(*r))
       | "Distribute" >> beam.Reshuffle()
       | "WriteShard" >> beam.ParDo(_WriteShard(db, settings, record))
       | "AllShards" >> beam.combiners.Count.Globally()
       | "Manifest" >> beam.Map(lambda _: finish(db, settings, record)))


def plan_bytes(db: str | os.PathLike, settings: joined.Settings, epochs: int = 1,
               examples_per_shard: int = joined.EXAMPLES_PER_SHARD) -> int:
  """The serialized job graph of the stage (built, not run): its size does not grow with the
  database (tests)."""
  p = beam.Pipeline(options=pipeline_lib.pipeline_options(None))
  _pipeline(p, os.fspath(db), settings, plan(db, settings, epochs, examples_per_shard))
  return pipeline_lib.plan_bytes(p)


def run(db: str | os.PathLike, settings: joined.Settings, *, epochs: int = 1,
        examples_per_shard: int = joined.EXAMPLES_PER_SHARD,
        beam_args: Sequence[str] | None = None, rebuild: bool = False) -> dict[str, Any]:
  """Builds (or finds finished) the examples of `settings`; returns their manifest."""
  db = os.fspath(db)
  directory, record, finished = start(db, settings, epochs, examples_per_shard, rebuild)
  if finished:
    print(f"[build_db] examples: {directory} already done, skipped", flush=True)
    return record
  print(f"[build_db] examples: writing {record['num_records']} examples in "
        f"{record['num_shards']} shards to {directory}", flush=True)
  try:
    with pipeline_lib.pipeline(beam_args) as p:
      _pipeline(p, db, settings, record)
  except Exception as e:
    user_error = pipeline_lib.user_error_of(e)
    if user_error is None or user_error is e:
      raise
    raise user_error from e
  return record
