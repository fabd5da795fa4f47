"""File corpora (directories, .jsonl) planned by file for the Beam tokenizer and chunks stages:
the launching process lists names and sizes only, units of files (and byte ranges of a .jsonl)
are classified and read by the workers that own them, and the documents, their ids, the corpus
stats, the errors, the tokenizer model and every chunk-store file equal the whole read's."""
import hashlib
import json
import os

import corpus_path  # tests/corpus_path.py
import pytest

from bench import plan_simulation
from retro_jax.build import pipeline as pipeline_lib
from retro_jax.build import stages as build_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus, layout, prepare


@pytest.fixture()
def small_units(monkeypatch):
  """Units of at most 3 files or 2,000 bytes: many units, bad records across them."""
  monkeypatch.setattr(corpus, "UNIT_BYTES", 2000)
  monkeypatch.setattr(corpus, "UNIT_FILES", 3)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """A directory with empty, binary and invalid UTF-8 files among good ones (nested), and a
  .jsonl with blank lines, empty and binary texts, keyless lines (keys from line numbers) and a
  line that is not JSON near its end."""
  root = tmp_path_factory.mktemp("messy")
  docs = corpus.read_documents(corpus_path.spec(kernel=14, wiki=30))
  d = root / "dir"
  for i, doc in enumerate(docs[:14]):
    (d / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
    (d / f"sub{i % 3}" / f"doc{i:02d}.txt").write_text(doc.text)
  (d / "sub0" / "doc03b.txt").write_bytes(b"  \n")
  (d / "sub1" / "doc04b.txt").write_bytes(b"abc\x00def")
  (d / "sub2" / "doc05b.txt").write_bytes(b"caf\xe9 au lait")
  (d / "sub1" / "empty.txt").write_bytes(b"")
  lines = []
  for i, doc in enumerate(docs[14:]):
    record = {"text": doc.text} if i % 2 else {"key": doc.key, "text": doc.text}
    lines.append(json.dumps(record))
    if i % 7 == 3:
      lines += ["", json.dumps({"text": " \n "}), json.dumps({"id": f"nul{i}", "text": "a\x00b"})]
  (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
  (root / "broken.jsonl").write_text("\n".join(lines[:20] + ["{not json"] + lines[20:]) + "\n")
  return root


def _plan(spec: str, max_docs=None):
  source = corpus.planned_corpus(spec, max_docs)
  sel = source.select([source.scan(u) for u in source.blocks(max_docs)], max_docs)
  return source, sel


def test_the_file_plan_reads_the_documents_and_stats_of_the_whole_read(messy, small_units):
  d, jsonl = str(messy / "dir"), str(messy / "docs.jsonl")
  specs = [d, jsonl, f"{d}:limit=6+{jsonl}:limit=9", f"{jsonl}:limit=17+{d}",
           corpus_path.ALL, corpus_path.spec(kernel=12, python=3, wiki=24)]
  for spec in specs:
    for max_docs in (None, 4, 19):
      source, sel = _plan(spec, max_docs)
      assert isinstance(source, corpus.FileCorpus)
      stats = corpus.CorpusStats()
      whole = corpus.read_documents(spec, stats, max_docs=max_docs)
      assert sel.stats.to_json() == stats.to_json() and sel.num_docs == len(whole)
      assert source.read(sel.spans(0, sel.num_docs), sel.num_docs) == whole, (spec, max_docs)
      stop = min(9, sel.num_docs)
      assert source.read(sel.spans(2, stop), stop - 2) == whole[2:stop]
      # One tokenizer range per unit used, read from that unit's files only.
      ranges = sel.doc_ranges(pipeline_lib.TOKENIZER_RANGE_DOCS)
      assert [x for a, b in ranges for x in source.read(sel.spans(a, b), b - a)] == whole
      assert all(len({s[0] for s in sel.spans(a, b)}) == 1 for a, b in ranges)
  source, sel = _plan(jsonl)
  assert len({u for u in source.units}) > 5  # byte ranges of one file, cut at line starts
  assert sel.stats.skipped_empty and sel.stats.skipped_binary_keys[0].startswith("nul")
  assert "line000000002" in {d.key for d in source.read(sel.spans(0, sel.num_docs), sel.num_docs)}
  stats = _plan(d)[1].stats
  assert (stats.skipped_empty, stats.skipped_binary, stats.invalid_utf8_replaced) == (2, 1, 1)


def test_file_plan_errors_are_the_whole_reads(messy, small_units):
  """A line that is not JSON stops the build where the whole read reaches it (its line number
  counted across the byte ranges), not where the limit stops first; repeated keys are refused."""
  broken = str(messy / "broken.jsonl")
  with pytest.raises(corpus.CorpusError) as whole:
    corpus.read_documents(broken)
  with pytest.raises(corpus.CorpusError) as planned:
    _plan(broken)
  assert str(planned.value) == str(whole.value) and ":21: not valid JSON" in str(whole.value)
  assert _plan(broken + ":limit=12")[1].num_docs == len(corpus.read_documents(broken + ":limit=12"))
  d = str(messy / "dir")
  with pytest.raises(corpus.CorpusError, match="duplicate document keys"):
    _plan(f"{d}+{d}")
  assert corpus.planned_corpus(str(messy / "missing")) is None  # read whole: its own error


def test_the_launcher_lists_names_and_sizes_only(tmp_path, monkeypatch):
  """Planning the chunks stage over a directory of 3,000 files opens none of them; the job graph
  holds at most about PLAN_UNITS units (grown to fit), not one element per file."""
  monkeypatch.setattr(corpus, "UNIT_FILES", 1)
  monkeypatch.setattr(corpus, "PLAN_UNITS", 16)
  graphs = {}
  for n in (300, 3000):
    d = tmp_path / f"c{n}"
    for i in range(n):
      (d / f"g{i // 100:03d}").mkdir(parents=True, exist_ok=True)
      (d / f"g{i // 100:03d}" / f"{i:05d}.txt").write_text(f"document {i}\n" * 20)
    db = tmp_path / f"db{n}"
    (db / "tokenizer").mkdir(parents=True)
    counter = plan_simulation.Counter(str(d)).start()
    try:
      graphs[n] = pipeline_lib.run_stage("chunks", db, {"corpus": str(d), "max_docs": None},
                                         plan_only=True)
    finally:
      counter.stop()
    assert counter.bytes == 0 and counter.requests >= n  # a stat per file, no read
    assert 16 <= len(corpus.planned_corpus(str(d)).units) <= 2 * 16
  assert graphs[3000] < 1.1 * graphs[300], graphs


def _digests(root) -> dict[str, str]:
  return {os.path.relpath(os.path.join(b, f), root):
          hashlib.sha256(open(os.path.join(b, f), "rb").read()).hexdigest()
          for b, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("spec,max_docs", [
    (corpus_path.spec(kernel=20, python=5, wiki=30), None),
    (corpus_path.spec(kernel=20, wiki=30), 37)])
def test_beam_file_corpus_gives_the_whole_reads_tokenizer_and_store(tmp_path, spec, max_docs,
                                                                    small_units):
  """The Beam tokenizer and chunks stages on the repository's test corpus (directories and a
  .jsonl, planned in many units) write the tokenizer model and the chunk store (every shard file,
  done marker and the manifest) that the whole read writes."""
  settings = dict(vocab_size=400, docs_per_shard=16, heldout_fraction=0.2, max_docs=max_docs)
  tok = prepare.build_tokenizer(spec, tmp_path / "whole", vocab_size=400, max_docs=max_docs,
                                heldout_fraction=0.2)
  chunk_store_lib.build_chunk_store(spec, tmp_path / "whole" / layout.CHUNKS_DIR, tok,
                                    docs_per_shard=16, max_docs=max_docs, heldout_fraction=0.2,
                                    progress=False)
  db = tmp_path / "beam"
  build_lib.build(db, stages=("tokenizer", "chunks"), corpus=spec, **settings)
  assert (db / layout.TOKENIZER_PATH).read_bytes() == (
      tmp_path / "whole" / layout.TOKENIZER_PATH).read_bytes()
  want = _digests(tmp_path / "whole" / layout.CHUNKS_DIR)
  assert _digests(db / layout.CHUNKS_DIR) == want and len(want) >= 3 * 5 + 1
  assert len(corpus.planned_corpus(spec, max_docs).units) > 10


def test_past_the_sample_size_the_tokenizer_sample_does_not_depend_on_the_units(tmp_path,
                                                                                 monkeypatch):
  """With more training lines than the sample size, the lines are a seeded draw over the corpus's
  line count (tokenizer.line_picks): the same model whatever the units the files are grouped in."""
  monkeypatch.setattr(prepare, "INPUT_SENTENCE_SIZE", 700)
  spec = corpus_path.spec(kernel=20, wiki=30)
  settings = dict(stages=("tokenizer",), corpus=spec, vocab_size=500, heldout_fraction=0.2)
  build_lib.build(tmp_path / "big_units", **settings)
  monkeypatch.setattr(corpus, "UNIT_BYTES", 2000)
  monkeypatch.setattr(corpus, "UNIT_FILES", 3)
  assert len(corpus.planned_corpus(spec).units) > 10
  build_lib.build(tmp_path / "small_units", **settings)
  assert (tmp_path / "small_units" / layout.TOKENIZER_PATH).read_bytes() == (
      tmp_path / "big_units" / layout.TOKENIZER_PATH).read_bytes()
