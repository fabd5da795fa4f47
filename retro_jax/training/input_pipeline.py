"""The grain input pipeline: fixed-length sequences of the chunk store, with retrieved neighbours.

Sequences. A split's chunk stream is the chunk-store chunks of its documents in chunk-id order
(split "train": the documents not held out; split "heldout": the held-out ones). Sequence i is the
stream positions [i*L, (i+1)*L), L = seq_len / chunk_size; the last partial sequence is dropped.
A sequence may span documents (each document's last chunk is padded with pad id 0).
Documents removed from the database (`retro_jax.build.edit --remove_docs`) are in neither split, and a
stored neighbour that is a removed chunk is handed out as missing (-1, all padding); the removal
also recomputes such rows (`neighbours.repair_after_deletion`), so this is a second guard.
Deletions are read when the source is created.

Example (one sequence; T = seq_len, L = T / 64, N neighbours, R = neighbour length, 128 default):
  "inputs":     int32 [T]  the L chunks' tokens, chunk-aligned (inputs[64*u:64*(u+1)] = chunk u).
  "targets":    int32 [T]  next tokens: the model predicts targets[t] from inputs[:t+1];
                targets[t] = inputs[t+1] when token t+1 is of the same document, and
                targets[T-1] = the first token of the chunk after the sequence's last one (same
                document only); every other position (document ends, padding) holds the pad id 0,
                which the training loss masks (retro_jax.model.loss.cross_entropy).
  "neighbours": int32 [L, N, R]  for chunk u, its first N stored neighbours
                (retro_jax.build.neighbours) of no document present in the sequence (the paper's
                rule, `exclude_sequence_docs=True`, retro_jax.training.sequence_exclusion; the
                stage itself excludes only the chunk's own document, so store more than N),
                each the neighbour chunk plus its continuation within its document
                (`ChunkStore.neighbour_tokens`), pad 0 past the document's end and for missing
                (-1) neighbours. Absent with retrieval=False.
                With `self_neighbour_rate` p > 0 (off by default), a fixed pseudo-random fraction p
                of the chunks get THEMSELVES as neighbour 0 (the chunk plus its true continuation;
                the stored neighbours shift right by one): the leakage the paper's evaluation
                filters, used on purpose to teach a model to copy from a neighbour that matches
                (`experiments/copy_tiny.py`; which chunks is a hash of (chunk id, seed)).
                With `neighbour_shift` S > 0 (off by default), each neighbour's R tokens start
                a pseudo-random 0..S tokens into the neighbour chunk instead of at its start (a
                hash of (chunk id, neighbour slot, seed); S <= chunk size keeps the whole
                continuation in view): text that recurs on the web recurs at any offset, but two
                versions of one file recur chunk-aligned, which lets a model copy by position
                instead of by content; shifted neighbours take that shortcut away.
Everything is gathered per example from memory-mapped files; the database is never loaded whole.

Pipeline (`make_dataset`): source -> seeded shuffle -> repeat (reshuffled each epoch) -> this
process's rows of each global batch (`ProcessRows`: JAX process p of P reads rows [p*B, (p+1)*B) of
global batch b, so the global batch is the single-process one row for row and each host reads only
its share) -> batch(drop_remainder=True). `batch_size` B is per process. The
iterator (`make_iterator`) is a grain DatasetIterator: `get_state()` / `set_state()` checkpoint it
(save the state with the model state, e.g. through orbax).

Joined examples (`input`, retro_jax.training.joined_examples): the same stream written ahead of
time by `build_db --stages=examples`, the examples already joined with their neighbour tokens. A
process then reads its rows of global batch b as one run of records (`JoinedBatches`), the same
batches byte for byte, with one read per batch instead of ~L x (1 + N) per example. `input="auto"`
(the default) reads them when a finished set of these settings and this database state exists,
the database otherwise; "joined" insists (an error says what is missing or stale); "random"
always reads the database.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import numpy as np

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.training import joined_examples as joined
from retro_jax.training import sequence_exclusion

PAD_ID = 0
SPLITS = ("train", "heldout")


def _complement(ranges_Hx2: np.ndarray, n: int) -> np.ndarray:
  """`[start, end)` ranges covering [0, n) minus the given sorted disjoint ranges."""
  out, pos = [], 0
  for s, e in ranges_Hx2:
    if s > pos:
      out.append((pos, s))
    pos = max(pos, int(e))
  if pos < n:
    out.append((pos, n))
  return np.asarray(out, np.int64).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class ChunkStream:
  """Positions 0..size-1 of a split's chunks, mapped to global chunk ids through a few ranges."""
  ranges_Sx2: np.ndarray  # sorted disjoint [start, end) global chunk-id ranges
  cum_S: np.ndarray       # stream position of each range's first chunk

  @classmethod
  def from_ranges(cls, ranges_Sx2: np.ndarray) -> "ChunkStream":
    ranges = np.asarray(ranges_Sx2, np.int64).reshape(-1, 2)
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    lengths = ranges[:, 1] - ranges[:, 0]
    cum = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return cls(ranges, cum)

  @classmethod
  def for_split(cls, store, split: str) -> "ChunkStream":
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}.")
    held = neighbours_lib.heldout_chunk_ranges(store)
    deleted = store.deleted_chunk_ranges()
    if split == "heldout":  # Held-out ranges are whole documents: drop the removed ones.
      return cls.from_ranges(held[~chunk_store_lib.in_ranges(held[:, 0], deleted)])
    gone = np.concatenate([held, deleted]) if len(deleted) else held
    return cls.from_ranges(_complement(gone[np.argsort(gone[:, 0], kind="stable")],
                                       int(store.num_chunks)))

  @property
  def size(self) -> int:
    return int((self.ranges_Sx2[:, 1] - self.ranges_Sx2[:, 0]).sum())

  def chunk_ids(self, positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, np.int64)
    j = np.searchsorted(self.cum_S, positions, side="right") - 1
    return self.ranges_Sx2[j, 0] + positions - self.cum_S[j]


