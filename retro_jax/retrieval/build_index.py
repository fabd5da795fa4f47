r"""Builds a database's index: the one global index (`build_global_index`, the default; see
retro_jax/retrieval/global_index.py), or one index shard per embedding shard, each serialised with
a manifest (`build_index`, the per-shard backends).

Reads `DB/embeddings/shard-XXXXX.npy` (float32 [n, D], L2-normalised); writes
`DB/index/<backend>/shard-XXXXX/` (searcher files + manifest.json). Global id offsets come from
the chunk store's manifest (`DB/chunks/manifest.json`), else the running sum of the shards' row
counts. Finished shards (manifest present and checksums valid, same
config) are skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time

from absl import logging
from etils import epath
from tqdm import tqdm

from retro_jax.db import layout
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib


def shard_is_done(out: str, config: index_lib.IndexConfig, offset: int) -> bool:
  """True when `out` holds a verified shard built with the same config and offset."""
  if not (epath.Path(out) / index_lib.MANIFEST).exists():
    return False
  try:
    manifest = index_lib.read_manifest(out)
    index_lib.verify_shard(out, manifest)
  except index_lib.IndexError_ as e:
    logging.warning("Rebuilding %s: %s", out, e)
    return False
  built = index_lib.IndexConfig.from_json(manifest["config"])
  want = config.resolved(manifest["count"])
  if built != want or manifest["offset"] != offset:
    logging.warning("Rebuilding %s: built with another config or offset.", out)
    return False
  return True


def build_index(db_dir: str, config: index_lib.IndexConfig, out_dir: str | None = None,
                shards: set[int] | None = None) -> list[str]:
  """Builds (or skips when finished) the index shards (all, or those in `shards`: the Beam build
  gives one per element); returns their directories."""
  mine = retriever_lib.db_embedding_shards(db_dir, None if shards is None else shards.__contains__)
  out_dir = out_dir or str(layout.index_dir(db_dir, config.backend))
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  done = []
  for i, path, offset in tqdm(mine, desc=f"index shards ({config.backend})"):
    out = str(layout.index_shard_dir(out_dir, i))
    if shard_is_done(out, config, offset):
      logging.info("Shard %s already built; skipping.", out)
    else:
      t0 = time.time()
      index_lib.build_shard(path, offset, config, out)
      logging.info("Built %s in %.1f s.", out, time.time() - t0)
    done.append(out)
  return done


def global_index_done(db_dir: str, num_chunks: int) -> bool:
  """True when DB/index/global holds a finished index of this format over `num_chunks` vectors
  whose files outside the serving shards are there at their recorded sizes (the manifest and a
  few stats, whatever the index's size; the serving shards' files: `damaged_serving_files`)."""
  root = global_lib.index_dir(db_dir)
  try:
    if not (root / layout.MANIFEST).exists():
      return False
    m = global_lib.read_manifest(root)
    return (m.get("format_version") == global_lib.FORMAT_VERSION
            and int(m["count"]) == int(num_chunks) and not global_lib.damaged_top_files(root, m))
  except index_lib.IndexError_:
    return False


def remove_damaged_global_index(db_dir: str, contents: bool = False,
                                serving: bool = True) -> list[str]:
  """Removes DB/index/global when it has a manifest but some file is missing or not at its
  recorded size (`contents`: or its sha256 differs, every file read), so that the index stage
  builds it again (the build is deterministic: the same bytes); returns what was damaged.
  `serving=False` leaves the serving shards' files to the caller (the build checks them in a
  Beam pipeline)."""
  root = global_lib.index_dir(db_dir)
  try:
    if not (root / layout.MANIFEST).exists():
      return []
    damaged = (global_lib.damaged_files(root) if serving
               else global_lib.damaged_top_files(root, global_lib.read_manifest(root)))
    if contents and not damaged:
      try:
        global_lib.verify(root)
      except index_lib.IndexError_ as e:
        damaged = [str(e)]
  except (index_lib.IndexError_, KeyError, TypeError, ValueError):
    damaged = [str(root / layout.MANIFEST)]
  if damaged:
    root.rmtree()
  return damaged


def remove_global_index(db_dir: str) -> None:
  root = global_lib.index_dir(db_dir)
  if root.exists():
    root.rmtree()


def build_global_index(db_dir: str, config: global_lib.GlobalIndexConfig | None = None
                       ) -> dict:
  """Builds DB/index/global (retro_jax.retrieval.global_index) over every embeddings shard: one
  partitioner and quantizer trained on a sample, every vector encoded once, shard by shard.
  Kept when already built for the same shards; returns its manifest."""
  sources = retriever_lib.db_global_sources(db_dir)
  root = global_lib.index_dir(db_dir)
  remove_damaged_global_index(db_dir)
  if global_lib.is_built(root, sources):
    logging.info("Global index %s already built; skipping.", root)
    return global_lib.read_manifest(root)
  t0 = time.time()
  manifest = global_lib.build(sources, root, config)
  logging.info("Built global index %s (%d vectors) in %.1f s.", root, manifest["count"],
               time.time() - t0)
  return manifest


def add_to_global_index(db_dir: str) -> dict:
  """Encodes embeddings shards added since the global index was built (edit_db --add)."""
  return global_lib.add_sources(global_lib.index_dir(db_dir),
                                retriever_lib.db_global_sources(db_dir))
