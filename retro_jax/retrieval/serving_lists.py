"""A serving shard's faiss file opened without reading its inverted lists: each list is read the
first time a query probes it.

A serving shard's file (retro_jax.retrieval.global_index: `serving/shard-S.faiss`) is the trained
index (`trained.faiss`: the coarse quantizer, the PQ codebooks, empty lists) with its partitions'
entries added. faiss writes the inverted lists last; for the fast-scan index they are a
`BlockInvertedLists`:

    bytes [0, P)      the trained index's bytes, except `ntotal` (int64 at bytes 8..16)
    "ilbl" nlist code_size n_per_block block_size        (u32 fourcc, then four u64: 36 bytes)
    per list, in partition order:
      n (u64), ids (int64 [n]), code bytes (u64: ceil(n / n_per_block) * block_size), codes

faiss's own memory-mapped read does not help this type: `IO_FLAG_MMAP` maps only "ilar" lists (the
fast-scan lists are read whole through read() calls) and `IO_FLAG_MMAP_IFC` maps the file but
copies every list into anonymous memory while loading. So opening here reads the trained index
(the caller has it, checked), a few header bytes of the serving file (compared with the trained
index's: a cheap fingerprint of the header) and one 8-byte count per partition (to locate each
list: the file records no offsets), and builds the index from the trained bytes with empty lists.
`ensure(parts)` then reads each probed list once (one ranged read) and adds it whole, bytes
unchanged: searches give exactly what the whole file, read at once, gives. What opening reads grows
with `nlist` (~2 sqrt(N)), as the quantizer does; not with N.

The file stays open while the index lives: a file replaced by an edit (atomic rename) is still read
as it was at open, so the lists always match the counts walked then.
"""

from __future__ import annotations

import os
import threading

import faiss
import numpy as np

from retro_jax.retrieval import index as index_lib

_FOURCC = b"ilbl"
_HEAD = 36  # "ilbl" + nlist, code_size, n_per_block, block_size
_FINGERPRINT = 4096  # bytes of the header compared at each end of the trained prefix
_MAX_READ = 1 << 30  # one pread at most this many bytes (Linux caps a read near 2 GiB)


def lists_offset(trained: bytes, nlist: int) -> int | None:
  """Where the inverted lists start in `trained`'s serialization (and so in every serving shard's
  file): the trained index ends with `nlist` empty lists. None when its bytes do not end that way
  (another faiss layout: the caller reads the serving file whole)."""
  p = len(trained) - _HEAD - 16 * nlist
  if p < 16 or trained[p:p + 4] != _FOURCC or any(trained[p + _HEAD:]):
    return None
  head = np.frombuffer(trained[p + 4:p + _HEAD], np.uint64)
  if int(head[0]) != nlist or int(head[2]) < 1 or int(head[3]) < 1:
    return None
  return p


def _pread(fd: int, size: int, offset: int) -> bytearray:
  buf = bytearray(size)
  view, done = memoryview(buf), 0
  while done < size:
    got = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
    if got <= 0:
      raise EOFError
    done += got
  return buf


class ServingLists:
  """One serving shard's faiss index (`index`) whose inverted lists load when first probed."""

  def __init__(self, path: str, trained: bytes, nlist: int, offset: int, size: int):
    """`trained`: trained.faiss's bytes (already checked by the caller); `offset`: lists_offset of
    them; `size`: the file's recorded size. Raises IndexError_ naming `path` when the file does
    not fit them (damaged, or not of this index)."""
    self.path = path
    self._file = open(path, "rb", buffering=0)  # closed with this object
    self._fd = self._file.fileno()
    try:
      self._open(trained, nlist, offset, size)
    except BaseException:
      self._file.close()
      raise

  def _damaged(self, why: str) -> index_lib.IndexError_:
    return index_lib.IndexError_(f"Global index file {self.path} is damaged ({why}); rerun "
                                 "`python -m retro_jax.build_db` with the database's flags: it "
                                 "rebuilds the index.")

  def _open(self, trained: bytes, nlist: int, offset: int, size: int) -> None:
    fd = self._fd
    if hasattr(os, "posix_fadvise"):  # scattered small reads: no read-ahead around each
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    if os.fstat(fd).st_size != size:
      raise self._damaged(f"{os.fstat(fd).st_size} bytes, its record says {size}")
    end = offset + _HEAD
    if size < end:
      raise self._damaged("shorter than the trained index's header")
    first = bytes(_pread(fd, min(_FINGERPRINT, offset), 0))
    last_at = max(16, offset - _FINGERPRINT)
    last = bytes(_pread(fd, end - last_at, last_at))
    if (first[:8] + first[16:] != trained[:8] + trained[16:len(first)]
        or last != trained[last_at:end]):
      raise self._damaged("its header differs from trained.faiss")
    self.ntotal = int(np.frombuffer(first[8:16], np.int64)[0])
    self.n_per_block, self.block_size = (int(v) for v in np.frombuffer(last[-16:], np.uint64))
    # Each list's count, walked from the first list: where every list starts.
    self.offsets = np.empty(nlist, np.int64)
    self.sizes = np.empty(nlist, np.int64)
    at = end
    for p in range(nlist):
      if at + 16 > size:
        raise self._damaged(f"its lists end early, at partition {p}")
      n = int(np.frombuffer(_pread(fd, 8, at), np.uint64)[0])
      self.offsets[p], self.sizes[p] = at, n
      at += 16 + 8 * n + self._code_bytes(n)
    if at != size or int(self.sizes.sum()) != self.ntotal:
      raise self._damaged(f"its lists hold {int(self.sizes.sum())} entries in {at} bytes, its "
                          f"header says {self.ntotal} in {size}")
    # The serving file's header is the trained index's with its ntotal: the index it describes,
    # with every list empty.
    head = bytearray(trained)
    head[8:16] = first[8:16]
    self.index = faiss.deserialize_index(np.frombuffer(bytes(head), np.uint8))
    self.loaded = self.sizes == 0
    self._lock = threading.Lock()

  def _code_bytes(self, n: int) -> int:
    return -(-n // self.n_per_block) * self.block_size

  def ensure(self, parts: np.ndarray) -> None:
    """Reads the lists of partitions `parts` (ids < 0 ignored) not read yet; thread-safe."""
    parts = np.unique(parts[parts >= 0])
    need = parts[~self.loaded[parts]]
    if not len(need):
      return
    with self._lock:
      il = self.index.invlists
      for p in need[~self.loaded[need]]:
        p, n, at = int(p), int(self.sizes[p]), int(self.offsets[p])
        nc = self._code_bytes(n)
        buf = _pread(self._fd, 16 + 8 * n + nc, at)
        n_read = int(np.frombuffer(buf, np.uint64, 1)[0])
        nc_read = int(np.frombuffer(buf, np.uint64, 1, 8 + 8 * n)[0])
        if n_read != n or nc_read != nc:
          raise self._damaged(f"partition {p} changed since it was opened")
        ids = np.frombuffer(buf, np.int64, n, 8)
        codes = np.frombuffer(buf, np.uint8, nc, 16 + 8 * n)
        il.add_entries(p, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        self.loaded[p] = True

  def ram_bytes(self) -> int:
    """The lists' bytes in RAM once every one is read: codes (whole blocks) and int64 ids."""
    sizes = self.sizes
    return int(sum(self._code_bytes(int(n)) for n in sizes[sizes > 0])) + 8 * int(sizes.sum())
