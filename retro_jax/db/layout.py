"""Where every file of a retrieval database lives, and how the files are written.

    DB/
      tokenizer/spm.model | tokenizer/bpe.json   the database's tokenizer (one of the two)
      chunks/manifest.json                        the chunk store: shards, documents, edits
      chunks/deletions.json                       removed documents (retro_jax.db.edit)
      chunks/shard-XXXXX/                         tokens.npy, doc_ids.npy, doc_table.npy, doc_keys.json
      embeddings/embedder.json                    which embedder made the vectors
      embeddings/shard-XXXXX.npy                  float32 [chunks, D] (+ .progress.json while written)
      embeddings/parts/shard-XXXXX/               the Beam build's finished row blocks (until assembled)
      index/<backend>/shard-XXXXX/                one searcher per embeddings shard + manifest.json
      neighbours/shard-XXXXX.npy                  int64 [chunks, k] training neighbours (+ .progress.json)
      build_times.json                            the build's stage times

Shard numbers are the chunk store's: embeddings, index and neighbours shard i cover store shard i.
Writes are atomic (a temporary name, then a rename), so a killed stage never leaves half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from etils import epath

TOKENIZER_PATH = "tokenizer/spm.model"
BPE_TOKENIZER_PATH = "tokenizer/bpe.json"
CHUNKS_DIR = "chunks"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
NEIGHBOURS_DIR = "neighbours"
MANIFEST = "manifest.json"
DELETIONS = "deletions.json"
EMBEDDER_INFO = "embedder.json"
EMBEDDING_PARTS_DIR = "parts"  # embeddings/parts/shard-XXXXX/rows-XXXXXXXXXX.npy: Beam's blocks
BUILD_TIMES = "build_times.json"

PathLike = str | os.PathLike


def shard_name(shard: int) -> str:
  return f"shard-{shard:05d}"


def shard_number(path: PathLike) -> int:
  """The shard number in `.../shard-XXXXX` or `.../shard-XXXXX.npy`."""
  m = re.fullmatch(r"shard-(\d+)(\.npy)?", os.path.basename(os.fspath(path).rstrip("/")))
  if not m:
    raise ValueError(f"{path} is not a shard path (shard-XXXXX[.npy])")
  return int(m.group(1))


def chunks_dir(db: PathLike) -> epath.Path:
  return epath.Path(db) / CHUNKS_DIR


def embeddings_dir(db: PathLike) -> epath.Path:
  return epath.Path(db) / EMBEDDINGS_DIR


def embeddings_path(db: PathLike, shard: int) -> epath.Path:
  return embeddings_dir(db) / f"{shard_name(shard)}.npy"


def embedding_part_path(db: PathLike, shard: int, start: int) -> epath.Path:
  """A finished block of rows [start, ..) of embeddings shard `shard` (retro_jax/db/pipeline.py)."""
  return embeddings_dir(db) / EMBEDDING_PARTS_DIR / shard_name(shard) / f"rows-{start:010d}.npy"


def index_dir(db: PathLike, backend: str) -> epath.Path:
  return epath.Path(db) / INDEX_DIR / backend


def index_shard_dir(index_root: PathLike, shard: int) -> epath.Path:
  return epath.Path(index_root) / shard_name(shard)


def neighbours_path(db: PathLike, shard: int) -> epath.Path:
  return epath.Path(db) / NEIGHBOURS_DIR / f"{shard_name(shard)}.npy"


def progress_path(npy_path: PathLike) -> epath.Path:
  """The progress record beside a shard's .npy (finished blocks, settings)."""
  p = epath.Path(npy_path)
  return p.parent / (p.name[:-len(".npy")] + ".progress.json")


def is_finished(npy_path: PathLike) -> bool:
  """A shard .npy whose progress record says done."""
  progress = progress_path(npy_path)
  return (epath.Path(npy_path).exists() and progress.exists()
          and bool(json.loads(progress.read_text()).get("done")))


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, block: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while data := f.read(block):
      h.update(data)
  return h.hexdigest()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def write_json_atomic(path: PathLike, obj: Any) -> None:
  """Writes to a temporary name and renames, so a killed run never leaves half a file (local
  paths and, through etils.epath, gs:// ones)."""
  write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())
