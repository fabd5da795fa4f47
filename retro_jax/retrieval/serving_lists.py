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
copies every list into anonymous memory while loading. So opening here reads a few header bytes
of the serving file (compared with the trained index's: a cheap fingerprint of the header) and
builds the index from the trained file with empty lists. `ensure(parts)` then reads each probed
list once (one ranged read) and adds it whole, bytes unchanged: searches give exactly what the
whole file, read at once, gives.

The trained file itself (`TrainedFile`) is memory-mapped (faiss's `IO_FLAG_MMAP_IFC`, which maps
the coarse quantizer's centroids and its HNSW graph's links), not read, and loaded once per
process: every serving shard's index is built around its quantizer. Its centroids, ~2 sqrt(N) of
them, are paged in as routing uses them, and every process on a host shares those pages. Opening reads its header and the
36-byte head of its empty lists; its sha256 is checked by `verify` / `--audit`, which read it
whole.

Where each list starts comes from the serving shard's lists file (`serving/shard-S.lists.npy`,
written beside the faiss file when it is written: `lists_file_bytes`): int64 [nlist + 1], entry p
the byte offset of list p in the faiss file (its count field), entry nlist the file's size, so
list p is bytes [entry p, entry p + 1). Opening reads its header and first and last entries (they
must be the lists' start and the file's end); a probed list reads its two entries (one 16-byte
ranged read), then the list, whose count and code size must fill that span exactly. So opening
and a query read O(probed lists), whatever `nlist`. A serving shard without a lists file (an
index built before them; `build_db --stages=finalize` writes them) is opened by walking the
faiss file's counts instead: one 8-byte read per partition (what opening reads then grows with
`nlist`, ~2 sqrt(N)).

The files stay open while the index lives: a file replaced by an edit (atomic rename) is still
read as it was at open, so the lists always match the offsets known then.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Callable

import faiss
import numpy as np

from retro_jax.retrieval import index as index_lib

_FOURCC = b"ilbl"
_HEAD = 36  # "ilbl" + nlist, code_size, n_per_block, block_size
_FINGERPRINT = 4096  # bytes of the header compared at each end of the trained prefix
_MAX_READ = 1 << 30  # one pread at most this many bytes (Linux caps a read near 2 GiB)
LISTS_DTYPE = np.dtype("<i8")


class Damaged(ValueError):
  """A serving file whose lists do not add up (the message says where); the caller names it."""


def _geometry(head: bytes, nlist: int) -> tuple[int, int] | None:
  """(n_per_block, block_size) from the lists' 36-byte header `head`; None when it is not the
  header of `nlist` fast-scan block lists."""
  if len(head) != _HEAD or head[:4] != _FOURCC:
    return None
  v = np.frombuffer(head[4:], np.uint64)
  if int(v[0]) != nlist or int(v[2]) < 1 or int(v[3]) < 1:
    return None
  return int(v[2]), int(v[3])


def trained_lists_offset(trained_size: int, nlist: int) -> int:
  """Where the inverted lists start in the trained file's serialization (and so in every serving
  shard's file), from its size: the trained index ends with `nlist` empty lists (36 bytes of
  header, 16 a list)."""
  return trained_size - _HEAD - 16 * nlist


