"""Checks on read: every command verifies what it reads before it uses it.

* At open (cheap): counts and sizes against the manifest (the chunk store's `ChunkStore.__init__`).
* The first time a process reads a block of a chunk-store or neighbours shard's rows
  (`blocks_once`): that block's sha256 against the one recorded when the shard was written (a
  store shard's done marker, copied into the store's per-shard record; a neighbours shard's
  `.progress.json`), so a read hashes the blocks it touches, not the whole file; the gathered ids
  are range-checked (tokens in [0, vocab), neighbours in [-1, num_chunks)). Stores and neighbours
  shards written before block checksums, and the embeddings: the first time a process reads a
  file (`file_once`), its content sha256 against the checksum recorded when it was written
  (chunk-store shard files: the store's shard records; embeddings and neighbours shards: their
  `.progress.json`, or for embeddings made before that was recorded, the index manifests), plus a
  range check of the values. Verified files (blocks) are remembered per process by (path, size,
  mtime, digest[, block]), so each is hashed once per process, not once per read. A whole database is
  audited by `build_db --audit` / `ChunkStore.check` (every file's whole checksum). The cost is one sequential read of the file: see
  docs/benchmarks.md ("Verify on read") for the measured seconds per GB.
  `RETRO_JAX_VERIFY_ON_READ=0` turns the content checksums off (counts, sizes and ranges stay).
* Checkpoint against database: `check_checkpoint_tokenizer` (the database's tokenizer fingerprint,
  recorded in every checkpoint's meta as "db_tokenizer").
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
from etils import epath

from retro_jax.db import layout, npy_rows
from retro_jax.db.tokenizer import TokenizerMismatchError
from retro_jax.errors import UserError

ENV = "RETRO_JAX_VERIFY_ON_READ"
# Block checksums: the sha256 of each block of rows of a `.npy` file, as many rows as fill
# BLOCK_BYTES (chunk-store tokens: 512 rows of 64 tokens; neighbours at k=2: 8,192 rows), recorded
# when the file is written and checked when a read first touches the block (`blocks_once`).
BLOCK_BYTES = 1 << 17

_verified: set[tuple] = set()
_lock = threading.Lock()


class DamagedDataError(UserError, ValueError):
  """A database file whose contents differ from what was recorded when it was written."""


def enabled() -> bool:
  return os.environ.get(ENV, "1").lower() not in ("0", "false", "no", "off")


def _key(path: epath.Path, digest: str) -> tuple:
  p = str(path)
  if "://" in p:
    return (p, digest)
  st = os.stat(p)
  return (os.path.realpath(p), st.st_size, st.st_mtime_ns, digest)


def file_key(path: str | os.PathLike) -> tuple:
  """What identifies a file's verified blocks in this process: (path, size, mtime) locally."""
  return _key(epath.Path(path), "blocks")


def file_once(path: str | os.PathLike, sha256: str | None, fix: str,
              error: type[Exception] = DamagedDataError) -> None:
  """Raises DamagedDataError unless the file's sha256 equals `sha256` (hashed the first time this
  process reads it; None: nothing recorded, nothing to check)."""
  if not sha256 or not enabled():
    return
  path = epath.Path(path)
  key = _key(path, sha256)
  with _lock:
    if key in _verified:
      return
  digest = layout.sha256_file(path)
  if digest != sha256:
    raise error(f"{path} is damaged: sha256 {digest[:12]} differs from the "
                           f"{sha256[:12]} recorded when it was written; {fix}")
  with _lock:
    _verified.add(key)


