"""The fixed test corpus, tests/data/corpus (see its README.md): its absolute path and corpus specs.

Tests read these files, never the documentation installed on the machine, so that every machine
builds the same databases and measures the same values.
"""
import os

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus")
KERNEL_DIR = os.path.join(CORPUS_DIR, "kernel")  # Linux 6.1 documentation sources (.rst.txt)
PYTHON_DIR = os.path.join(CORPUS_DIR, "python")  # Python 3.11 documentation sources (.rst.txt)
WIKI_JSONL = os.path.join(CORPUS_DIR, "wiki.jsonl")  # Wikipedia leads, keys "wiki:<Title>"
ALL = f"{KERNEL_DIR}+{PYTHON_DIR}+{WIKI_JSONL}"  # the whole corpus: 50 + 11 + 60 documents


def spec(*, kernel=None, python=None, wiki=None) -> str:
  """A corpus spec of the first N (an int) documents of each part named, in the order kernel,
  python, wiki: spec(kernel=12, wiki=24) == f"{KERNEL_DIR}:limit=12+{WIKI_JSONL}:limit=24"."""
  parts = [f"{path}:limit={n}" for path, n in
           ((KERNEL_DIR, kernel), (PYTHON_DIR, python), (WIKI_JSONL, wiki)) if n is not None]
  if not parts:
    raise ValueError("name at least one part: kernel=, python= or wiki=")
  return "+".join(parts)
