r"""Every stage of the retrieval database, in order: corpus -> tokenizer -> chunks -> embeddings ->
index -> training neighbours.

Each stage is the other modules' stage function (retro_jax.db.prepare, retro_jax.retrieval.embed,
retro_jax.retrieval.index, retro_jax.db.neighbours), each restartable; a stage whose outputs are
all finished and whose provenance record (retro_jax.db.provenance: settings, tokenizer, input
checksums) matches this run is skipped without being entered, so a rerun of a finished build does
nothing. A record that differs stops the build with an error naming the difference (`--rebuild`
rebuilds instead); missing or damaged outputs are rebuilt. Wall
times per stage are printed and written to `DB/build_times.json`.

On a pod, every host runs the same command with its `--shard_index/--num_shards`; the stages that
need every host's output (the chunk-store manifest, the index offsets, the neighbours' search over
all index shards) need a barrier in between: run with `--stages=tokenizer` on one host, then
`--stages=chunks` on all (and `--stages=finalize` on one), then `--stages=embeddings,index`, then
`--stages=neighbours`. A stage whose inputs are not all finished stops with an error naming them.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, provenance
from retro_jax.db import neighbours as neighbours_lib
from retro_jax.db import prepare as prepare_lib
from retro_jax.db.layout import write_json_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.embedder import Embedder

STAGES = ("tokenizer", "chunks", "embeddings", "index", "neighbours")

class BuildError(UserError, RuntimeError):
  """A stage whose inputs are not finished (e.g. another host's shard)."""


# ------------------------------------------------------------------------------------------------
# "Is this stage finished?" checks (cheap; the stages themselves also skip finished shards).


def _my_store_shards(db: pathlib.Path, shard_index: int, num_shards: int) -> list[tuple[int, int, int]]:
  store = chunk_store_lib.ChunkStore.open(db)
  return [s for s in store.shard_spans() if s[0] % num_shards == shard_index]


def _embeddings_done(db: pathlib.Path, shards) -> bool:
  for shard, _, _ in shards:
    if not layout.is_finished(layout.embeddings_path(db, shard)):
      return False
  return True


def _index_done(db: pathlib.Path, backend: str, shards) -> bool:
  if backend == index_lib.GLOBAL_BACKEND:
    return build_index_lib.global_index_done(str(db))
  return all((layout.index_shard_dir(layout.index_dir(db, backend), s) / index_lib.MANIFEST).exists()
             for s, _, _ in shards)


def is_done(stage: str, db: pathlib.Path, cfg: dict[str, Any]) -> bool:
  if stage == "tokenizer":
    want = (layout.BPE_TOKENIZER_PATH if prepare_lib.is_bpe_tokenizer(cfg["tokenizer"])
            else layout.TOKENIZER_PATH)
    return (db / want).exists()
  if stage in ("chunks", "finalize"):
    return (db / layout.CHUNKS_DIR / layout.MANIFEST).exists()
  if not is_done("chunks", db, cfg):
    return False
  shards = _my_store_shards(db, cfg["shard_index"], cfg["num_shards"])
  if stage == "embeddings":
    return _embeddings_done(db, shards)
  if stage == "index":
    return _index_done(db, cfg["backend"], shards)
  if stage == "neighbours":
    return all(neighbours_lib.shard_is_done(db, s) for s, _, _ in shards)
  raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES + ('finalize',)}.")


# ------------------------------------------------------------------------------------------------
# Stages.


