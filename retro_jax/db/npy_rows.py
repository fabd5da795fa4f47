"""Row reads of a `.npy` file on any path: memory-mapped on local disk, byte ranges on gs://.

    arr = npy_rows.open_rows("gs://bucket/db/chunks/shard-00000/tokens.npy")
    arr.shape, arr.dtype        # from the header (one small ranged read)
    arr[np.array([5, 6, 900])]  # int32 [3, 64]: only those rows are read
    arr[rows, :2]               # rows, then the rest of the index on the result

Local paths return `np.load(path, mmap_mode="r")` itself. Remote paths (any `scheme://` that
fsspec knows: gs:// through gcsfs, the backend etils.epath uses) return a `RemoteRows`: each
gather coalesces the sorted requested rows into runs (rows closer than `gap_rows` share one read)
and fetches the runs concurrently with fsspec's `cat_ranges`. Nothing is cached: the memory a read
takes is its rows (plus the gaps bridged), however large the file, so every host of a pod can read
its share of a store of any size.
"""
from __future__ import annotations

import io
import os
from typing import Any

import fsspec
import numpy as np

# Remote reads bridge gaps up to this many rows (one request instead of two).
GAP_ROWS = 16
# The .npy header is at most this long in files numpy writes (format 1.0: < 64 KiB).
_HEADER_PROBE = 1 << 16


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


class RemoteRows:
  """Read-only row access to a C-ordered `.npy` file through fsspec byte-range reads."""

  def __init__(self, path: str, gap_rows: int = GAP_ROWS):
    self.path = path
    self.fs, self._fs_path = fsspec.core.url_to_fs(path)
    self.gap_rows = gap_rows
    head = self.fs.cat_file(self._fs_path, start=0, end=_HEADER_PROBE)
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
      raise ValueError(f"{path}: Fortran-ordered .npy files are not supported")
    if dtype.hasobject:
      raise ValueError(f"{path}: object arrays cannot be read by rows")
    self.shape: tuple[int, ...] = tuple(shape)
    self.dtype = np.dtype(dtype)
    self.ndim = len(self.shape)
    self._offset = f.tell()
    self._row_shape = self.shape[1:]
    self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

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
    n = len(starts)
    blobs = self.fs.cat_ranges([self._fs_path] * n,
                               [int(self._offset + s * self._row_bytes) for s in starts],
                               [int(self._offset + e * self._row_bytes) for e in ends])
    run_of = np.searchsorted(starts, rows_N, side="right") - 1
    for r in range(n):
      data = blobs[r]
      if isinstance(data, Exception):
        raise data
      block = np.frombuffer(data, self.dtype).reshape((-1,) + self._row_shape)
      if len(block) != ends[r] - starts[r]:
        raise OSError(f"{self.path}: short read of rows [{starts[r]}, {ends[r]})")
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
  return np.load(os.fspath(path), mmap_mode="r")
