"""Training examples joined with their neighbours ahead of time: ArrayRecord shards read in runs.

The random-access loader (retro_jax.training.input_pipeline.SequenceSource) gathers, per
example, every chunk of the sequence and every neighbour chunk with its continuation from the
database: about L x (1 + N) ranged reads (L chunks, N neighbours) on gs://. The `examples` stage
(retro_jax.training.examples_stage, `build_db --stages=examples`) writes instead the examples the
loader would hand out, in the order it would hand them out, as ArrayRecord shards; a training host
then reads its rows of each global batch as one contiguous run of records.

Layout, `DB/examples/<name>/` (`name`: the split and the settings below, readable, plus a hash):
  manifest.json       written last: the settings, the database fingerprint, the epochs written,
                      the record layout, `num_records` and the shard count. No manifest: not
                      finished.
  building.json       the same record for the build under way (a later build of other inputs
                      clears the directory first).
  shard-XXXXX.arr     ArrayRecord (group_size 1), `examples_per_shard` records each (the last
                      may be shorter): record j is global element j of the random path's stream
                      `source -> seeded shuffle -> repeat` (input_pipeline.make_dataset, before a
                      process takes its rows), for the manifest's `epochs`. A record is the
                      example's arrays back to back (inputs [T], targets [T], neighbours
                      [L, N, R]) in `token_dtype` (uint16 where the vocabulary fits, else int32).

Settings (`Settings`): split, seq_len, retrieval, num_neighbours, neighbour_len, seed,
self_neighbour_rate, neighbour_shift: what makes `SequenceSource[i]` and the order. The global
batch and the number of hosts do not: process p of P reading rows [p*B, (p+1)*B) of global batch b
reads records [(b*P + p)*B, (b*P + p + 1)*B), one run (`JoinedBatches`). Past the epochs written,
the loader reads them again from the start (the random path would reshuffle: a run longer than the
written epochs differs from it there; the paper's runs are under one epoch).

The fingerprint (`db_fingerprint`) is a sha256 of the chunk store's manifest checksum and totals,
the neighbours stage's outputs record and the removed-document ranges: a database rebuilt, edited
(`retro_jax.edit_db`) or given new neighbours makes the examples stale, and the loader refuses them
(input "joined") or falls back to the random path (input "auto").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from typing import Any

import numpy as np
from array_record.python import array_record_module
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, provenance
from retro_jax.errors import UserError

EXAMPLES_DIR = "examples"
MANIFEST = "manifest.json"
BUILDING = "building.json"
FORMAT_VERSION = 1
EXAMPLES_PER_SHARD = 1024
INPUTS = ("auto", "joined", "random")
FIELDS = ("inputs", "targets", "neighbours")  # a record's arrays, in this order
# ArrayRecord writer: one record per group, so any record is read alone (grain's requirement too).
WRITER_OPTIONS = "group_size:1"
# Reader: a read of a run of records fetches up to this many bytes per request (one request per
# host batch at the paper's sizes: 16 rows x ~50 KB).
READAHEAD = "8M"


class JoinedExamplesError(UserError, ValueError):
  """Joined examples asked for but missing, unfinished, or built from other settings or inputs."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What fixes every example and the order: the loader's arguments (make_dataset)."""
  split: str
  seq_len: int
  retrieval: bool
  num_neighbours: int  # 0 without retrieval
  neighbour_len: int
  seed: int
  self_neighbour_rate: float = 0.0
  neighbour_shift: int = 0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def shuffle(self) -> bool:
    return self.split == "train"  # make_dataset's default: train shuffles, heldout reads in order

  def name(self) -> str:
    digest = hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    nbrs = f"n{self.num_neighbours}x{self.neighbour_len}" if self.retrieval else "noretrieval"
    return f"{self.split}_seq{self.seq_len}_{nbrs}_seed{self.seed}_{digest}"


