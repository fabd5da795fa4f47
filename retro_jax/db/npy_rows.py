"""Row reads of a `.npy` file on any path: memory-mapped on local disk, byte ranges on gs://.

    arr = npy_rows.open_rows("gs://bucket/db/chunks/shard-00000/tokens.npy")
    arr.shape, arr.dtype        # from the header (one small ranged read)
    arr[np.array([5, 6, 900])]  # int32 [3, 64]: only those rows are read
    arr[rows, :2]               # rows, then the rest of the index on the result

Local paths return `np.load(path, mmap_mode="r")` itself. Remote paths (gs://, or any URL that
tensorstore's kvstore opens) return a `RemoteRows`: each gather coalesces the sorted requested rows
into runs (rows closer than `gap_rows` share one read) and issues one byte-range read per run
through tensorstore (asynchronous, all in flight at once, thread-safe: grain's reader threads share
it; the same client orbax uses for checkpoints). Nothing is cached: the memory a read takes is its
rows (plus the gaps bridged), however large the file, so every host of a pod can read its share of a
store of any size.
"""
from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np
import tensorstore as ts

from retro_jax.db.layout import is_remote

# Remote reads bridge gaps up to this many rows (one request instead of two).
GAP_ROWS = 16
# numpy parses every .npy header with ast.literal_eval, and CPython 3.11's parser is not safe to
# enter from several threads at once (it fails with "AST constructor recursion depth mismatch");
# grain's reader threads open shards concurrently, so every header parse here holds this lock.
HEADER_LOCK = threading.Lock()
# magic (6 bytes), version (2), header length (2 in format 1.0, 4 in 2.0 and 3.0).
_PREFIX = 12


def _header_size(prefix: bytes) -> int:
  """Bytes of a `.npy` header (magic, length field and header text) from its first bytes."""
  major = prefix[6]
  length = int.from_bytes(prefix[8:10] if major == 1 else prefix[8:12], "little")
  return (10 if major == 1 else 12) + length


def _parse_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of a whole `.npy` header."""
  buf = io.BytesIO(head)
  version = np.lib.format.read_magic(buf)
  with HEADER_LOCK:
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(buf)
    return np.lib.format.read_array_header_2_0(buf)


class RemoteRows:
  """Read-only row access to a C-ordered `.npy` file through fsspec byte-range reads."""

  def __init__(self, path: str, gap_rows: int = GAP_ROWS):
    self.path = path
    self.gap_rows = gap_rows
    self._kv = ts.KvStore.open(path).result()
    size = _header_size(self._read(0, _PREFIX))
    shape, fortran, dtype = _parse_header(self._read(0, size))
    if fortran:
      raise ValueError(f"{path}: Fortran-ordered .npy files are not supported")
    if dtype.hasobject:
      raise ValueError(f"{path}: object arrays cannot be read by rows")
    self.shape: tuple[int, ...] = tuple(shape)
    self.dtype = np.dtype(dtype)
    self.ndim = len(self.shape)
    self._offset = size
    self._row_shape = self.shape[1:]
    self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def _read(self, start: int, end: int) -> bytes:
    return self._fetch(self._kv.read(b"", byte_range=slice(start, end)), start, end)

  def _fetch(self, future, start: int, end: int) -> bytes:
    result = future.result()
    if result.state != "value":
      raise FileNotFoundError(f"{self.path} is missing")
    data = bytes(result.value)
    if len(data) != end - start:
      raise OSError(f"{self.path}: short read of bytes [{start}, {end}): got {len(data)}")
    return data

  def __repr__(self) -> str:
    return f"RemoteRows({self.path!r}, shape={self.shape}, dtype={self.dtype})"

  def rows(self, rows) -> np.ndarray:
    """The given rows (any order, repeats allowed), as a new array [len(rows), *row_shape]."""
    rows_N = np.asarray(rows, np.int64).reshape(-1)
    out = np.empty((len(rows_N),) + self._row_shape, self.dtype)
    if not len(rows_N):
      return out
    if rows_N.min() < 0 or rows_N.max() >= self.shape[0]:
      raise IndexError(f"{self.path}: rows must be in [0, {self.shape[0]}); got "
                       f"[{rows_N.min()}, {rows_N.max()}]")
    uniq = np.unique(rows_N)
    # Runs of rows [start, end) with gaps of at most gap_rows inside a run.
    breaks = np.nonzero(np.diff(uniq) > self.gap_rows + 1)[0] + 1
    starts = uniq[np.concatenate([[0], breaks])]
    ends = uniq[np.concatenate([breaks - 1, [len(uniq) - 1]])] + 1
    spans = [(int(self._offset + s * self._row_bytes), int(self._offset + e * self._row_bytes))
             for s, e in zip(starts, ends)]
    futures = [self._kv.read(b"", byte_range=slice(a, b)) for a, b in spans]  # all in flight
    run_of = np.searchsorted(starts, rows_N, side="right") - 1
    for r, (future, (a, b)) in enumerate(zip(futures, spans)):
      block = np.frombuffer(self._fetch(future, a, b), self.dtype).reshape((-1,) + self._row_shape)
      m = run_of == r
      out[m] = block[rows_N[m] - starts[r]]
    return out

  def __getitem__(self, key: Any) -> np.ndarray:
    rest = ()
    if isinstance(key, tuple):
      key, rest = key[0], key[1:]
    if isinstance(key, slice):
      key = np.arange(*key.indices(self.shape[0]))
    scalar = np.ndim(key) == 0
    out = self.rows(np.atleast_1d(key))
    if scalar:
      out = out[0]
    return out[(slice(None),) + rest] if rest and not scalar else out[rest] if rest else out

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self.rows(np.arange(self.shape[0]))
    return out if dtype is None else out.astype(dtype)


def open_rows(path: str | os.PathLike):
  """A `.npy` file for row reads: np.memmap locally, `RemoteRows` on gs:// (and other URLs)."""
  if is_remote(path):
    return RemoteRows(os.fspath(path))
  with HEADER_LOCK:
    return np.load(os.fspath(path), mmap_mode="r")


