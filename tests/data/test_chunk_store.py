"""Chunk store on a slice of the fixed test corpus (kernel docs, Python docs, Wikipedia leads)."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import corpus_path  # tests/corpus_path.py
import numpy as np
import pytest

from retro_jax.build import stages as build_stages
from retro_jax.db import chunk_store as cs
from retro_jax.db import corpus, layout, npy_rows, prepare, verify
from retro_jax.db import tokenizer as tokenizer_lib

SPEC = corpus_path.spec(kernel=30, python=10, wiki=40)
DOCS_PER_SHARD = 20  # 80 docs -> 4 shards
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def db(tmp_path_factory):
  out = tmp_path_factory.mktemp("db")
  prepare.prepare(SPEC, str(out), vocab_size=1000, docs_per_shard=DOCS_PER_SHARD,
                  heldout_fraction=0.1, seed=0)
  return out


@pytest.fixture(scope="session")
def tok(db):
  return tokenizer_lib.Tokenizer.load(db / layout.TOKENIZER_PATH)


@pytest.fixture(scope="session")
def store(db):
  return cs.ChunkStore.open(db)


@pytest.fixture(scope="session")
def docs():
  return list(corpus.iter_documents(SPEC))


def test_manifest_counts(store, tok, docs):
  m = store.manifest
  assert m["num_docs"] == len(docs) == 80
  assert len(m["shards"]) == 4
  assert store.num_chunks == sum(s["num_chunks"] for s in m["shards"]) == m["num_chunks"]
  assert [s["first_chunk_id"] for s in m["shards"]] == list(store.shard_offsets[:-1])
  assert m["tokenizer"]["fingerprint"] == tok.fingerprint
  assert m["chunk_size"] == store.chunk_size == 64
  assert all(set(s["files"]) == set(cs.SHARD_FILES) for s in m["shards"])
  store.check(tok)


def test_text_chunks_text_round_trip(store, tok, docs):
  exact = 0
  for doc_id, doc in enumerate(docs):
    first, end = store.doc_range(doc_id)
    assert store.doc_key(doc_id) == doc.key
    toks = store.tokens(np.arange(first, end, dtype=np.int64)).reshape(-1)
    ids = toks[toks != tok.pad_id]
    assert ids[-1] == tok.eos_id and (ids[:-1] != tok.eos_id).all()
    # The identity-normalised SentencePiece model round-trips these texts exactly.
    assert tok.decode(ids[:-1].tolist()) == tok.decode(tok.encode(doc.text)) == doc.text
    text = "".join(store.chunk_text(np.arange(first, end), tok))
    if text != doc.text:  # Only where a chunk boundary splits a byte-fallback character.
      assert "\ufffd" in text and not doc.text.isascii(), doc.key
    else:
      exact += 1
    assert (store.doc_ids(np.arange(first, end)) == doc_id).all()
  assert exact >= 0.8 * len(docs)  # measured: all 80 on the fixed corpus
  texts = [t for _, batch in store.iter_chunk_texts(tok, batch_size=100) for t in batch]
  assert texts == store.chunk_text(np.arange(store.num_chunks), tok)


def test_gather_across_shards_matches_per_shard_rows(store):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, store.num_chunks, size=300).astype(np.int64)
  got = store.tokens(ids)
  for i, cid in enumerate(ids):
    s = np.searchsorted(store.shard_offsets, cid, side="right") - 1
    np.testing.assert_array_equal(got[i], store.shard_tokens(s)[cid - store.shard_offsets[s]])
  with pytest.raises(IndexError):
    store.tokens(np.array([store.num_chunks], np.int64))


def test_neighbour_continuation_never_crosses_document_end(store, tok):
  ids = np.arange(store.num_chunks, dtype=np.int64)
  m = store.chunk_size
  for r in (64, 100, 128, 200):
    nb = store.neighbour_tokens(ids, r)
    assert nb.shape == (len(ids), r) and nb.dtype == np.int32
    doc = store.doc_ids(ids)
    ends = np.array([store.doc_range(int(d))[1] for d in doc])
    for j in range(-(-r // m)):
      part = nb[:, j * m:(j + 1) * m]
      inside = ids + j < ends
      np.testing.assert_array_equal(part[inside], store.tokens(ids[inside] + j)[:, :part.shape[1]])
      assert (part[~inside] == tok.pad_id).all()
  # A doc's last chunk: its continuation is all padding although the next doc follows on disk.
  last = store.doc_range(0)[1] - 1
  nb = store.neighbour_tokens(np.array([last]), 128)
  assert (nb[0, 64:] == tok.pad_id).all()
  assert (store.tokens(np.array([last + 1]))[0] != tok.pad_id).any()


def test_heldout_split_is_by_document_and_deterministic(store, docs):
  held = store.manifest["heldout"]
  want = [i for i, d in enumerate(docs) if corpus.is_heldout(d.key, 0.1, 0)]
  assert held["doc_ids"] == want and 0 < len(want) < len(docs)
  assert held["doc_keys"] == [docs[i].key for i in want]
  assert (np.nonzero(store.doc_heldout)[0] == want).all()
  other = [i for i, d in enumerate(docs) if corpus.is_heldout(d.key, 0.1, 1)]
  assert other != want  # Another seed, another split.
  keys = [f"doc{i}" for i in range(20000)]
  frac = np.mean([corpus.is_heldout(k, 0.01, 0) for k in keys])
  assert 0.007 < frac < 0.013


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("hook", ["RETRO_JAX_TEST_KILL_AFTER_SHARDS", "RETRO_JAX_TEST_KILL_MIDSHARD"])
def test_killed_chunking_resumes_byte_identical(db, tmp_path, hook):
  model = db / layout.TOKENIZER_PATH
  cmd = [sys.executable, "-m", "retro_jax.build_db", "--stages=tokenizer,chunks",
         f"--corpus={SPEC}", f"--db={tmp_path}", f"--tokenizer={model}",
         f"--docs_per_shard={DOCS_PER_SHARD}", "--heldout_fraction=0.1", "--vocab_size=1000"]
  env = {**os.environ, hook: "1"}
  killed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  # The Beam pipeline writes the shards in any order (one element each).
  done = sorted((tmp_path / "chunks").glob("*.done.json"))
  assert not (tmp_path / "chunks" / cs.MANIFEST).exists()
  if hook.endswith("MIDSHARD"):  # Shard 1 was half written: a tokens file, no marker.
    assert (tmp_path / "chunks" / "shard-00001" / "tokens.npy").exists()
    assert "shard-00001.done.json" not in [p.name for p in done]
  else:
    assert len(done) == 1
  markers = {p.name: p.stat().st_mtime_ns for p in done}
  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert {p: (tmp_path / "chunks" / p).stat().st_mtime_ns for p in markers} == markers
  want, got = _files(db / "chunks"), _files(tmp_path / "chunks")
  assert list(got) == list(want)
  for name in want:
    assert got[name] == want[name], name


def test_shard_by_shard_and_finalize(db, tok, tmp_path):
  out = tmp_path / "chunks"
  # Shards written one at a time (as the Beam build's elements are), in any order.
  stats = corpus.CorpusStats()
  all_docs = corpus.read_documents(SPEC, stats)
  num = -(-len(all_docs) // DOCS_PER_SHARD)
  settings = cs.store_settings(tok, SPEC, docs_per_shard=DOCS_PER_SHARD, heldout_fraction=0.1)
  for s in (3, 0):
    assert cs.write_store_shard(out, s, all_docs, tok, settings,
                                {**stats.to_json(), "num_store_shards": num})
  with pytest.raises(cs.ChunkStoreError, match="not done"):
    cs.finalize_chunk_store(out)
  res = cs.build_chunk_store(SPEC, out, tok, docs_per_shard=DOCS_PER_SHARD, heldout_fraction=0.1,
                             progress=False)
  assert res["written"] == [1, 2] and res["skipped"] == [0, 3]
  cs.finalize_chunk_store(out)
  cs.finalize_chunk_store(out)  # Idempotent: the manifest is replaced, not refused.
  assert _files(out) == _files(db / "chunks")
  with pytest.raises(cs.ChunkStoreError, match="other settings"):
    cs.build_chunk_store(SPEC, out, tok, chunk_size=32, docs_per_shard=DOCS_PER_SHARD,
                         heldout_fraction=0.1, progress=False)


def test_bad_inputs_skipped_and_counted(tok, tmp_path, docs):
  src = tmp_path / "corpus"
  (src / "sub").mkdir(parents=True)
  (src / "a_real.txt").write_text(docs[0].text)
  (src / "b_empty.txt").write_bytes(b"")
  (src / "c_blank.txt").write_bytes(b"  \n\n ")
  (src / "d_binary.bin").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)))
  (src / "e_latin1.txt").write_bytes("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 ".encode("latin-1") * 3)
  (src / "sub" / "f_short.txt").write_text("A short document.")
  out = tmp_path / "store"
  cs.build_chunk_store(str(src), out, tok, docs_per_shard=2, heldout_fraction=0.0, progress=False)
  store = cs.ChunkStore.open(out)
  bad = store.manifest["corpus"]["bad_input"]
  assert bad["documents"] == 3
  assert bad["skipped_empty"] == 2 and bad["skipped_empty_keys"] == ["b_empty.txt", "c_blank.txt"]
  assert bad["skipped_binary"] == 1 and bad["skipped_binary_keys"] == ["d_binary.bin"]
  assert bad["invalid_utf8_replaced"] == 1 and bad["invalid_utf8_keys"] == ["e_latin1.txt"]
  assert [store.doc_key(i) for i in range(3)] == ["a_real.txt", "e_latin1.txt", "sub/f_short.txt"]
  assert "\ufffd" in "".join(store.chunk_text(np.arange(*store.doc_range(1)), tok))
  # A document shorter than a chunk: one chunk, padded after its EOS; counted in the manifest.
  assert store.doc_range(2)[1] - store.doc_range(2)[0] == 1
  row = store.tokens(np.array([store.doc_range(2)[0]]))[0]
  n = len(tok.encode("A short document."))
  assert row[n] == tok.eos_id and (row[n + 1:] == tok.pad_id).all()
  assert store.manifest["docs_shorter_than_chunk"] >= 1
  assert store.chunk_text(np.array([store.doc_range(2)[0]]), tok) == ["A short document."]


def test_corpus_spec_errors(tmp_path):
  with pytest.raises(corpus.CorpusError, match="neither"):
    list(corpus.iter_documents(str(tmp_path / "nope")))
  with pytest.raises(corpus.CorpusError, match="the split goes in the options"):
    list(corpus.iter_documents("tfds:c4/en:train"))  # the old tfds:NAME:SPLIT form
  (tmp_path / "empty").mkdir()
  with pytest.raises(corpus.CorpusError, match="no files"):
    list(corpus.iter_documents(str(tmp_path / "empty")))
  blank = tmp_path / "blank.jsonl"
  blank.write_text('{"text": ""}\n{"text": "  "}\n')
  with pytest.raises(corpus.CorpusError, match="no usable document.*2 empty"):
    corpus.read_documents(str(blank))
  twice = tmp_path / "twice.jsonl"
  twice.write_text('{"text": "a", "id": "k"}\n{"text": "b", "id": "k"}\n')
  with pytest.raises(corpus.CorpusError, match="duplicate document keys"):
    corpus.read_documents(str(twice))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(corpus.CorpusError, match="bad.jsonl:2"):
    list(corpus.iter_documents(str(bad)))
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "one", "id": "x"}\n{"text": ""}\n{"text": "two"}\n')
  stats = corpus.CorpusStats()
  got = list(corpus.iter_documents(str(good), stats))
  assert [(d.key, d.text) for d in got] == [("x", "one"), ("line000000003", "two")]
  assert stats.skipped_empty == 1


def test_wrong_tokenizer_is_refused(store, db, tmp_path, docs):
  other = tokenizer_lib.train_sentencepiece((d.text for d in docs[:20]), tmp_path / "o.model",
                                            vocab_size=500)
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match="DB/tokenizer/spm.model"):
    store.check(other)
  with pytest.raises(tokenizer_lib.TokenizerMismatchError):
    prepare.build_tokenizer(SPEC, db, tokenizer_path=str(tmp_path / "o.model"))


def test_corrupt_and_missing_shard_files(db, tok, tmp_path):
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  path = copy / "chunks" / "shard-00002" / "tokens.npy"
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))
  store = cs.ChunkStore.open(copy)
  with pytest.raises(cs.ChunkStoreError, match="shard-00002/tokens.npy is corrupt"):
    store.check(tok)
  (copy / "chunks" / "shard-00001" / "doc_ids.npy").unlink()
  store = cs.ChunkStore.open(copy)  # opening reads manifest.json only; the first read checks
  with pytest.raises(cs.ChunkStoreError, match="shard-00001/doc_ids.npy is missing"):
    store.doc_ids([store.shard_span(1)[1]])
  (copy / "chunks" / cs.MANIFEST).unlink()
  with pytest.raises(cs.ChunkStoreError, match="no chunk store manifest"):
    cs.ChunkStore.open(copy)
  # Rerunning the chunking repairs the damaged shards (their checksums no longer match).
  cs.build_chunk_store(SPEC, copy / "chunks", tok, docs_per_shard=DOCS_PER_SHARD,
                       heldout_fraction=0.1, progress=False)
  cs.ChunkStore.open(copy).check(tok)
  assert _files(copy / "chunks") == _files(db / "chunks")


def test_two_kernel_versions_are_different_documents(monkeypatch):
  """`kernel612` keys carry the version, so the same file of both versions is two documents; the
  duplication corpus joins them (read here from the test corpus, never the installed docs)."""
  for name in ("KERNEL_DOCS", "KERNEL612_DOCS"):
    monkeypatch.setattr(corpus, f"{name}_ROOT", corpus_path.KERNEL_DIR)
    monkeypatch.setattr(corpus, f"{name}_GLOB", corpus_path.KERNEL_DIR + "/**/*.rst.txt")
  monkeypatch.setattr(corpus, "DUP_SPEC", f"kernel:limit=3+kernel612:limit=3+"
                      f"{corpus_path.WIKI_JSONL}:limit=2")
  old = corpus.read_documents("kernel:limit=3")
  new = corpus.read_documents("kernel612:limit=3")
  assert [d.key.removeprefix("linux-doc:") for d in old] == \
      [d.key.removeprefix("linux-doc-6.12:") for d in new]
  assert all(d.key.startswith("linux-doc-6.12:") for d in new)
  assert [d.text for d in old] == [d.text for d in new]
  dup = corpus.read_documents("dup")  # unique keys: read_documents checks
  assert [d.key for d in dup[:6]] == [d.key for d in old + new] and len(dup) == 8


# ------------------------------------------------------------------------------------------------
# Format 3: one record per shard, an offsets array, block checksums.


def _small_blocks(store_dir: pathlib.Path, shard: int, block_rows: int) -> None:
  """Rewrites shard `shard`'s record with checksums of `block_rows`-row blocks, computed from its
  files (the tiny shards hold fewer rows than one default block)."""
  path = cs.record_path(store_dir, shard)
  rec = json.loads(path.read_text())
  for name in cs.BLOCK_FILES:
    rec["files"][name].update(block_rows=block_rows, block_sha256=verify.file_block_digests(
        store_dir / rec["path"] / name, block_rows))
  path.write_text(json.dumps(rec))


def test_a_damaged_block_fails_only_the_reads_that_touch_it(db, tmp_path):
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  chunks = copy / "chunks"
  _small_blocks(chunks, 1, 8)
  _, first, count = cs.ChunkStore.open(copy).shard_span(1)
  assert count > 24
  want = cs.ChunkStore.open(db).tokens(np.arange(first, first + count))
  path = chunks / "shard-00001" / "tokens.npy"
  arr = np.load(path, mmap_mode="r+")
  arr[17] = arr[16]  # valid token ids, other content: only the checksum of rows 16..23 can tell
  arr.flush()
  del arr
  store = cs.ChunkStore.open(copy)
  ok = np.r_[first:first + 16, first + 24:first + count]
  np.testing.assert_array_equal(store.tokens(ok), want[ok - first])
  with pytest.raises(cs.ChunkStoreError, match=r"shard-00001/tokens.npy is damaged: rows 16\.\.23"):
    store.tokens([first + 20])  # row 20 itself is intact: its block is not
  with pytest.raises(cs.ChunkStoreError, match="tokens.npy is damaged: rows 16"):
    cs.ChunkStore.open(copy).shard_tokens(1)  # a whole-shard read checks every block
  with pytest.raises(cs.ChunkStoreError, match="shard-00001/tokens.npy is corrupt"):
    store.check()  # the audit: every file's whole checksum


def test_reading_a_shard_reads_its_own_record_only(db, tmp_path):
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  chunks = copy / "chunks"
  manifest = json.loads((chunks / cs.MANIFEST).read_text())
  assert manifest["format_version"] == cs.FORMAT_VERSION and "shards" not in manifest
  assert not (chunks / cs.SHARDS).exists()
  want = cs.ChunkStore.open(db)
  _, first, count = want.shard_span(2)
  for s in (0, 1, 3):  # every other shard's record gone: shard 2 still reads
    cs.record_path(chunks, s).unlink()
  store = cs.ChunkStore.open(copy)
  ids = np.arange(first, first + count)
  np.testing.assert_array_equal(store.tokens(ids), want.tokens(ids))
  np.testing.assert_array_equal(store.doc_ids(ids), want.doc_ids(ids))
  doc = int(want.doc_ids([first])[0])
  assert store.doc_range(doc) == want.doc_range(doc)
  assert store.doc_key(doc) == want.doc_key(doc)
  with pytest.raises(cs.ChunkStoreError, match="shard-00001.json is missing"):
    store.tokens([first - 1])


def test_a_record_that_disagrees_with_the_offsets_is_refused(db, tmp_path):
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  path = cs.record_path(copy / "chunks", 1)
  rec = json.loads(path.read_text())
  rec["num_chunks"] -= 1
  path.write_text(json.dumps(rec))
  store = cs.ChunkStore.open(copy)
  store.tokens([0])  # shard 0: fine
  with pytest.raises(cs.ChunkStoreError, match="shard 1's record .* the manifest is damaged"):
    store.tokens([store.shard_span(1)[1]])


def test_bisect_rows_matches_searchsorted(tmp_path):
  rng = np.random.default_rng(0)
  starts = np.concatenate([[0], np.cumsum(rng.integers(0, 5, 999))]).astype(np.int64)
  off = np.stack([starts, starts * 3], axis=1)
  np.save(tmp_path / "off.npy", off)
  arr = npy_rows.open_rows(tmp_path / "off.npy")
  values = rng.integers(0, starts[-1], 500)
  for col in (0, 1):
    got = npy_rows.bisect_rows(arr, col, values * (3 if col else 1), len(off) - 1)
    np.testing.assert_array_equal(got, np.searchsorted(off[:, col], values * (3 if col else 1),
                                                       side="right") - 1)


def test_stores_of_formats_1_and_2_still_read_and_finalize_upgrades_them(db, tmp_path):
  want = cs.ChunkStore.open(db)
  ids = np.arange(want.num_chunks)
  records = list(want.manifest["shards"])
  old = [{**r, "files": {n: {k: v for k, v in f.items() if not k.startswith("block")}
                         for n, f in r["files"].items()}} for r in records]
  top = {k: v for k, v in json.loads((db / "chunks" / cs.MANIFEST).read_text()).items()
         if k not in ("records_dir", "offsets_file")}
  held = json.loads((db / "chunks" / cs.HELDOUT).read_text())
  for version in (1, 2):
    copy = tmp_path / f"v{version}"
    shutil.copytree(db, copy)
    chunks = copy / "chunks"
    shutil.rmtree(chunks / cs.RECORDS)
    (chunks / cs.OFFSETS).unlink()
    if version == 1:
      m = {**top, "format_version": 1, "shards": old, "heldout": {**top["heldout"], **held}}
      (chunks / cs.HELDOUT).unlink()
    else:
      m = {**top, "format_version": 2, "shards_file": cs.SHARDS}
      (chunks / cs.SHARDS).write_text(json.dumps(old))
    (chunks / cs.MANIFEST).write_text(json.dumps(m))
    for s in range(len(old)):  # done markers as written before block checksums
      marker_path = chunks / f"shard-{s:05d}.done.json"
      marker = json.loads(marker_path.read_text())
      marker["files"] = old[s]["files"]
      marker_path.write_text(json.dumps(marker))
    store = cs.ChunkStore.open(copy)
    np.testing.assert_array_equal(store.tokens(ids), want.tokens(ids))
    np.testing.assert_array_equal(store.doc_rows([0, 5]), want.doc_rows([0, 5]))
    assert store.shard_spans() == want.shard_spans()
    np.testing.assert_array_equal(store.heldout_doc_ids, want.heldout_doc_ids)
    # The upgrade (`build_db --stages=finalize` reruns on an older format): block checksums
    # computed from the files.
    build_stages.build(copy, stages=("finalize",))
    assert list(cs.ChunkStore.open(copy).manifest["shards"]) == records
    assert not (chunks / cs.SHARDS).exists()
