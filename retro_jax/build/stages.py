r"""Every stage of the retrieval database, in order: corpus -> tokenizer -> chunks -> embeddings ->
index -> training neighbours.

Each stage is an Apache Beam pipeline over the other modules' stage functions
(retro_jax/build/pipeline.py), run to completion before the next starts (each reads all of the
previous one's output), on whichever runner `beam_args` name: the in-process DirectRunner by
default, the DirectRunner over several local processes (`make db`), or Dataflow, Flink or Spark
(docs/beam.md). Every stage is restartable (its elements skip finished work); a stage whose
outputs are all finished and whose provenance record (retro_jax.db.provenance: settings,
tokenizer, input checksums) matches this run is skipped, so a rerun of a finished build rebuilds
nothing. A record that differs stops the build with an error naming the
difference (`--rebuild` rebuilds instead); missing or damaged outputs are rebuilt (a rerun checks
each embeddings and neighbours shard in a small pipeline of its own: `_remove_damaged`). Wall times
per stage are printed and written to `DB/build_times.json`.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from typing import Any, Callable, Sequence

from etils import epath

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.build import pipeline as pipeline_lib
from retro_jax.build.settings import DEFAULTS
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, provenance
from retro_jax.db import prepare as prepare_lib
from retro_jax.db.layout import write_json_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib

STAGES = ("tokenizer", "chunks", "embeddings", "index", "neighbours")

class BuildError(UserError, RuntimeError):
  """A stage whose inputs are not finished (an earlier stage not run, or killed)."""


# ------------------------------------------------------------------------------------------------
# "Is this stage finished?" checks (cheap; the stages themselves also skip finished shards).


def _store(db: epath.Path) -> chunk_store_lib.ChunkStore:
  return chunk_store_lib.ChunkStore.open(db)  # manifest.json only: no shard list


def _outputs_done(db: epath.Path, stage: str, store: chunk_store_lib.ChunkStore) -> bool:
  """The stage's outputs record names every store shard (one small file; `--audit` checks the
  shards themselves)."""
  rec = provenance.read_outputs(db, stage)
  return rec is not None and rec.get("num_shards") == store.num_shards


def _index_done(db: epath.Path, backend: str, store: chunk_store_lib.ChunkStore) -> bool:
  if backend == index_lib.GLOBAL_BACKEND:
    return build_index_lib.global_index_done(str(db), store.num_chunks)
  # The per-shard backends (small databases): one manifest per index shard.
  return all((layout.index_shard_dir(layout.index_dir(db, backend), s) / index_lib.MANIFEST).exists()
             for s in range(store.num_shards))


def is_done(stage: str, db: epath.Path, cfg: dict[str, Any]) -> bool:
  """Whether `stage` is finished, from a few small files whatever the database's size."""
  if stage == "tokenizer":
    want = (layout.BPE_TOKENIZER_PATH if prepare_lib.is_bpe_tokenizer(cfg["tokenizer"])
            else layout.TOKENIZER_PATH)
    return (db / want).exists()
  if stage == "chunks":
    return (db / layout.CHUNKS_DIR / layout.MANIFEST).exists()
  if stage == "finalize":  # the upgrade of an older database (`_stage_finalize`)
    return (_store_current(db) and not global_lib.lists_files_missing(global_lib.index_dir(db))
            and not neighbours_lib.without_block_checksums(db, _store(db)))
  if not is_done("chunks", db, cfg):
    return False
  if stage in ("embeddings", "neighbours"):
    return _outputs_done(db, stage, _store(db))
  if stage == "index":
    return _index_done(db, cfg["backend"], _store(db))
  raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES + ('finalize',)}.")


# ------------------------------------------------------------------------------------------------
# Stages: each a Beam pipeline (retro_jax.build.pipeline).


def _store_current(db: epath.Path) -> bool:
  """Whether the chunk store's manifest is of this code's format."""
  path = db / layout.CHUNKS_DIR / layout.MANIFEST
  return (path.exists() and json.loads(path.read_text()).get("format_version")
          == chunk_store_lib.FORMAT_VERSION)