def _code_bytes(n: int, n_per_block: int, block_size: int) -> int:
  return -(-n // n_per_block) * block_size


def walk(read: Callable[[int, int], bytes], start: int, size: int, nlist: int, n_per_block: int,
         block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(offsets int64 [nlist + 1], counts int64 [nlist]) of a serving file of `size` bytes whose
  lists start at `start` (after their 36-byte header): each list's count read in turn
  (`read(offset, nbytes)`), from the first; offsets[nlist] is where the last list ends. Raises
  Damaged when the lists run past the file."""
  offsets = np.empty(nlist + 1, np.int64)
  counts = np.empty(nlist, np.int64)
  at = start
  for p in range(nlist):
    if at + 16 > size:
      raise Damaged(f"its lists end early, at partition {p}")
    n = int.from_bytes(read(at, 8), "little")
    if 8 * n > size - at:
      raise Damaged(f"its partition {p} counts {n} entries, past the file's end")
    offsets[p], counts[p] = at, n
    at += 16 + 8 * n + _code_bytes(n, n_per_block, block_size)
  offsets[nlist] = at
  return offsets, counts


def read_offsets(read: Callable[[int, int], bytes], size: int, at: int, nlist: int
                 ) -> np.ndarray | None:
  """int64 [nlist + 1]: the lists file of a serving file of `size` bytes (`read(offset, nbytes)`:
  a pread, or slices of the file held whole) whose lists start at `at` (trained_lists_offset;
  one walk over its counts); None when the file has no fast-scan block lists there (another
  faiss layout: no lists file). Raises Damaged when its lists do not add up."""
  if at < 16 or at + _HEAD > size:
    return None
  blocks = _geometry(bytes(read(at, _HEAD)), nlist)
  if blocks is None:
    return None
  ntotal = int.from_bytes(read(8, 8), "little", signed=True)
  return _checked_walk(read, blocks, nlist, at, size, ntotal)[0]


def file_offsets(path: str, at: int, nlist: int) -> np.ndarray | None:
  """read_offsets of a local serving file (one 8-byte read per partition)."""
  with open(path, "rb", buffering=0) as f:
    fd = f.fileno()
    return read_offsets(lambda o, n: _pread(fd, n, o), os.fstat(fd).st_size, at, nlist)


def has_block_lists(head: bytes, nlist: int) -> bool:
  """Whether `head` (36 bytes at trained_lists_offset) heads `nlist` fast-scan block lists."""
  return _geometry(bytes(head), nlist) is not None


def _checked_walk(read, blocks: tuple[int, int], nlist: int, at: int, size: int, ntotal: int):
  offsets, counts = walk(read, at + _HEAD, size, nlist, *blocks)
  if offsets[nlist] != size or int(counts.sum()) != ntotal:
    raise Damaged(f"its lists hold {int(counts.sum())} entries in {int(offsets[nlist])} bytes, "
                  f"its header says {ntotal} in {size}")
  return offsets, counts


def lists_file_header(nlist: int) -> bytes:
  """The .npy header (np.save's) of a lists file: int64 [nlist + 1]."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(LISTS_DTYPE), "fortran_order": False,
            "shape": (nlist + 1,)})
  return buf.getvalue()


def lists_file_bytes(offsets: np.ndarray) -> bytes:
  """A lists file's bytes (np.save's of `offsets`, int64 [nlist + 1])."""
  return lists_file_header(len(offsets) - 1) + np.ascontiguousarray(offsets, LISTS_DTYPE).tobytes()


def _pread(fd: int, size: int, offset: int) -> bytearray:
  buf = bytearray(size)
  view, done = memoryview(buf), 0
  while done < size:
    got = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
    if got <= 0:
      raise EOFError
    done += got
  return buf


class TrainedFile:
  """trained.faiss opened for serving: the few bytes of it that opening a serving shard compares
  (`head`, `tail`) and the lists' geometry, read; the index itself memory-mapped (`index()`)."""

  def __init__(self, path: str, size: int, nlist: int):
    """`size`: the file's recorded size (checked by the caller). `geometry` is None when the file
    does not end in `nlist` empty fast-scan block lists (another faiss layout: the caller reads
    the serving files whole). The file stays open while this object lives: `index()` maps the
    file read here, even if an atomic rename has replaced the path since."""
    self.path, self.size, self.nlist = path, size, nlist
    self.geometry = None
    self._file = open(path, "rb", buffering=0)  # closed with this object
    self._index = None
    fd = self._file.fileno()
    self.offset = trained_lists_offset(size, nlist)  # where its empty lists start
    if self.offset < 16:
      return
    end = self.offset + _HEAD
    self.last_at = max(16, self.offset - _FINGERPRINT)
    self.head = bytes(_pread(fd, min(_FINGERPRINT, self.offset), 0))
    self.tail = bytes(_pread(fd, end - self.last_at, self.last_at))
    self.geometry = _geometry(self.tail[-_HEAD:], nlist)

  def _read(self):
    by_fd = f"/proc/self/fd/{self._file.fileno()}"  # the file opened above, where Linux says so
    return faiss.read_index(by_fd if os.path.exists(by_fd) else self.path, faiss.IO_FLAG_MMAP_IFC)

  def index(self):
    """The trained index, memory-mapped, loaded once (the routing quantizer)."""
    if self._index is None:
      self._index = self._read()
    return self._index

  def serving_index(self, ntotal: int):
    """A serving file's header as an index: the trained one with `ntotal` set and its lists empty.
    A fast-scan IVF-PQ (the global index's) is built from the trained index's fields around its
    coarse quantizer, shared, not loaded again (its serialization is the trained file's, byte for
    byte: tests/retrieval/test_global_index.py); another type is loaded again, mapped."""
    trained = faiss.downcast_index(self.index())
    if type(trained) is faiss.IndexIVFPQFastScan:
      index = faiss.IndexIVFPQFastScan(trained.quantizer, trained.d, trained.nlist, trained.pq.M,
                                       trained.pq.nbits, trained.metric_type, trained.bbs)
      index.pq = trained.pq
      index.by_residual, index.implem, index.qbs2 = (trained.by_residual, trained.implem,
                                                     trained.qbs2)
      index.nprobe, index.is_trained = trained.nprobe, trained.is_trained
      index.precompute_table()
      index.referenced_objects = [self]  # the quantizer lives in the trained index
    else:
      index = self._read()
    index.ntotal = ntotal
    return index


class ServingLists:
  """One serving shard's faiss index (`index`) whose inverted lists load when first probed."""

  def __init__(self, path: str, trained: TrainedFile, size: int,
               lists_path: str | None = None, lists_size: int | None = None):
    """`trained`: the index's trained file (its size checked by the caller, `geometry` not None);
    `size`: the file's recorded size; `lists_path`, `lists_size`: its lists file and that file's
    recorded size (None: the counts are walked). Raises IndexError_ naming `path` (or the lists
    file) when the files do not fit them (damaged, or not of this index)."""
    self.path, self.lists_path = path, lists_path
    self._file = open(path, "rb", buffering=0)  # closed with this object
    self._lists_file = None
    try:
      self._fd = self._file.fileno()
      if lists_path is not None:
        try:
          self._lists_file = open(lists_path, "rb", buffering=0)
        except FileNotFoundError:
          raise self._lists_damaged(None) from None
      self._open(trained, size, lists_size)
    except BaseException:
      self._file.close()
      if self._lists_file is not None:
        self._lists_file.close()
      raise

  def _damaged(self, why: str) -> index_lib.IndexError_:
    return index_lib.IndexError_(f"Global index file {self.path} is damaged ({why}); rerun "
                                 "`python -m retro_jax.build_db` with the database's flags: it "
                                 "rebuilds the index.")

  def _lists_damaged(self, why: str | None) -> index_lib.IndexError_:
    """The lists file is missing (`why` None) or does not fit the faiss file."""
    what = "is missing;" if why is None else f"does not fit {self.path} ({why}); delete it and"
    return index_lib.IndexError_(
        f"Global index lists file {self.lists_path} {what} rerun `python -m retro_jax.build_db "
        "--db=DB --stages=finalize`: it writes it again from the faiss file.")

  def _open(self, trained: TrainedFile, size: int, lists_size: int | None) -> None:
    fd = self._fd
    nlist, offset = trained.nlist, trained.offset
    if hasattr(os, "posix_fadvise"):  # scattered small reads: no read-ahead around each
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    if os.fstat(fd).st_size != size:
      raise self._damaged(f"{os.fstat(fd).st_size} bytes, its record says {size}")
    end = offset + _HEAD
    if size < end:
      raise self._damaged("shorter than the trained index's header")
    first = bytes(_pread(fd, len(trained.head), 0))
    last = bytes(_pread(fd, end - trained.last_at, trained.last_at))
    if first[:8] + first[16:] != trained.head[:8] + trained.head[16:] or last != trained.tail:
      raise self._damaged("its header differs from trained.faiss")
    self.nlist, self.size, self.start = nlist, size, end
    self.ntotal = int(np.frombuffer(first[8:16], np.int64)[0])
    blocks = trained.geometry
    self.n_per_block, self.block_size = blocks
    # offsets[p]: where list p starts (its count), offsets[nlist]: where the last ends; -1 where
    # not known yet (a lists file: each probed list's two entries are read with it).
    if self._lists_file is None:
      try:
        self.offsets, counts = _checked_walk(lambda o, n: _pread(fd, n, o), blocks, nlist,
                                             offset, size, self.ntotal)
      except Damaged as e:
        raise self._damaged(str(e)) from None
      self.loaded = counts == 0
    else:
      self.offsets = np.full(nlist + 1, -1, np.int64)
      self.offsets[0], self.offsets[nlist] = self._lists_ends(nlist, size, end, lists_size)
      self.loaded = np.zeros(nlist, bool)
    # The serving file's header is the trained index's with its ntotal: the index it describes,
    # with every list empty.
    self.index = trained.serving_index(self.ntotal)
    self._lock = threading.Lock()

  def _lists_ends(self, nlist: int, size: int, end: int, lists_size: int | None
                  ) -> tuple[int, int]:
    """Checks the lists file's size and header and reads its first and last entries (which must
    be where the lists start and the file's size); returns them."""
    lfd = self._lists_file.fileno()
    head = lists_file_header(nlist)
    self._entries_at = len(head)
    got = os.fstat(lfd).st_size
    if got != lists_size:
      raise self._lists_damaged(f"{got} bytes, its record says {lists_size}")
    if got != len(head) + 8 * (nlist + 1):
      raise self._lists_damaged(f"{got} bytes, {nlist + 1} offsets take "
                                f"{len(head) + 8 * (nlist + 1)}")
    top = bytes(_pread(lfd, len(head) + 8, 0))
    if top[:len(head)] != head:
      raise self._lists_damaged(f"its header is not that of int64 [{nlist + 1}]")
    a = int.from_bytes(top[len(head):], "little", signed=True)
    b = int.from_bytes(_pread(lfd, 8, len(head) + 8 * nlist), "little", signed=True)
    if (a, b) != (end, size):
      raise self._lists_damaged(f"it says the lists span bytes [{a}, {b}), the file has them at "
                                f"[{end}, {size})")
    return a, b

  def _code_bytes(self, n: int) -> int:
    return _code_bytes(n, self.n_per_block, self.block_size)

  def _span(self, p: int) -> tuple[int, int]:
    """Bytes [a, b) of list p in the faiss file: known, or its two lists-file entries read."""
    a, b = int(self.offsets[p]), int(self.offsets[p + 1])
    if a < 0 or b < 0:
      e = np.frombuffer(_pread(self._lists_file.fileno(), 16, self._entries_at + 8 * p),
                        LISTS_DTYPE)
      a, b = int(e[0]), int(e[1])
      if not self.start <= a <= b - 16 or b > self.size:
        raise self._lists_damaged(f"partition {p} at bytes [{a}, {b}), outside the lists' "
                                  f"[{self.start}, {self.size})")
      self.offsets[p], self.offsets[p + 1] = a, b
    return a, b

  def ensure(self, parts: np.ndarray) -> None:
    """Reads the lists of partitions `parts` (ids < 0 ignored) not read yet; thread-safe."""
    parts = np.unique(parts[parts >= 0])
    need = parts[~self.loaded[parts]]
    if not len(need):
      return
    with self._lock:
      il = self.index.invlists
      for p in need[~self.loaded[need]]:
        p = int(p)
        a, b = self._span(p)
        buf = _pread(self._fd, b - a, a)
        n = int.from_bytes(buf[:8], "little")
        nc = self._code_bytes(n)
        if (16 + 8 * n + nc != b - a
            or int.from_bytes(buf[8 + 8 * n:16 + 8 * n], "little") != nc):
          if self._lists_file is not None:
            raise self._lists_damaged(f"its partition {p}, bytes [{a}, {b}), holds no list")
          raise self._damaged(f"partition {p} changed since it was opened")
        ids = np.frombuffer(buf, np.int64, n, 8)
        codes = np.frombuffer(buf, np.uint8, nc, 16 + 8 * n)
        if n:
          il.add_entries(p, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        self.loaded[p] = True
