"""A chunk store built with SmolLM2's byte-level BPE (`--tokenizer=smollm2`) on a real corpus slice:
the manifest records the tokenizer, documents round-trip, another tokenizer is refused."""
import numpy as np
import pytest

import corpus_path  # tests/corpus_path.py
from retro_jax.db import bpe_tokenizer, corpus, layout, prepare
from retro_jax.db import chunk_store as cs
from retro_jax.db import tokenizer as tokenizer_lib

SPEC = corpus_path.spec(kernel=10, wiki=20)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  out = tmp_path_factory.mktemp("smollm2_db")
  prepare.prepare(SPEC, str(out), docs_per_shard=10, heldout_fraction=0.1,
                  tokenizer_path="smollm2")
  return out


@pytest.fixture(scope="module")
def tok():
  return bpe_tokenizer.BPETokenizer.named("smollm2")


@pytest.fixture(scope="module")
def other(tok):
  spec = dict(tok.spec, merges=tok.spec["merges"][:-1])  # same vocabulary, one merge fewer
  return bpe_tokenizer.BPETokenizer(spec)


def test_manifest_records_the_bpe_tokenizer(db, tok):
  assert (db / layout.BPE_TOKENIZER_PATH).exists() and not (db / layout.TOKENIZER_PATH).exists()
  loaded = prepare.load_db_tokenizer(db)
  assert isinstance(loaded, bpe_tokenizer.BPETokenizer)
  assert loaded.fingerprint == tok.fingerprint
  store = cs.ChunkStore.open(db)
  assert store.manifest["tokenizer"] == tok.info()
  assert store.manifest["tokenizer"]["kind"] == "bpe" and store.pad_id == 0
  assert store.manifest["num_docs"] == 30 and len(store.manifest["shards"]) == 3
  store.check(loaded)


def test_documents_round_trip_and_end_with_eos(db, tok):
  store = cs.ChunkStore.open(db)
  docs = list(corpus.iter_documents(SPEC))
  table = []  # (doc id, global id of its first chunk, its number of chunks)
  for shard in store.manifest["shards"]:
    doc_table = np.load(db / "chunks" / shard["path"] / "doc_table.npy")
    table += [(d, shard["first_chunk_id"] + row, n) for d, row, n, _, _ in doc_table]
  for doc_id, first, n in table[::7]:
    rows = store.tokens(np.arange(first, first + n))
    flat = rows.reshape(-1)
    ids = np.trim_zeros(flat, "b")  # EOS = pad = 0 close the document
    assert (flat[len(ids):] == tok.eos_id).all() and len(flat) > len(ids)
    assert ids.tolist() == tok.encode(docs[doc_id].text)
    assert tok.decode(ids) == docs[doc_id].text


def test_another_tokenizer_is_refused(db, other, tmp_path):
  store = cs.ChunkStore.open(db)
  with pytest.raises(tokenizer_lib.TokenizerMismatchError):
    store.check(other)
  with pytest.raises(cs.ChunkStoreError, match="other settings"):
    cs.build_chunk_store(SPEC, db / layout.CHUNKS_DIR, other, docs_per_shard=10,
                         heldout_fraction=0.1)
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match="BPE tokenizer"):
    prepare.build_tokenizer(SPEC, db)  # SentencePiece asked for, the database has a BPE
  other.save(tmp_path / "other.json")
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match="another tokenizer"):
    prepare.build_tokenizer(SPEC, db, tokenizer_path=str(tmp_path / "other.json"))


def test_fingerprint_is_the_same_from_gguf_and_from_the_saved_file(db, tok, other):
  assert bpe_tokenizer.BPETokenizer.load(db / layout.BPE_TOKENIZER_PATH).fingerprint == tok.fingerprint
  assert other.fingerprint != tok.fingerprint
  with pytest.raises(bpe_tokenizer.BPETokenizerError, match="unknown pretrained tokenizer"):
    bpe_tokenizer.BPETokenizer.named("gpt5")