def _stage_finalize(db: epath.Path, cfg: dict[str, Any], beam_args) -> None:
  """The upgrade: a store of an older format (or none finalized yet) is finalized again; a global
  index built before lists files gets them (one walk over each serving shard's faiss file; its
  faiss files and manifest unchanged); neighbours records without block checksums get them (the
  .npy files unchanged)."""
  if not _store_current(db):
    chunk_store_lib.finalize_chunk_store(db / layout.CHUNKS_DIR)
  shards = global_lib.write_lists_files(global_lib.index_dir(db))
  if shards:
    print(f"[build_db] finalize: wrote the lists files of {len(shards)} serving shards",
          flush=True)
  upgraded = neighbours_lib.add_block_checksums(db, _store(db))
  if upgraded:
    print(f"[build_db] finalize: block checksums recorded for {len(upgraded)} neighbours "
          "shard(s)", flush=True)


def _check_inputs(stage: str, db: epath.Path, cfg: dict[str, Any]) -> None:
  """A stage whose inputs are not all finished stops with an error naming them."""
  if stage == "index" and not _outputs_done(db, "embeddings", _store(db)):
    raise BuildError(f"{db}/embeddings is not finished; run the embeddings stage first "
                     "(--stages=embeddings).")
  if stage == "neighbours" and not _index_done(db, cfg["backend"], _store(db)):
    raise BuildError(f"{db}/index/{cfg['backend']} is not finished; the neighbours search the "
                     "whole index, so build it first (--stages=index).")


def _stage_pipeline(stage: str) -> Callable[[epath.Path, dict[str, Any], Any], None]:
  def run(db: epath.Path, cfg: dict[str, Any], beam_args) -> None:
    _check_inputs(stage, db, cfg)
    pipeline_lib.run_stage(stage, db, cfg, beam_args)
  return run


_RUNNERS: dict[str, Callable[[epath.Path, dict[str, Any], Any], None]] = {
    **{s: _stage_pipeline(s) for s in STAGES}, "finalize": _stage_finalize}

# build_db's own flags besides the settings (for the suggestion in an unknown flag's error).
COMMAND_FLAGS = ("db", "stages", "rebuild", "audit", "num_neighbours", "config", "examples_epochs",
                 "examples_per_shard")


def check_beam_args(beam_args: Sequence[str]) -> None:
  """Arguments that are neither build_db's nor Beam's stop the build before it starts, named
  (Beam would drop them with a warning and build with the defaults)."""
  unknown = pipeline_lib.unknown_options(beam_args)
  if not unknown:
    return
  ours = [f"--{n}" for n in (*DEFAULTS, *COMMAND_FLAGS)]
  hints = []
  for arg in unknown:
    if arg.startswith("--"):
      close = difflib.get_close_matches(arg.split("=", 1)[0], ours, n=1, cutoff=0.8)
      hints += [f"{arg.split('=', 1)[0]}: did you mean {close[0]}?"] if close else []
  raise BuildError(f"unknown flag(s) {' '.join(unknown)}: neither build_db's nor Beam's "
                   f"(python -m retro_jax.build_db --help; Beam's: docs/beam.md)"
                   + (f"; {' '.join(hints)}" if hints else ""))


def check_provenance(stage: str, db: epath.Path, cfg: dict[str, Any], rebuild: bool,
                     audit: bool = False) -> dict[str, Any] | None:
  """This run's record of `stage` (None for 'finalize'); raises ProvenanceMismatchError when the
  finished stage was built from something else, unless `rebuild` (its outputs are then deleted).
  With `audit`, every output is read and the damaged or partial ones removed so that the stage
  rebuilds them (the whole database: a run without it reads a few small files per stage)."""
  if stage not in provenance.STAGE_SETTINGS:
    return None
  want = provenance.expected(stage, db, cfg)
  have = provenance.read(db, stage, cfg)
  diff = provenance.differences(have, want) if have is not None else []
  if diff and not rebuild:
    raise provenance.ProvenanceMismatchError(
        f"the {stage} stage of {db} was built from other inputs ({'; '.join(diff)}); rerun with "
        f"--rebuild to rebuild it and the stages after it, or use another --db")
  if diff:
    print(f"[build_db] {stage}: rebuilding ({'; '.join(diff)})", flush=True)
    provenance.clear_outputs(stage, db, cfg)
    want = provenance.expected(stage, db, cfg)
  for what in (provenance.repair(stage, db, cfg) if audit else ()):
    print(f"[build_db] {stage}: {what} is missing or damaged; rebuilding it", flush=True)
  return want