def db_fingerprint(db: str | os.PathLike, store=None) -> str:
  """sha256 over what the examples are made from, read from a few small files."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db)
  top = store.manifest
  parts = {"store": {k: top.get(k) for k in ("content_sha256", "num_chunks", "num_shards",
                                             "chunk_size")},
           "heldout": (top.get("heldout") or {}).get("sha256"),
           "tokenizer": (top.get("tokenizer") or {}).get("fingerprint"),
           "neighbours": provenance.read_outputs(db, "neighbours"),
           "deleted": store.deleted_chunk_ranges().tolist()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def examples_dir(db: str | os.PathLike, settings: Settings) -> epath.Path:
  return epath.Path(db) / EXAMPLES_DIR / settings.name()


def shard_path(directory: epath.Path, s: int) -> epath.Path:
  return directory / f"shard-{s:05d}.arr"


def token_dtype(store) -> np.dtype:
  vocab = int((store.manifest.get("tokenizer") or {}).get("vocab_size") or 1 << 31)
  return np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)


def record_shapes(settings: Settings, chunk_size: int) -> dict[str, list[int]]:
  shapes = {"inputs": [settings.seq_len], "targets": [settings.seq_len]}
  if settings.retrieval:
    shapes["neighbours"] = [settings.seq_len // chunk_size, settings.num_neighbours,
                            settings.neighbour_len]
  return shapes


def encode(example: dict[str, np.ndarray], dtype: np.dtype) -> bytes:
  return b"".join(np.ascontiguousarray(example[k], dtype).tobytes() for k in FIELDS
                  if k in example)


def decode_batch(records: list[bytes], shapes: dict[str, list[int]], dtype: np.dtype
                 ) -> dict[str, np.ndarray]:
  """int32 arrays [len(records), ...] from encoded records."""
  flat = np.frombuffer(b"".join(records), dtype).reshape(len(records), -1).astype(np.int32)
  out, pos = {}, 0
  for k in (k for k in FIELDS if k in shapes):  # (a JSON manifest may sort the keys)
    size = int(np.prod(shapes[k]))
    out[k] = flat[:, pos:pos + size].reshape(len(records), *shapes[k])
    pos += size
  return out


def read_json(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None


# ------------------------------------------------------------------------------------------------
# Reading.


def find(db: str | os.PathLike, settings: Settings, input: str, store=None) -> dict | None:
  """The manifest of the examples to read, or None for the random path.

  `input` "random": None. "auto": the matching finished set if there is one (a stale one is
  named on stderr and skipped). "joined": it, or JoinedExamplesError saying why not and how to
  build it."""
  if input not in INPUTS:
    raise JoinedExamplesError(f"input={input!r}; expected one of {INPUTS}.")
  if input == "random":
    return None
  directory = examples_dir(db, settings)
  manifest = read_json(directory / MANIFEST)
  how = (f"build them with python -m retro_jax.build_db --db={db} --stages=examples "
         "--config=EXPERIMENT (the experiment trained), or set --config.input=random")
  if manifest is None:
    if input == "joined":
      raise JoinedExamplesError(f"input=joined but {directory} holds no finished examples; {how}")
    return None
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db)
  problems = []
  if manifest.get("format_version") != FORMAT_VERSION:
    problems.append(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
  if manifest.get("settings") != settings.to_json():
    problems.append(f"settings {manifest.get('settings')} != {settings.to_json()}")
  if manifest.get("db_fingerprint") != db_fingerprint(db, store):
    problems.append("the database changed since they were written (rebuilt, edited or new "
                    "neighbours)")
  if not problems:
    return {**manifest, "directory": str(directory)}
  message = f"the examples in {directory} are stale: {'; '.join(problems)}"
  if input == "joined":
    raise JoinedExamplesError(f"{message}; rebuild them (--rebuild) or set --config.input=random")
  print(f"[input_pipeline] {message}; reading the database directly", file=sys.stderr, flush=True)
  return None


class JoinedBatches:
  """This process's batches, read from the joined examples: element b is rows [p*B, (p+1)*B) of
  global batch b, the records [(b*P + p)*B, (b*P + p + 1)*B) (one read of a run of records).

  `num_elements` global elements (None: forever); past the records written, the written epochs
  are read again from the start."""

  def __init__(self, manifest: dict, batch_size: int, process_index: int, process_count: int,
               num_elements: int | None):
    self.manifest = manifest
    self.directory = epath.Path(manifest["directory"])
    self.b, self.p, self.n = int(batch_size), int(process_index), int(process_count)
    self.records = int(manifest["num_records"])
    self.per = int(manifest["examples_per_shard"])
    self.shapes = {k: list(v) for k, v in manifest["shapes"].items()}
    self.dtype = np.dtype(manifest["token_dtype"])
    global_batch = self.b * self.n
    self._len = (sys.maxsize // global_batch if num_elements is None
                 else int(num_elements) // global_batch)
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    return f"JoinedBatches({str(self.directory)!r}, batch_size={self.b}, process={self.p}/{self.n})"

  def _reader(self, s: int):
    with self._lock:
      if s not in self._readers:
        self._readers[s] = array_record_module.ArrayRecordReader(
            os.fspath(shard_path(self.directory, s)),
            f"readahead_buffer_size:{READAHEAD},max_parallelism:1")
      return self._readers[s]

  def read(self, start: int, count: int) -> list[bytes]:
    """Records [start, start + count) of the written stream (wrapping past its end)."""
    out: list[bytes] = []
    j = start % self.records
    while len(out) < count:
      s, pos = divmod(j, self.per)
      take = min(count - len(out), self.per - pos, self.records - j)
      out += self._reader(s).read(pos, pos + take)
      j = (j + take) % self.records
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"batch {index} out of range [0, {self._len}).")
    first = (index * self.n + self.p) * self.b
    return decode_batch(self.read(first, self.b), self.shapes, self.dtype)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