class SequenceSource:
  """Random access to a split's sequences: `source[i]` is the example dict described above."""

  def __init__(self, db_dir: str | os.PathLike, seq_len: int, split: str = "train",
               retrieval: bool = True, num_neighbours: int | None = None,
               neighbour_len: int = 128, store=None, self_neighbour_rate: float = 0.0,
               seed: int = 0, exclude_sequence_docs: bool = True, neighbour_shift: int = 0):
    if not 0.0 <= self_neighbour_rate <= 1.0:
      raise ValueError(f"self_neighbour_rate={self_neighbour_rate} must be in [0, 1].")
    if self_neighbour_rate and not retrieval:
      raise ValueError("self_neighbour_rate > 0 needs retrieval=True (it sets neighbours).")
    self.self_neighbour_rate, self.seed = float(self_neighbour_rate), int(seed)
    self.neighbour_shift = int(neighbour_shift)
    self.db_dir = str(db_dir)
    self.store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
    self.chunk_size = int(self.store.chunk_size)
    if seq_len <= 0 or seq_len % self.chunk_size:
      raise ValueError(f"seq_len={seq_len} must be a positive multiple of the chunk size "
                       f"{self.chunk_size} of {db_dir}.")
    if neighbour_len < self.chunk_size:
      raise ValueError(f"neighbour_len={neighbour_len} must be >= the chunk size {self.chunk_size}.")
    if not 0 <= self.neighbour_shift <= self.chunk_size:
      raise ValueError(f"neighbour_shift={neighbour_shift} must be in [0, the chunk size "
                       f"{self.chunk_size}] (a larger shift loses the continuation).")
    self.pad_id = int(getattr(self.store, "pad_id", PAD_ID))
    self.seq_len = seq_len
    self.num_chunks_per_seq = seq_len // self.chunk_size
    self.split = split
    self.stream = ChunkStream.for_split(self.store, split)
    self._deleted_Rx2 = self.store.deleted_chunk_ranges()
    self.retrieval = retrieval
    self.neighbour_len = neighbour_len
    self.exclude_sequence_docs = bool(exclude_sequence_docs)
    if retrieval:
      self._nbr_shards = neighbours_lib.NeighbourShards(db_dir, self.store)
      k_stored = self.num_stored_neighbours = self._nbr_shards.k
      self.num_neighbours = k_stored if num_neighbours is None else int(num_neighbours)
      if not 1 <= self.num_neighbours <= k_stored:
        raise ValueError(f"num_neighbours={num_neighbours} but {db_dir}/neighbours holds "
                         f"{k_stored} per chunk; rebuild them with python -m retro_jax.build_db "
                         f"--db={db_dir} --stages=neighbours --num_neighbours={num_neighbours} "
                         f"--rebuild, or ask for fewer.")
    self._len = self.stream.size // self.num_chunks_per_seq

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return (f"SequenceSource({self.db_dir!r}, seq_len={self.seq_len}, split={self.split!r}, "
            f"retrieval={self.retrieval})")

  def sequence_chunk_ids(self, index: int) -> np.ndarray:
    """int64 [L]: the global chunk ids of sequence `index`."""
    if not 0 <= index < self._len:
      raise IndexError(f"sequence {index} out of range [0, {self._len}).")
    L = self.num_chunks_per_seq
    return self.stream.chunk_ids(np.arange(index * L, (index + 1) * L, dtype=np.int64))

  def neighbour_ids(self, chunk_ids_L: np.ndarray, exclude_docs: np.ndarray | None = None
                    ) -> np.ndarray:
    """int64 [L, N]: stored neighbour ids of the given chunks (-1 where none); with
    `exclude_docs`, the first N stored ones of no such document (`sequence_exclusion`)."""
    shard_L = self.store.shard_of(chunk_ids_L)  # neighbours shard j pairs with store shard j
    width = self.num_neighbours if exclude_docs is None else self.num_stored_neighbours
    out = np.empty((len(chunk_ids_L), width), np.int64)
    for j in np.unique(shard_L).tolist():
      m = shard_L == j
      rows = chunk_ids_L[m] - self.store.shard_span(j)[1]
      out[m] = self._nbr_shards.rows(j, rows)[:, :width]  # (the blocks they lie in verified)
    if len(self._deleted_Rx2):  # Never hand out a chunk of a removed document.
      out[chunk_store_lib.in_ranges(out, self._deleted_Rx2)] = -1
    if exclude_docs is not None:
      docs = np.full(out.shape, -1, np.int64)
      docs[out >= 0] = self.store.doc_ids(out[out >= 0])
      out = sequence_exclusion.exclude_documents(out, docs, exclude_docs, self.num_neighbours)
    if self.self_neighbour_rate:  # the copy curriculum: the chunk itself first, others shifted
      own = self_neighbour_mask(chunk_ids_L, self.self_neighbour_rate, self.seed)
      out[own] = np.concatenate([chunk_ids_L[own, None], out[own, :-1]], axis=1)
    return out

  def sequence_neighbour_ids(self, index: int) -> np.ndarray:
    """int64 [L, N]: the neighbour ids sequence `index` is given (see the module docstring)."""
    ids_L = self.sequence_chunk_ids(index)
    seq_docs = np.unique(self.store.doc_ids(ids_L)) if self.exclude_sequence_docs else None
    return self.neighbour_ids(ids_L, seq_docs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    ids_L = self.sequence_chunk_ids(index)
    inputs_T = np.asarray(self.store.tokens(ids_L), np.int32).reshape(-1)
    docs_T = np.repeat(np.asarray(self.store.doc_ids(ids_L), np.int64), self.chunk_size)
    nxt = int(ids_L[-1]) + 1
    next_token = self.pad_id
    if nxt < self.store.num_chunks:
      nid = np.array([nxt], np.int64)
      if int(self.store.doc_ids(nid)[0]) == docs_T[-1]:
        next_token = int(np.asarray(self.store.tokens(nid))[0, 0])
    targets_T = np.concatenate([inputs_T[1:], np.array([next_token], np.int32)])
    targets_T[:-1] = np.where(docs_T[1:] == docs_T[:-1], targets_T[:-1], self.pad_id)
    example = {"inputs": inputs_T, "targets": targets_T.astype(np.int32)}
    if self.retrieval:
      nbr_LxN = self.sequence_neighbour_ids(index)
      valid = nbr_LxN >= 0
      S, R = self.neighbour_shift, self.neighbour_len
      toks = np.asarray(self.store.neighbour_tokens(np.where(valid, nbr_LxN, 0).reshape(-1),
                                                    R + S), np.int32)
      if S:
        L, N = nbr_LxN.shape
        slot_LN = (ids_L[:, None] * N + np.arange(N)).reshape(-1)
        shift_LN = np.minimum((unit_hash(slot_LN, self.seed + 1) * (S + 1)).astype(np.int64), S)
        toks = toks[np.arange(len(toks))[:, None], shift_LN[:, None] + np.arange(R)]
      toks_LxNxR = toks.reshape(*nbr_LxN.shape, R)
      example["neighbours"] = np.where(valid[..., None], toks_LxNxR, self.pad_id).astype(np.int32)
    return example


def unit_hash(ids_N: np.ndarray, seed: int) -> np.ndarray:
  """float64 [N] in [0, 1): splitmix64 of (id, seed), the same on every host and run."""
  with np.errstate(over="ignore"):
    z = np.asarray(ids_N, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def self_neighbour_mask(chunk_ids_N: np.ndarray, rate: float, seed: int) -> np.ndarray:
  """bool [N]: the chunks that get themselves as neighbour 0 (splitmix64 of id and seed < rate)."""
  return unit_hash(chunk_ids_N, seed) < rate


def order(ds: grain.MapDataset, seed: int, shuffle: bool, num_epochs: int | None
          ) -> grain.MapDataset:
  """The element order of both paths: seeded shuffle (reshuffled each epoch), then repeat."""
  if shuffle:
    ds = ds.seed(seed).shuffle()
  return ds.repeat(num_epochs) if num_epochs != 1 else ds


def make_dataset(db_dir: str | os.PathLike, *, seq_len: int, batch_size: int, split: str = "train",
                 retrieval: bool = True, num_neighbours: int | None = None,
                 neighbour_len: int = 128, seed: int = 0, shuffle: bool | None = None,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, source: SequenceSource | None = None,
                 self_neighbour_rate: float = 0.0, neighbour_shift: int = 0,
                 input: str = "auto") -> grain.MapDataset:
  """Batched MapDataset of examples (leading axis `batch_size`, per process).

  Defaults: split "train" shuffles and repeats forever; split "heldout" reads once in order.
  `process_index/process_count` default to `jax.process_index()/jax.process_count()`.
  `input`: "auto" | "joined" | "random", where the examples come from (the module docstring).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if shuffle is None:
    shuffle = split == "train"
  if num_epochs is None and split != "train":
    num_epochs = 1
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  manifest = None
  if source is None and shuffle == (split == "train"):  # (the order the examples are written in)
    if not retrieval:
      num_neighbours = 0
    elif num_neighbours is None:
      num_neighbours = _stored_neighbours(db_dir) if input != "random" else None
    manifest = joined.find(db_dir, joined.Settings(
        split=split, seq_len=seq_len, retrieval=retrieval, num_neighbours=num_neighbours or 0,
        neighbour_len=neighbour_len, seed=seed,
        self_neighbour_rate=self_neighbour_rate if retrieval else 0.0,
        neighbour_shift=neighbour_shift if retrieval else 0), input)
    num_neighbours = num_neighbours or None
  elif input == "joined":
    raise joined.JoinedExamplesError("input=joined reads the examples in the order they were "
                                     "written: no other source or shuffle setting")
  if manifest is not None:
    if manifest["num_sequences"] < batch_size * process_count:
      raise ValueError(f"{db_dir}: {manifest['num_sequences']} {split} sequences of {seq_len} "
                       f"tokens, fewer than batch_size={batch_size} x {process_count} processes; "
                       "use a bigger corpus, shorter sequences or a smaller batch.")
    total = None if num_epochs is None else num_epochs * manifest["num_sequences"]
    return grain.MapDataset.source(joined.JoinedBatches(manifest, batch_size, process_index,
                                                        process_count, total))
  src = source if source is not None else SequenceSource(
      db_dir, seq_len, split, retrieval, num_neighbours, neighbour_len,
      self_neighbour_rate=self_neighbour_rate, seed=seed, neighbour_shift=neighbour_shift)
  ds = grain.MapDataset.source(src)
  global_batch = batch_size * process_count
  if len(ds) < global_batch:
    raise ValueError(f"{db_dir}: {len(ds)} {split} sequences of {seq_len} tokens, fewer than "
                     f"batch_size={batch_size} x {process_count} processes; use a bigger corpus, "
                     "shorter sequences or a smaller batch.")
  ds = order(ds, seed, shuffle, num_epochs)
  if process_count > 1:
    ds = grain.MapDataset.source(ProcessRows(ds, batch_size, process_index, process_count))
  return ds.batch(batch_size, drop_remainder=True)


def _stored_neighbours(db_dir: str | os.PathLike) -> int:
  """How many neighbours per chunk the database stores (num_neighbours=None asks for all)."""
  shards, _ = neighbours_lib.open_neighbours(db_dir, chunk_store_lib.ChunkStore.open(db_dir))
  return int(shards.k)


class ProcessRows:
  """This process's rows of every global batch of a (shuffled, repeated) dataset.

  Global batch b is elements [b*G, (b+1)*G) of `ds` (G = batch_size x process_count, the order a
  single process would read); process p reads only rows [p*B, (p+1)*B) of each. The global array
  assembled from the processes' rows (`jax.make_array_from_process_local_data`, process p's rows
  at [p*B, (p+1)*B)) is the single-process batch, row for row: losses do not depend on the number
  of hosts. The remainder of a finite dataset (< G elements) is dropped on every process alike.
  """

  def __init__(self, ds: grain.MapDataset, batch_size: int, process_index: int,
               process_count: int):
    self.ds, self.b, self.p, self.n = ds, batch_size, process_index, process_count
    self._len = (len(ds) // (batch_size * process_count)) * batch_size

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int):
    i = int(i)
    batch, row = divmod(i, self.b)
    return self.ds[(batch * self.n + self.p) * self.b + row]


def make_iterator(db_dir: str | os.PathLike, *, read_threads: int = 4,
                  **kwargs: Any) -> grain.DatasetIterator:
  """`iter(make_dataset(...).to_iter_dataset())`: checkpoint it with get_state()/set_state()."""
  ds = make_dataset(db_dir, **kwargs)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
  return iter(ds.to_iter_dataset(read_options=options))