def block_rows(row_bytes: int) -> int:
  """Rows per checksummed block of a file whose rows take `row_bytes` bytes."""
  return max(1, BLOCK_BYTES // max(1, row_bytes))


def block_digests(arr, block_rows: int) -> list[str]:
  """sha256 of each block of `block_rows` rows of an in-memory array (the bytes its `.npy` file
  stores for those rows): what a shard's writer records."""
  arr = np.ascontiguousarray(arr)
  return [layout.sha256_bytes(arr[a:a + block_rows].tobytes())
          for a in range(0, len(arr), block_rows)]


def file_block_digests(path: str | os.PathLike, block_rows: int) -> list[str]:
  """`block_digests` of a `.npy` file, each block read by one ranged read (the upgrade of a store
  written before block checksums)."""
  arr = npy_rows.open_rows(path)
  return [layout.sha256_bytes(npy_rows.row_bytes(arr, a, min(a + block_rows, len(arr))))
          for a in range(0, len(arr), block_rows)]


def _read_exact(f, n: int) -> bytes:
  parts, left = [], n
  while left and (data := f.read(left)):
    parts.append(data)
    left -= len(data)
  return b"".join(parts)


def file_digests(path: str | os.PathLike, rows: int | None = None
                 ) -> tuple[str, int, list[str]]:
  """(the whole file's sha256, rows per block, `file_block_digests`) of a `.npy` file from one
  sequential read of it (`rows` None: as many rows as fill BLOCK_BYTES): what a finished
  neighbours shard records, and the upgrade of one written before block checksums."""
  whole, blocks = hashlib.sha256(), []
  with epath.Path(path).open("rb") as f:
    head, shape, dtype = npy_rows.read_header(f)
    whole.update(head)
    per_row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    rows = block_rows(per_row) if rows is None else int(rows)
    n = shape[0] if shape else 1
    for a in range(0, n, rows):
      want = (min(a + rows, n) - a) * per_row
      data = _read_exact(f, want)
      if len(data) != want:
        raise OSError(f"{path}: short read of rows [{a}, {a + rows})")
      whole.update(data)
      blocks.append(layout.sha256_bytes(data))
    while data := f.read(1 << 22):  # (nothing follows the rows in a file np.save wrote)
      whole.update(data)
  return whole.hexdigest(), rows, blocks


def blocks_once(path: str | os.PathLike, arr, rows, block_rows: int, block_sha256: list[str],
                fix: str, error: type[Exception] = DamagedDataError, key: tuple | None = None
                ) -> None:
  """Raises `error` unless every block of `block_rows` rows of `arr` (the `.npy` at `path`, from
  npy_rows.open_rows) that `rows` touches hashes to its recorded sha256; each block is read (one
  ranged read) and hashed the first time this process needs it. `key`: the file's `file_key`,
  taken when it was opened (else a stat now)."""
  if not enabled():
    return
  n = len(arr)
  if len(block_sha256) != -(-n // block_rows):
    raise error(f"{path} has {n} rows but {len(block_sha256)} block checksums of {block_rows} "
                f"rows are recorded; {fix}")
  rows_N = np.asarray(rows, np.int64).reshape(-1)
  if not rows_N.size:
    return
  base = key if key is not None else file_key(path)
  for b in np.unique(rows_N // block_rows).tolist():
    key = base + (b, block_sha256[b])
    with _lock:
      if key in _verified:
        continue
    a, e = b * block_rows, min((b + 1) * block_rows, n)
    digest = layout.sha256_bytes(npy_rows.row_bytes(arr, a, e))
    if digest != block_sha256[b]:
      raise error(f"{path} is damaged: rows {a}..{e - 1} have sha256 {digest[:12]}, not the "
                  f"{block_sha256[b][:12]} recorded when they were written; {fix}")
    with _lock:
      _verified.add(key)


def size(path: str | os.PathLike, want: int | None, fix: str,
         error: type[Exception] = DamagedDataError) -> None:
  """Raises DamagedDataError unless the file exists and has `want` bytes (None: existence only)."""
  path = epath.Path(path)
  if want is None or layout.is_remote(path):
    if not path.exists():
      raise error(f"{path} is missing; {fix}")
    if want is None:
      return
    got = layout.file_size(path)
  else:  # one stat locally
    try:
      got = os.path.getsize(os.fspath(path))
    except FileNotFoundError:
      raise error(f"{path} is missing; {fix}") from None
  if got != want:
    raise error(f"{path} has {got} bytes, its manifest says {want}; {fix}")


def ids_in_range(arr, lo: int, hi: int, what: str, fix: str, block: int = 1 << 20,
                 error: type[Exception] = DamagedDataError) -> None:
  """Raises DamagedDataError unless every value is in [lo, hi) (read in blocks of rows)."""
  if not arr.size:
    return
  rows = max(1, block // max(1, int(np.prod(arr.shape[1:]))))
  for s in range(0, arr.shape[0], rows):
    part = np.asarray(arr[s:s + rows])
    mn, mx = int(part.min()), int(part.max())
    if mn < lo or mx >= hi:
      raise error(f"{what} holds ids in [{mn}, {mx}], outside [{lo}, {hi}); {fix}")


# ------------------------------------------------------------------------------------------------
# Embeddings and neighbours shards: checksums recorded in their progress files.


def recorded_sha256(npy_path: str | os.PathLike) -> str | None:
  """The sha256 a finished shard's `.progress.json` records (None for older builds)."""
  prog = layout.progress_path(npy_path)
  if not prog.exists():
    return None
  return json.loads(prog.read_text()).get("sha256")


def record_sha256(npy_path: str | os.PathLike, state: dict) -> dict:
  """`state` with the finished shard's sha256 and size (written into its progress file)."""
  return {**state, "sha256": layout.sha256_file(npy_path),
          "bytes": layout.file_size(npy_path)}


def _index_recorded_sha256(db: str | os.PathLike, shard: int) -> str | None:
  """An embeddings shard's sha256 as recorded by any index shard built over it."""
  root = epath.Path(db) / layout.INDEX_DIR
  if not root.exists():
    return None
  for backend_dir in sorted(root.iterdir()):
    manifest = layout.index_shard_dir(backend_dir, shard) / "manifest.json"
    if manifest.exists():
      try:
        return json.loads(manifest.read_text())["embeddings"]["sha256"]
      except (json.JSONDecodeError, KeyError):
        continue
  return None


def embeddings_shard(db: str | os.PathLike, shard: int) -> None:
  """Verifies `DB/embeddings/shard-XXXXX.npy` (once per process) before it is read."""
  path = layout.embeddings_path(db, shard)
  want = recorded_sha256(path) or _index_recorded_sha256(db, shard)
  file_once(path, want, f"delete it and its .progress.json and rerun `python -m "
                        f"retro_jax.build_db --db={db}` (it re-embeds the shard)")


# A neighbours shard's block checksums, in its progress record: `block_sha256`, and the rows per
# block under this key (that record's "block_rows" is the search's block, checked on resume).
CHECKSUM_BLOCK_ROWS = "checksum_block_rows"


def progress_record(npy_path: str | os.PathLike) -> dict:
  """A shard's `.progress.json` ({} when there is none)."""
  prog = layout.progress_path(npy_path)
  return json.loads(prog.read_text()) if prog.exists() else {}


def record_blocks(npy_path: str | os.PathLike, state: dict) -> dict:
  """`state` with the finished shard's sha256, size and block checksums (`CHECKSUM_BLOCK_ROWS`,
  `block_sha256`: blocks of BLOCK_BYTES), from one read of the file: what a neighbours shard's
  progress file records. The file itself is not changed."""
  sha, rows, blocks = file_digests(npy_path)
  return {**state, "sha256": sha, "bytes": layout.file_size(npy_path), CHECKSUM_BLOCK_ROWS: rows,
          "block_sha256": blocks}


def neighbours_fix(db: str | os.PathLike) -> str:
  return (f"delete it and its .progress.json and rerun `python -m retro_jax.build_db --db={db} "
          f"--stages=neighbours`")


def neighbours_shard(db: str | os.PathLike, shard: int, arr, num_chunks: int,
                     rec: dict | None = None, key: tuple | None = None) -> None:
  """Verifies a whole neighbours shard before it is read whole: every block against the checksums
  of its progress record `rec` (read when not given), or for a shard written before block
  checksums the whole file's sha256; and every id in [-1, num_chunks). Each once per process."""
  path = layout.neighbours_path(db, shard)
  fix = neighbours_fix(db)
  rec = progress_record(path) if rec is None else rec
  if "block_sha256" in rec:
    br = int(rec[CHECKSUM_BLOCK_ROWS])
    blocks_once(path, arr, np.arange(0, len(arr), br), br, rec["block_sha256"], fix, key=key)
  else:
    file_once(path, rec.get("sha256"), fix)
  rkey = ("range", str(path), num_chunks) + _key(path, "")[1:]
  if rkey not in _verified:
    ids_in_range(arr, -1, num_chunks, f"neighbours shard {path}", fix)
    with _lock:
      _verified.add(rkey)


def neighbours_rows(db: str | os.PathLike, shard: int, arr, rows, num_chunks: int, rec: dict,
                    key: tuple | None = None) -> np.ndarray:
  """Rows `rows` of a neighbours shard (`arr`, from npy_rows.open_rows), verified: the blocks they
  lie in, each hashed the first time this process reads it, against the checksums of its progress
  record `rec`, and the ids read in [-1, num_chunks); a shard written before block checksums is
  verified whole (`neighbours_shard`, once per process)."""
  rows_N = np.asarray(rows, np.int64).reshape(-1)
  if "block_sha256" not in rec:
    neighbours_shard(db, shard, arr, num_chunks, rec)
    return np.asarray(arr[rows_N])
  path = layout.neighbours_path(db, shard)
  fix = neighbours_fix(db)
  blocks_once(path, arr, rows_N, int(rec[CHECKSUM_BLOCK_ROWS]), rec["block_sha256"], fix, key=key)
  out = np.asarray(arr[rows_N]) if rows_N.size else np.empty((0,) + arr.shape[1:], arr.dtype)
  ids_in_range(out, -1, num_chunks, f"neighbours shard {path}", fix)
  return out


# ------------------------------------------------------------------------------------------------
# Checkpoint against database.


def _describe(tok: dict) -> str:
  return f"{tok.get('kind', 'sentencepiece')} {str(tok.get('fingerprint'))[:12]} (vocab " \
         f"{tok.get('vocab_size')})"


def db_tokenizer(db: str | os.PathLike) -> dict | None:
  """The tokenizer record of a database's chunk-store manifest (None when there is none)."""
  path = epath.Path(db) / layout.CHUNKS_DIR / layout.MANIFEST
  if not path.exists():
    return None
  return json.loads(path.read_text()).get("tokenizer")


def _abs(path: str | os.PathLike) -> str:
  return os.fspath(path) if layout.is_remote(path) else os.path.abspath(os.fspath(path))


def check_checkpoint_tokenizer(recorded: dict | None, trained_db: str | None,
                               db: str | os.PathLike, checkpoint: str) -> None:
  """Raises TokenizerMismatchError when database `db` has another tokenizer than the one the
  checkpoint was trained with: `recorded` (its meta's "db_tokenizer"), or, for checkpoints older
  than that record, the tokenizer of `trained_db` (the database it names) if that still exists."""
  if recorded is None and trained_db and _abs(trained_db) != _abs(db):
    recorded = db_tokenizer(trained_db)
  have = db_tokenizer(db)
  if recorded is None or have is None:
    return
  if recorded.get("fingerprint") != have.get("fingerprint"):
    raise TokenizerMismatchError(
        f"checkpoint {checkpoint} was trained with tokenizer {_describe(recorded)} but database "
        f"{db} uses tokenizer {_describe(have)}; use the database the model was trained on (or "
        f"one built with --tokenizer=its DB/tokenizer file)")
