"""Where every file of a retrieval database lives, and how the files are written.

    DB/
      tokenizer/spm.model | tokenizer/bpe.json   the database's tokenizer (one of the two)
      chunks/manifest.json                        the chunk store: shards, documents, edits
      chunks/deletions.json                       removed documents (retro_jax.build.edit)
      chunks/shard-XXXXX/                         tokens.npy, doc_ids.npy, doc_table.npy, doc_keys.json
      embeddings/embedder.json                    which embedder made the vectors
      embeddings/shard-XXXXX.npy                  float32 [chunks, D] (+ .progress.json while written)
      embeddings/parts/shard-XXXXX/               the Beam build's finished row blocks (until assembled)
      index/<backend>/shard-XXXXX/                one searcher per embeddings shard + manifest.json
      neighbours/shard-XXXXX.npy                  int64 [chunks, k] training neighbours (+ .progress.json)
      build_times.json                            the build's stage times

Shard numbers are the chunk store's: embeddings, index and neighbours shard i cover store shard i.
Writes are atomic (a temporary name, then a rename), so a killed stage never leaves half a file.

DB may be a local directory or a gs:// URL: every stage reads and writes through this module,
etils.epath (gcsfs) and tensorstore (retro_jax.db.npy_rows), never a local-only API on a
database path. `db_root` opens one (a gs:// one only after a quick reachability check, so a
missing network or emulator is one clear error, not minutes of retries). Where a library can only
write a local file (np.memmap of an output being filled, faiss, ScaNN), the file is made in a
local scratch directory and copied into place (`staged_file`, `staged_dir`: a rename locally,
one upload on gs://, which GCS publishes whole); the resumable row outputs (embeddings,
neighbours) are written a block at a time (`NpyRowsWriter`: in place locally, one object per
block on gs://), so their progress records resume a killed build on either. Where a library can
only read a local file (ScaNN's searcher directory), `local_dir` copies it once into a local cache
(`RETRO_JAX_CACHE`, default ~/.cache/retro_jax), keyed by its manifest.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import tempfile
import urllib.parse
from typing import Any, Iterator

import numpy as np
from etils import epath

from retro_jax.errors import UserError

TOKENIZER_PATH = "tokenizer/spm.model"
BPE_TOKENIZER_PATH = "tokenizer/bpe.json"
CHUNKS_DIR = "chunks"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
NEIGHBOURS_DIR = "neighbours"
MANIFEST = "manifest.json"
DELETIONS = "deletions.json"
EMBEDDER_INFO = "embedder.json"
EMBEDDING_PARTS_DIR = "parts"  # {embeddings,neighbours}/parts/shard-XXXXX/rows-XXXXXXXXXX.npy: Beam
BUILD_TIMES = "build_times.json"

PathLike = str | os.PathLike
COPY_BLOCK = 1 << 23
# Seconds to wait for the storage endpoint's TCP connection before calling it unreachable.
REACH_TIMEOUT_S = 10.0


class StorageError(UserError, OSError):
  """A database path whose storage cannot be reached or used (no network, no bucket, ...)."""


def is_remote(path: PathLike) -> bool:
  """A URL (gs://...) rather than a local path (file:// URLs count as local)."""
  p = os.fspath(path)
  return "://" in p and not p.startswith("file://")


def _gcs_endpoint() -> tuple[str, int]:
  """(host, port) every gs:// client here talks to: STORAGE_EMULATOR_HOST, or Google's."""
  url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
  parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
  return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


# (endpoint, bucket) pairs this process has found reachable: checked once, not per open.
_reachable: set[tuple[str, int, str]] = set()


def check_reachable(path: PathLike, what: str = "--db") -> None:
  """Raises StorageError, within about REACH_TIMEOUT_S, unless `path`'s storage answers (a TCP
  connection to the endpoint, then the bucket itself; once per bucket and process). The clients'
  own retries would take minutes to give up on a closed port or a missing DNS name. Local paths:
  nothing to check."""
  if not is_remote(path):
    return
  url = os.fspath(path)
  if not url.startswith("gs://"):
    return  # other URL schemes: left to their fsspec backend
  host, port = _gcs_endpoint()
  bucket = url[len("gs://"):].split("/", 1)[0]
  if (host, port, bucket) in _reachable:
    return
  where = ("STORAGE_EMULATOR_HOST=" + os.environ["STORAGE_EMULATOR_HOST"]
           if os.environ.get("STORAGE_EMULATOR_HOST") else f"{host}:{port}")
  try:
    socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
  except OSError as e:
    raise StorageError(f"{what}={url}: cannot reach Cloud Storage at {where} ({e}); check the "
                       f"network (or the emulator), or use a local path") from None
  try:
    epath.Path(url).exists()  # an object read or listing: credentials and permissions
  except Exception as e:  # noqa: BLE001  (auth, permission, HTTP errors: all one clear line)
    raise StorageError(f"{what}={url}: cannot use bucket gs://{bucket} at {where} "
                       f"({type(e).__name__}: {str(e)[:200]}); check its credentials "
                       f"(gcloud auth application-default login) and permissions") from None
  try:
    found = epath.Path(f"gs://{bucket}").exists()
  except Exception:  # noqa: BLE001  (no bucket-metadata permission; objects are readable)
    found = True
  if not found:
    raise StorageError(f"{what}={url}: bucket gs://{bucket} does not exist (or is not visible "
                       f"with these credentials); create it or fix the path")
  _reachable.add((host, port, bucket))


def db_root(db: PathLike, what: str = "--db") -> epath.Path:
  """The database directory as an epath.Path (a gs:// one checked reachable first); never a
  pathlib.Path, which would turn gs://b/db into a local directory named 'gs:'."""
  check_reachable(db, what)
  check_not_a_file(db, what)
  return epath.Path(db)


def check_not_a_file(path: PathLike, what: str) -> None:
  """A local path given for a directory that is a file: one line naming it."""
  if not is_remote(path) and os.path.lexists(os.fspath(path)) and not os.path.isdir(
      os.fspath(path)):
    raise StorageError(f"{what}={os.fspath(path)} is a file, not a directory; give a directory")


def make_dir(path: PathLike, what: str) -> epath.Path:
  """Creates the directory `path` (checked reachable, not a file) or says in one line why it
  cannot (read-only, no permission, a file on the way); a full disk stays a full disk."""
  root = db_root(path, what)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise
    raise StorageError(f"{what}={os.fspath(path)}: cannot create it ({e.strerror or e}); give a "
                       "writable directory") from None
  return root


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
  """A finished block of rows [start, ..) of embeddings shard `shard` (retro_jax/build/pipeline.py)."""
  return embeddings_dir(db) / EMBEDDING_PARTS_DIR / shard_name(shard) / f"rows-{start:010d}.npy"


def index_dir(db: PathLike, backend: str) -> epath.Path:
  return epath.Path(db) / INDEX_DIR / backend


def index_shard_dir(index_root: PathLike, shard: int) -> epath.Path:
  return epath.Path(index_root) / shard_name(shard)


def neighbours_path(db: PathLike, shard: int) -> epath.Path:
  return epath.Path(db) / NEIGHBOURS_DIR / f"{shard_name(shard)}.npy"


def neighbours_part_path(db: PathLike, shard: int, start: int) -> epath.Path:
  """A finished block of rows [start, ..) of neighbours shard `shard` (the routed Beam job)."""
  return (epath.Path(db) / NEIGHBOURS_DIR / EMBEDDING_PARTS_DIR / shard_name(shard)
          / f"rows-{start:010d}.npy")


def progress_path(npy_path: PathLike) -> epath.Path:
  """The progress record beside a shard's .npy (finished blocks, settings)."""
  p = epath.Path(npy_path)
  return p.parent / (p.name[:-len(".npy")] + ".progress.json")


def finished_record(npy_path: PathLike) -> dict | None:
  """The progress record of a shard .npy that says it is done, at the size it names (one stat: a
  truncated or replaced file is not finished; `--audit` checks the recorded sha256 too), or None."""
  progress = progress_path(npy_path)
  if not (epath.Path(npy_path).exists() and progress.exists()):
    return None
  try:
    rec = json.loads(progress.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  done = bool(rec.get("done")) and ("bytes" not in rec or file_size(npy_path) == rec["bytes"])
  return rec if done else None


def is_finished(npy_path: PathLike) -> bool:
  return finished_record(npy_path) is not None


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, block: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while data := f.read(block):
      h.update(data)
  return h.hexdigest()


def file_size(path: PathLike) -> int:
  p = epath.Path(path)
  return p.stat().length if is_remote(p) else os.path.getsize(os.fspath(p))


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Local: a temporary name, then a rename. gs://: one upload (an object appears whole)."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def npy_bytes(a: np.ndarray) -> bytes:
  """`a` as the bytes of a .npy file (for `write_bytes_atomic`)."""
  buf = io.BytesIO()
  np.save(buf, a, allow_pickle=False)
  return buf.getvalue()


def write_json_atomic(path: PathLike, obj: Any) -> None:
  """Atomic, as write_bytes_atomic: a killed run never leaves half a file (local or gs://)."""
  write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


# ------------------------------------------------------------------------------------------------
# Files that a library writes or reads only locally; row outputs filled a block at a time.


def scratch_dir() -> str:
  """Where files bound for gs:// are made first (`RETRO_JAX_SCRATCH`, default the temp dir)."""
  return os.environ.get("RETRO_JAX_SCRATCH") or tempfile.gettempdir()


def cache_dir() -> pathlib.Path:
  """Local copies of remote files that a library can only read locally (`RETRO_JAX_CACHE`)."""
  return pathlib.Path(os.environ.get("RETRO_JAX_CACHE")
                      or os.path.join(os.path.expanduser("~"), ".cache", "retro_jax"))


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Streams `src` to `dst` (either local or gs://), COPY_BLOCK bytes at a time, atomically."""
  src, dst = epath.Path(src), epath.Path(dst)
  tmp = dst if is_remote(dst) else dst.parent / (dst.name + ".tmp")
  dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open("rb") as fi, tmp.open("wb") as fo:
    shutil.copyfileobj(fi, fo, COPY_BLOCK)
  if tmp != dst:
    tmp.replace(dst)


def _tmp_name(name: str) -> str:
  stem, dot, ext = name.rpartition(".")
  return f"{stem}.tmp.{ext}" if dot else name + ".tmp"


@contextlib.contextmanager
def staged_file(path: PathLike) -> Iterator[str]:
  """A local file name to make `path` through, for libraries that write only local files (an
  np.memmap being filled, faiss): yields it; when the block ends without an error the file
  becomes `path` (local: a rename of `NAME.tmp.EXT` beside it; gs://: one upload from a scratch
  directory), else it is removed."""
  path = epath.Path(path)
  if not is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = os.fspath(path.parent / _tmp_name(path.name))
    try:
      yield tmp
      os.replace(tmp, os.fspath(path))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.TemporaryDirectory(dir=scratch_dir(), prefix="retro_jax-stage-") as d:
    tmp = os.path.join(d, path.name)
    yield tmp
    copy_file(tmp, path)


@contextlib.contextmanager
def staged_dir(path: PathLike, last: str | None = None) -> Iterator[str]:
  """A local directory to make directory `path` in (ScaNN's serialised searcher): yields it
  (empty); then it replaces `path` (local: a rename; gs://: every file uploaded, `last` -- the
  manifest -- after the others, so a half-copied directory never looks finished)."""
  path = epath.Path(path)
  if not is_remote(path):
    tmp = os.fspath(path).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      yield tmp
      shutil.rmtree(os.fspath(path), ignore_errors=True)
      os.replace(tmp, os.fspath(path))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  with tempfile.TemporaryDirectory(dir=scratch_dir(), prefix="retro_jax-stage-") as d:
    yield d
    if path.exists():
      path.rmtree()
    names = sorted(os.listdir(d), key=lambda n: (n == last, n))
    for name in names:
      copy_file(os.path.join(d, name), path / name)


def local_dir(path: PathLike, key: str) -> str:
  """A local directory with the files of directory `path`: itself when local; for gs:// a copy in
  cache_dir(), made once per `key` (e.g. the sha256 of its manifest), so its size is the
  directory's (an index shard), never the database's."""
  if not is_remote(path):
    return os.fspath(path)
  src = epath.Path(path)
  out = cache_dir() / "gcs" / hashlib.sha256(f"{src}|{key}".encode()).hexdigest()[:24]
  if (out / ".complete").exists():
    return str(out)
  out.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if not f.is_dir():
      copy_file(f, out / f.name)
  (out / ".complete").write_text(str(src))
  return str(out)


def parts_dir(npy_path: PathLike) -> epath.Path:
  """Where a remote `NpyRowsWriter` keeps the blocks of an unfinished `.npy`."""
  p = epath.Path(npy_path)
  return p.parent / (p.name[:-len(".npy")] + ".parts")


def rows_output_exists(npy_path: PathLike) -> bool:
  """The `.npy`, or (gs://) the blocks of an unfinished one, exist: there is work to resume."""
  return epath.Path(npy_path).exists() or (is_remote(npy_path) and parts_dir(npy_path).exists())


def remove_rows_output(npy_path: PathLike) -> None:
  """Deletes a `.npy` and any unfinished blocks of it (gs://)."""
  p = epath.Path(npy_path)
  if p.exists():
    p.unlink()
  if is_remote(p) and parts_dir(p).exists():
    parts_dir(p).rmtree()


def _npy_header(shape: tuple[int, ...], dtype) -> bytes:
  """The header np.save / open_memmap write for a C-ordered array (format 1.0)."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)})
  return buf.getvalue()


def assemble_npy(path: PathLike, shape: tuple[int, ...], dtype, parts) -> None:
  """Writes `path`, np.save's bytes of a C-ordered `shape` / `dtype` array, from `.npy` parts that
  hold its rows in order, one part in memory at a time (local: a temporary name, then a rename;
  gs://: one streamed upload). Raises StorageError when the parts do not add up to `shape`."""
  path, dtype = epath.Path(path), np.dtype(dtype)
  tmp = path if is_remote(path) else path.parent / _tmp_name(path.name)
  rows = 0
  with tmp.open("wb") as f:
    f.write(_npy_header(shape, dtype))
    for p in parts:
      with epath.Path(p).open("rb") as fb:
        part = np.load(fb, allow_pickle=False)
      if part.shape[1:] != tuple(shape[1:]) or rows + len(part) > shape[0]:
        raise StorageError(f"{p}: shape {part.shape} does not fit rows {rows}.. of {path} "
                           f"{tuple(shape)}; delete the parts and redo them")
      f.write(np.ascontiguousarray(part, dtype).tobytes())
      rows += len(part)
  if rows != shape[0]:
    if tmp.exists():
      tmp.unlink()  # gs://: the short object is gone again; locally, the temporary file
    raise StorageError(f"{path}: its parts hold {rows} of {shape[0]} rows; redo the missing ones")
  if tmp != path:
    tmp.replace(path)


class NpyRowsWriter:
  """A `.npy` of `shape` / `dtype` filled a block of rows at a time, resumably; the bytes are
  np.save's of the whole array, local or remote.

  Local: the file itself, memory-mapped and filled in place (`resume`: reopened as it is).
  gs://: each block is its own object, `NAME.parts/rows-<first row>.npy`, and `finish` streams
  them (one block in memory at a time) into `NAME.npy` behind its header, then deletes them. The
  caller's progress record names the finished rows, written after the block, so a killed run on
  either resumes at the next block, on any machine. `found`: (shape, dtype) of the file reopened
  with `resume` (None otherwise), for the caller to check."""

  def __init__(self, path: PathLike, shape: tuple[int, ...], dtype, resume: bool = False):
    self.path = epath.Path(path)
    self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    self.remote = is_remote(self.path)
    self.found = None
    self._out = None
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.remote:
      if not resume:
        remove_rows_output(self.path)
      self.found = (self.shape, self.dtype) if resume else None
    elif resume and self.path.exists():
      self._out = np.lib.format.open_memmap(os.fspath(self.path), mode="r+")
      self.found = (self._out.shape, self._out.dtype)
    else:
      self._out = np.lib.format.open_memmap(os.fspath(self.path), mode="w+", dtype=self.dtype,
                                            shape=self.shape)

  def _part(self, start: int) -> epath.Path:
    return parts_dir(self.path) / f"rows-{start:012d}.npy"

  def write(self, start: int, block) -> None:
    """Rows [start, start + len(block)), stored (flushed, or uploaded) before this returns."""
    block = np.ascontiguousarray(block, self.dtype)
    if self.remote:
      buf = io.BytesIO()
      np.save(buf, block, allow_pickle=False)
      self._part(start).write_bytes(buf.getvalue())
      return
    self._out[start:start + len(block)] = block
    self._out.flush()

  def finish(self, block_rows: int) -> None:
    """Closes the file (gs://: assembles it from its blocks of `block_rows` rows)."""
    if not self.remote:
      self._out.flush()
      self._out = None
      return
    starts = range(0, self.shape[0], block_rows)
    missing = [s for s in starts if not self._part(s).exists()]
    if missing:
      raise StorageError(f"{self.path}: blocks at rows {missing[:5]} are missing from "
                         f"{parts_dir(self.path)}; delete it and its progress file to redo it")
    assemble_npy(self.path, self.shape, self.dtype, [self._part(s) for s in starts])
    parts_dir(self.path).rmtree()

  def close(self) -> None:
    self._out = None