def _remove_damaged(stage: str, db: epath.Path, cfg: dict[str, Any], audit: bool,
                    beam_args) -> None:
  """A finished global index with a file missing or not at its recorded size (with `audit`: or
  not at its recorded sha256, every file read) is removed, so that this run builds it again; so
  is a finished embeddings or neighbours shard missing or not at its recorded size. The serving
  shards and the embeddings and neighbours shards are checked by a Beam pipeline over them: the
  launcher reads a few records whatever their number."""
  if stage in ("embeddings", "neighbours") and not audit and is_done(stage, db, cfg):
    if pipeline_lib.remove_shards_not_whole(stage, db, beam_args):
      print(f"[build_db] {stage}: a shard was missing or not at its recorded size; rebuilding "
            "it", flush=True)
  if stage == "index" and cfg["backend"] == index_lib.GLOBAL_BACKEND:
    # The launcher checks the few files outside the serving shards (all of them with `audit`).
    damaged = build_index_lib.remove_damaged_global_index(str(db), contents=audit, serving=audit)
    if not damaged and not audit and is_done(stage, db, cfg):
      damaged = pipeline_lib.global_index_not_whole(db, beam_args)
      if damaged:
        build_index_lib.remove_global_index(str(db))
    if damaged:
      print(f"[build_db] index: damaged ({'; '.join(damaged)}); rebuilding it", flush=True)


def build(db_dir: str | os.PathLike, stages=STAGES, rebuild: bool = False,
          beam_args: Sequence[str] | None = None, audit: bool = False,
          plan_only: bool = False, **kwargs: Any) -> dict[str, Any]:
  """Runs `stages` in order (finished ones skipped); returns and writes OUT/build_times.json.

  Each stage is a Beam pipeline run with `beam_args` (Beam's flags, e.g. `--runner=DirectRunner
  --direct_running_mode=multi_processing --direct_num_workers=2`; none: in-process DirectRunner).
  A finished stage is skipped only when its provenance record (retro_jax.db.provenance) matches
  this run; `rebuild` rebuilds a stage whose record differs instead of stopping; `audit` first
  checks every output of every stage (reading the whole database) and rebuilds what is damaged.
  `plan_only` builds each stage's pipeline without running it (finished or not) and returns
  {"stages": {stage: {"graph_bytes"}}}: the job graph a runner would be sent (nothing written)."""
  unknown = set(kwargs) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"build() got unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}.")
  check_beam_args(beam_args or ())
  cfg = {**DEFAULTS, **kwargs}
  for s in stages:
    if s not in _RUNNERS:
      raise ValueError(f"Unknown stage {s!r}; expected some of {tuple(_RUNNERS)}.")
  db = layout.make_dir(db_dir, "--db")  # local or gs:// (checked reachable); never a local "gs:"
  times_path = db / layout.BUILD_TIMES
  previous = json.loads(times_path.read_text()).get("stages", {}) if times_path.exists() else {}
  record: dict[str, Any] = {"settings": cfg, "beam_args": list(beam_args or []),
                            "stages": dict(previous)}
  t_all = time.perf_counter()
  for stage in stages:
    t0 = time.perf_counter()
    want = check_provenance(stage, db, cfg, rebuild, audit)
    if plan_only:
      record["stages"][stage] = {
          "graph_bytes": pipeline_lib.run_stage(stage, db, cfg, beam_args, plan_only=True)}
      continue
    _remove_damaged(stage, db, cfg, audit, beam_args)
    if is_done(stage, db, cfg):
      if want is not None:  # (also records a database built before provenance records)
        provenance.write(db, stage, cfg, want)
      seconds = time.perf_counter() - t0
      prev = previous.get(stage, {})
      record["stages"][stage] = {"seconds": seconds, "skipped": True,
                                 "build_seconds": prev.get("build_seconds")}
      print(f"[build_db] {stage}: already done, skipped", flush=True)
      continue
    print(f"[build_db] {stage}: running", flush=True)
    _RUNNERS[stage](db, cfg, beam_args)
    if want is not None:
      provenance.write(db, stage, cfg, provenance.expected(stage, db, cfg))
    seconds = time.perf_counter() - t0
    record["stages"][stage] = {"seconds": seconds, "skipped": False, "build_seconds": seconds}
    print(f"[build_db] {stage}: {seconds:.1f} s", flush=True)
    write_json_atomic(times_path, record)  # After each stage, so a killed build keeps its times.
  if plan_only:
    return {"stages": {s: record["stages"][s] for s in stages}}
  record["total_seconds"] = time.perf_counter() - t_all
  record["total_build_seconds"] = sum(v.get("build_seconds") or 0.0
                                      for v in record["stages"].values())
  write_json_atomic(times_path, record)
  print(f"[build_db] total {record['total_seconds']:.1f} s this run "
        f"({record['total_build_seconds']:.1f} s of stage build time); times in {times_path}",
        flush=True)
  return record