def load(f) -> np.ndarray:
  """np.load of a whole `.npy` from an open file, safe beside other threads' header parses."""
  with HEADER_LOCK:
    return np.load(f, allow_pickle=False)


def read_header(f) -> tuple[bytes, tuple[int, ...], np.dtype]:
  """(the header's bytes, shape, dtype) of the `.npy` file open for reading at its start `f`, read
  from the stream itself (the rows follow it)."""
  prefix = f.read(_PREFIX)
  head = prefix + f.read(_header_size(prefix) - len(prefix))
  shape, fortran, dtype = _parse_header(head)
  if fortran or dtype.hasobject:
    raise ValueError(f"{getattr(f, 'name', f)}: not a C-ordered array of plain values")
  return head, tuple(shape), np.dtype(dtype)


def data_offset(arr) -> int:
  """Where the rows of an array from `open_rows` start in its file (the header's length)."""
  return int(arr._offset if isinstance(arr, RemoteRows) else arr.offset)


def row_bytes(arr, start: int, end: int) -> bytes:
  """The stored bytes of rows [start, end) of an array from `open_rows`, by one ranged read (a
  file read locally, not page faults of the memory map; a byte-range read on gs://)."""
  if isinstance(arr, RemoteRows):
    return arr._read(arr._offset + start * arr._row_bytes, arr._offset + end * arr._row_bytes)
  per_row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
  with open(arr.filename, "rb") as f:
    f.seek(data_offset(arr) + start * per_row)
    data = f.read((end - start) * per_row)
  if len(data) != (end - start) * per_row:
    raise OSError(f"{arr.filename}: short read of rows [{start}, {end})")
  return data


def bisect_rows(arr, col: int, values, n: int) -> np.ndarray:
  """int64: for each value v, the last row r in [0, n) with arr[r, col] <= v, for a 2-D array
  whose column `col` is sorted, rows [0, n] read (arr[n, col] must exceed every value): a
  vectorised bisection that reads about log2(n) rows per distinct value, never the whole array."""
  values_N = np.asarray(values, np.int64).reshape(-1)
  uniq, inverse = np.unique(values_N, return_inverse=True)
  lo = np.zeros(len(uniq), np.int64)  # arr[lo] <= v < arr[hi]
  hi = np.full(len(uniq), n, np.int64)
  while len(uniq) and (hi - lo > 1).any():
    mid = (lo + hi) // 2
    rows = np.unique(mid)
    at = np.asarray(arr[rows])[:, col]
    le = at[np.searchsorted(rows, mid)] <= uniq
    open_ = hi - lo > 1
    lo = np.where(open_ & le, mid, lo)
    hi = np.where(open_ & ~le, mid, hi)
  return lo[inverse].reshape(np.shape(values))
