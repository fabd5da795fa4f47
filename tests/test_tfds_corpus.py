"""TFDS corpora read through `tfds.data_source` (ArrayRecord, no TensorFlow): a real TFDS dataset
written by TFDS's own builder (retro_jax/db/tfds_writer.py) from the test corpus, read and built into a chunk store that equals
the one built from the same texts as a .jsonl; and the Beam chunks stage's random-access path
(each shard's worker reads only its records) byte for byte against the whole-corpus read."""
import hashlib
import json
import os
import subprocess
import sys

import corpus_path  # tests/corpus_path.py
import pytest

from retro_jax.build import stages as build_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus, layout, prepare, tfds_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = corpus_path.spec(kernel=9, wiki=12)
# Records the reader must skip or repair, between good ones: counted in the corpus stats.
BAD = [("bad:empty", b"   \n"), ("bad:binary", b"abc\x00def"), ("bad:utf8", b"caf\xe9 au lait")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A TFDS data_dir with split `train` (the test corpus's documents, bad records among them)
  and split `clean` (the good documents only), and the `clean` texts as a .jsonl."""
  root = tmp_path_factory.mktemp("tfds")
  docs = corpus.read_documents(SOURCE)
  good = [(d.key, d.text.encode("utf-8")) for d in docs]
  train = good[:3] + BAD[:2] + good[3:7] + BAD[2:] + good[7:]
  tfds_writer.write_text_dataset(root / "data", "text_dataset", {"train": train, "clean": good})
  jsonl = root / "clean.jsonl"
  jsonl.write_text("".join(json.dumps({"key": k, "text": t.decode()}) + "\n" for k, t in good))
  return root, docs


def _spec(root, split="train", extra="&key_field=key") -> str:
  return f"tfds:text_dataset?split={split}&data_dir={root / 'data'}{extra}"


def test_tfds_reads_the_documents_in_record_order(data):
  root, docs = data
  stats = corpus.CorpusStats()
  got = corpus.read_documents(_spec(root), stats)
  # Empty and binary records skipped, invalid UTF-8 replaced, the good ones as written.
  assert got == docs[:7] + [corpus.Document("bad:utf8", "caf\ufffd au lait")] + docs[7:]
  assert (stats.skipped_empty_keys, stats.skipped_binary_keys) == (["bad:empty"], ["bad:binary"])
  assert stats.invalid_utf8_keys == ["bad:utf8"] and stats.documents == len(docs) + 1
  assert corpus.read_documents(_spec(root, "clean")) == corpus.read_documents(
      str(root / "clean.jsonl"))
  # Without key_field, the key is the record's place; ':limit=' and TFDS split slicing work.
  assert [d.key for d in corpus.read_documents(_spec(root, "clean", "") + ":limit=2")] == [
      "tfds:text_dataset/1.0.0:clean:000000000000", "tfds:text_dataset/1.0.0:clean:000000000001"]
  assert corpus.read_documents(_spec(root, "clean[2:4]")) == docs[2:4]
  # Text fields come from the raw tf.Example; TFDS's own decoding of whole records agrees.
  source = corpus.TfdsSource(_spec(root))
  fast = list(source.read(range(len(source))))
  source._raw = None  # pylint: disable=protected-access
  assert list(source.read(range(len(source)))) == fast and len(fast) == len(docs) + 3


def test_tfds_spec_errors_are_one_line(data):
  root, _ = data
  cases = [
      (f"tfds:no_such_dataset?data_dir={root / 'data'}", "not prepared in"),
      (_spec(root, "validation"), "Unknown split"),
      (_spec(root, extra="&text_field=body"), "text_field='body' is not a feature"),
      (_spec(root, extra="&key_field=id"), "key_field='id' is not a feature"),
      ("tfds:c4/en:train", "is not NAME"),
      (_spec(root, extra="&shuffle=1"), "unknown option"),
  ]
  for spec, message in cases:
    with pytest.raises(corpus.CorpusError, match=message) as e:
      corpus.read_documents(spec)
    assert "\n" not in str(e.value)
  with pytest.raises(corpus.CorpusError, match="duplicate document keys"):
    corpus.read_documents(_spec(root) + "+" + _spec(root))


def _digests(root) -> dict[str, str]:
  return {os.path.relpath(os.path.join(b, f), root):
          hashlib.sha256(open(os.path.join(b, f), "rb").read()).hexdigest()
          for b, _, files in os.walk(root) for f in files}


def test_build_db_from_tfds_equals_the_jsonl_build(data, tmp_path):
  """`python -m retro_jax.build_db --corpus=tfds:...` (tokenizer and chunks stages) gives the
  chunk store of the same texts as a .jsonl, shard file for shard file."""
  root, _ = data
  tok_dir = tmp_path / "tok"
  prepare.build_tokenizer(str(root / "clean.jsonl"), tok_dir, vocab_size=400,
                          heldout_fraction=0.2)
  tokenizer = str(tok_dir / layout.TOKENIZER_PATH)
  settings = dict(vocab_size=400, docs_per_shard=4, heldout_fraction=0.2, tokenizer=tokenizer)
  build_lib.build(tmp_path / "jsonl", stages=("tokenizer", "chunks"),
                  corpus=str(root / "clean.jsonl"), **settings)
  cmd = [sys.executable, "-m", "retro_jax.build_db", f"--db={tmp_path / 'tfds'}",
         f"--corpus={_spec(root, 'clean')}", "--stages=tokenizer,chunks",
         *(f"--{k}={v}" for k, v in settings.items())]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  want = _digests(tmp_path / "jsonl" / layout.CHUNKS_DIR)
  got = _digests(tmp_path / "tfds" / layout.CHUNKS_DIR)
  # Tokens, doc ids, doc table and keys of each shard, and each shard's record (format 3).
  shard_files = {k for k in want if "/" in k and not k.startswith(chunk_store_lib.RECORDS)}
  records = {k for k in want if k.startswith(chunk_store_lib.RECORDS + "/")}
  assert len(shard_files) == 6 * len(chunk_store_lib.SHARD_FILES)  # 21 documents, 4 a shard
  assert len(records) == 6
  both = shard_files | records
  assert {k: got.get(k) for k in both} == {k: want[k] for k in both}
  store = chunk_store_lib.ChunkStore.open(tmp_path / "tfds")
  assert store.manifest["corpus"]["spec"] == _spec(root, "clean")


@pytest.mark.parametrize("max_docs", [None, 11])
def test_beam_chunks_reads_only_its_records_and_gives_the_same_bytes(data, tmp_path, max_docs,
                                                                   monkeypatch):
  """The Beam chunks stage on a TFDS corpus (random access: blocks classified in parallel, each
  shard reads only its records) writes the chunk store `build_chunk_store` writes reading the
  whole corpus: every shard file, done marker (with the corpus stats) and the manifest."""
  root, _ = data
  monkeypatch.setattr(corpus, "SCAN_BLOCK_RECORDS", 3)  # many blocks, bad records across them
  spec = f"{_spec(root)}:limit=17+{_spec(root, 'clean', '')}:limit=5"
  parts = corpus.random_access_parts(spec)
  assert parts is not None and corpus.random_access_parts(SOURCE) is None
  tok = prepare.build_tokenizer(spec, tmp_path / "tok", vocab_size=400, max_docs=max_docs)
  chunk_store_lib.build_chunk_store(spec, tmp_path / "whole" / layout.CHUNKS_DIR, tok,
                                    docs_per_shard=4, max_docs=max_docs, progress=False)
  db = tmp_path / "beam"
  build_lib.build(db, stages=("tokenizer", "chunks"), corpus=spec, vocab_size=400,
                  docs_per_shard=4, max_docs=max_docs,
                  tokenizer=str(tmp_path / "tok" / layout.TOKENIZER_PATH))
  want = _digests(tmp_path / "whole" / layout.CHUNKS_DIR)
  assert _digests(db / layout.CHUNKS_DIR) == want and len(want) >= 3 * 5 + 1
  m = chunk_store_lib.ChunkStore.open(db).manifest
  assert m["num_docs"] == (11 if max_docs else 17 + 5)
  assert m["corpus"]["bad_input"]["skipped_binary_keys"] == ["bad:binary"]
  # The plan from blocks classified one by one: the same documents, stats and shard spans.
  scans = [corpus.scan_block(parts, b) for b in corpus.scan_blocks(parts, max_docs)]
  sel = corpus.select_documents(spec, parts, scans, max_docs)
  assert {**sel.stats.to_json(), "num_store_shards": -(-sel.num_docs // 4)} == m[
      "corpus"]["bad_input"]
  whole = corpus.read_documents(spec, max_docs=max_docs)
  assert corpus.read_spans(parts, sel.spans(0, sel.num_docs), sel.num_docs) == whole
  assert corpus.read_spans(parts, sel.spans(5, 9), 4) == whole[5:9]
  # Documents j >= 3 of part 0 are records j + 2 (2 skipped before); document 17 (part 0's limit
  # reached) is part 1's record 0.
  assert sel.spans(15, 19) == ([] if max_docs else [(0, 17, 19), (1, 0, 2)])
  assert sel.spans(2, 4) == [(0, 2, 6)]


@pytest.mark.parametrize("max_docs", [None, 11])
def test_beam_tokenizer_samples_in_parallel_and_trains_the_same_model(data, tmp_path, max_docs,
                                                                       monkeypatch):
  """The Beam tokenizer stage on a TFDS corpus counts, picks and reads its training lines per
  range of documents in parallel: with fewer lines than the sample size it trains on all of them,
  in corpus order, as the whole read does: the same model bytes."""
  from retro_jax.build import pipeline as pipeline_lib
  from retro_jax.db import tokenizer as tokenizer_lib
  root, _ = data
  monkeypatch.setattr(corpus, "SCAN_BLOCK_RECORDS", 3)
  monkeypatch.setattr(pipeline_lib, "TOKENIZER_RANGE_DOCS", 4)  # many ranges
  spec = f"{_spec(root)}:limit=17+{_spec(root, 'clean', '')}:limit=5"
  prepare.build_tokenizer(spec, tmp_path / "whole", vocab_size=400, max_docs=max_docs,
                          heldout_fraction=0.2)
  build_lib.build(tmp_path / "beam", stages=("tokenizer",), corpus=spec, vocab_size=400,
                  max_docs=max_docs, heldout_fraction=0.2)
  want = (tmp_path / "whole" / layout.TOKENIZER_PATH).read_bytes()
  assert (tmp_path / "beam" / layout.TOKENIZER_PATH).read_bytes() == want
  # Past the sample size: a seeded draw of that many lines, the same from any number of ranges.
  picks = tokenizer_lib.line_picks(1000, 300, seed=0)
  assert len(picks) == len(set(picks.tolist())) == 300 and list(picks) == sorted(picks)
  assert (tokenizer_lib.line_picks(1000, 300, seed=0) == picks).all()
