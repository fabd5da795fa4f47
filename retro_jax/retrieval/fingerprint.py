"""Which database content a retrieval searcher serves, as one short string: the content fingerprint.

A shard server (retro_jax.retrieval.shard_server) records the fingerprint of the database when it
loads, reports it with every answer beside the one it reads from the database now, and a client
that knows the database (`ServiceRetriever(..., db=DB)`) compares both with the database's own:
a shard loaded before `edit_db --add` (new chunks, new or rewritten index files) is stale and
named, never silently answering from the old contents.

fingerprint = sha256 over
  * the chunk store's content: `content_sha256` of DB/chunks/manifest.json (over every store
    shard's file checksums; not the removed documents, which the servers pick up by themselves);
  * the index: the global index manifest's `content_sha256` (over every file's recorded checksum),
    or, for the per-shard backends, the sha256 of each index shard's manifest.json.
Read from the manifests only (a few small files; never the data files), so it is cheap to
recompute when a manifest changes. A rebuild that gives byte-identical files keeps it.
"""

from __future__ import annotations

import json
import os

from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib

SHOWN = 12  # hex digits of a fingerprint in messages


def store_sha256(db_dir: str | os.PathLike) -> str:
  """The chunk store's content fingerprint (its manifest's, or computed for old manifests)."""
  manifest = chunk_store_lib.read_manifest(layout.chunks_dir(db_dir))
  return manifest.get("content_sha256") or chunk_store_lib.content_sha256(manifest["shards"])


def index_sha256(index_dir: str | os.PathLike, backend: str) -> str:
  """The index's content: the global manifest's content_sha256, or every shard manifest's sha256."""
  index_dir = epath.Path(index_dir)
  if backend == global_lib.BACKEND:
    return str(global_lib.read_manifest(index_dir)["content_sha256"])
  shards = sorted((d.name, layout.sha256_file(d / index_lib.MANIFEST))
                  for d in index_dir.iterdir() if (d / index_lib.MANIFEST).exists())
  return layout.sha256_bytes(json.dumps(shards).encode())


def fingerprint(db_dir: str | os.PathLike, backend: str,
                index_root: str | os.PathLike | None = None) -> str:
  """The content fingerprint of DB served with `backend` (its index under DB/index/<backend>, or
  `index_root`). Raises the chunk store's / index's UserError when a manifest is missing."""
  index_dir = index_root if index_root is not None else layout.index_dir(db_dir, backend)
  parts = {"chunks": store_sha256(db_dir), "backend": backend,
           "index": index_sha256(index_dir, backend)}
  return layout.sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def short(fp: str) -> str:
  return fp[:SHOWN] if fp else "(none)"