def _stage_tokenizer(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  prepare_lib.build_tokenizer(cfg["corpus"], db, vocab_size=cfg["vocab_size"], seed=cfg["seed"],
                              heldout_fraction=cfg["heldout_fraction"], max_docs=cfg["max_docs"],
                              tokenizer_path=cfg["tokenizer"])


def _stage_chunks(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  tok = prepare_lib.load_db_tokenizer(db)
  chunk_store_lib.build_chunk_store(
      cfg["corpus"], db / layout.CHUNKS_DIR, tok, chunk_size=cfg["chunk_size"],
      docs_per_shard=cfg["docs_per_shard"], heldout_fraction=cfg["heldout_fraction"],
      seed=cfg["seed"], max_docs=cfg["max_docs"], shard_index=cfg["shard_index"],
      num_shards=cfg["num_shards"], finalize=cfg["num_shards"] == 1)


def _stage_finalize(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  chunk_store_lib.finalize_chunk_store(db / layout.CHUNKS_DIR)


def _stage_embeddings(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  embedder = Embedder.load(dtype=cfg["embed_dtype"], batch_size=cfg["embed_batch_size"])
  embed_lib.embed_chunk_store(db, embedder, shard_index=cfg["shard_index"],
                              num_shards=cfg["num_shards"])


def build_index_shards(db: pathlib.Path, backend: str, shard_index: int = 0,
                       num_shards: int = 1) -> list[str]:
  """This host's index shards (retro_jax.retrieval.build_index: finished shards are kept), once
  every store shard has its embeddings."""
  embs = retriever_lib.embedding_paths(str(db))
  want = {s for s, _, _ in _my_store_shards(db, shard_index, num_shards)}
  have = {layout.shard_number(e) for e in embs}
  if want - have or len(have) != len(_my_store_shards(db, 0, 1)):
    raise BuildError(f"{db}/embeddings lacks shards {sorted(want - have) or 'of other hosts'}; "
                     "run the embeddings stage (on every host) first.")
  if backend == index_lib.GLOBAL_BACKEND:  # one index over every shard, built once
    if shard_index == 0:
      build_index_lib.build_global_index(str(db))
    return [str(layout.index_dir(db, backend))]
  return build_index_lib.build_index(str(db), index_lib.IndexConfig(backend=backend),
                                     shard_index=shard_index, num_shards=num_shards)


def _stage_index(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  build_index_shards(db, cfg["backend"], cfg["shard_index"], cfg["num_shards"])


def _stage_neighbours(db: pathlib.Path, cfg: dict[str, Any]) -> None:
  all_shards = _my_store_shards(db, 0, 1)
  if not _index_done(db, cfg["backend"], all_shards):
    raise BuildError(f"{db}/index/{cfg['backend']} is missing shards (another host's?); the "
                     "neighbours search every index shard, so build them all first.")
  neighbours_lib.compute_neighbours(db, k=cfg["k"], backend=cfg["backend"],
                                    shard_index=cfg["shard_index"], num_shards=cfg["num_shards"])


_RUNNERS: dict[str, Callable[[pathlib.Path, dict[str, Any]], None]] = {
    "tokenizer": _stage_tokenizer, "chunks": _stage_chunks, "finalize": _stage_finalize,
    "embeddings": _stage_embeddings, "index": _stage_index, "neighbours": _stage_neighbours}

# embed_batch_size 32: the fastest of 16 / 32 / 64 in bench/embed_throughput.py.
DEFAULTS = dict(corpus="default", max_docs=None, vocab_size=8192, tokenizer=None, chunk_size=64,
                docs_per_shard=4096, heldout_fraction=0.01, seed=0, embed_dtype="bfloat16",
                embed_batch_size=32, backend=index_lib.GLOBAL_BACKEND, k=2, shard_index=0, num_shards=1)


def check_provenance(stage: str, db: pathlib.Path, cfg: dict[str, Any], rebuild: bool
                     ) -> dict[str, Any] | None:
  """This run's record of `stage` (None for 'finalize'); raises ProvenanceMismatchError when the
  finished stage was built from something else, unless `rebuild` (its outputs are then deleted).
  Damaged or partial outputs are removed so that the stage rebuilds them."""
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
  for what in provenance.repair(stage, db, cfg):
    print(f"[build_db] {stage}: {what} is missing or damaged; rebuilding it", flush=True)
  return want


def build(db_dir: str | os.PathLike, stages=STAGES, rebuild: bool = False,
          **kwargs: Any) -> dict[str, Any]:
  """Runs `stages` in order (finished ones skipped); returns and writes OUT/build_times.json.

  A finished stage is skipped only when its provenance record (retro_jax.db.provenance) matches
  this run; `rebuild` rebuilds a stage whose record differs instead of stopping."""
  unknown = set(kwargs) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"build() got unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}.")
  cfg = {**DEFAULTS, **kwargs}
  for s in stages:
    if s not in _RUNNERS:
      raise ValueError(f"Unknown stage {s!r}; expected some of {tuple(_RUNNERS)}.")
  if not 0 <= cfg["shard_index"] < cfg["num_shards"]:
    raise ValueError(f"--shard_index={cfg['shard_index']} must be in [0, --num_shards="
                     f"{cfg['num_shards']}).")
  db = layout.db_root(db_dir)  # local or gs:// (checked reachable); never a local "gs:" dir
  db.mkdir(parents=True, exist_ok=True)
  times_path = db / layout.BUILD_TIMES
  previous = json.loads(times_path.read_text()).get("stages", {}) if times_path.exists() else {}
  record: dict[str, Any] = {"settings": cfg, "stages": dict(previous)}
  t_all = time.perf_counter()
  for stage in stages:
    t0 = time.perf_counter()
    want = check_provenance(stage, db, cfg, rebuild)
    if is_done(stage, db, cfg):
      if want is not None:  # (also records a database built before provenance records)
        provenance.write(db, stage, cfg, provenance.expected(stage, db, cfg))
      seconds = time.perf_counter() - t0
      prev = previous.get(stage, {})
      record["stages"][stage] = {"seconds": seconds, "skipped": True,
                                 "build_seconds": prev.get("build_seconds")}
      print(f"[build_db] {stage}: already done, skipped", flush=True)
      continue
    print(f"[build_db] {stage}: running", flush=True)
    _RUNNERS[stage](db, cfg)
    if want is not None:
      provenance.write(db, stage, cfg, provenance.expected(stage, db, cfg))
    seconds = time.perf_counter() - t0
    record["stages"][stage] = {"seconds": seconds, "skipped": False, "build_seconds": seconds}
    print(f"[build_db] {stage}: {seconds:.1f} s", flush=True)
    write_json_atomic(times_path, record)  # After each stage, so a killed build keeps its times.
  record["total_seconds"] = time.perf_counter() - t_all
  record["total_build_seconds"] = sum(v.get("build_seconds") or 0.0
                                      for v in record["stages"].values())
  write_json_atomic(times_path, record)
  print(f"[build_db] total {record['total_seconds']:.1f} s this run "
        f"({record['total_build_seconds']:.1f} s of stage build time); times in {times_path}",
        flush=True)
  return record
