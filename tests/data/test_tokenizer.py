"""SentencePiece training and loading on real text (the fixed test corpus, tests/data/corpus)."""
import numpy as np
import pytest

import corpus_path  # tests/corpus_path.py
from retro_jax.db import corpus
from retro_jax.db import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def texts():
  return [d.text for d in corpus.iter_documents(corpus_path.spec(kernel=15, wiki=30))]


def test_train_load_round_trip_and_determinism(texts, tmp_path):
  a = tokenizer_lib.train_sentencepiece(texts, tmp_path / "a" / "spm.model", vocab_size=800, seed=3)
  b = tokenizer_lib.train_sentencepiece(texts, tmp_path / "b" / "spm.model", vocab_size=800, seed=3)
  assert a.fingerprint == b.fingerprint  # Same corpus and seed -> same model bytes.
  assert not list(tmp_path.glob("*/*.tmp"))
  loaded = tokenizer_lib.Tokenizer.load(tmp_path / "a" / "spm.model")
  assert isinstance(loaded, tokenizer_lib.TokenizerProtocol)
  assert loaded.fingerprint == a.fingerprint and len(loaded.fingerprint) == 64
  assert (loaded.vocab_size, loaded.pad_id, loaded.eos_id) == (800, 0, 2)
  for text in texts:  # Identity normalisation + byte fallback: exact round trip, newlines kept.
    ids = loaded.encode(text)
    assert 0 not in ids and loaded.decode(ids) == text
  assert loaded.encode_batch(texts[:3]) == [loaded.encode(t) for t in texts[:3]]
  # Fragments cut anywhere (between whole characters) concatenate back to the text.
  text = texts[0][:3000]
  ids = loaded.encode(text)
  cuts = sorted(np.random.default_rng(0).choice(np.arange(1, len(ids)), 20, replace=False))
  parts = [loaded.decode(ids[:cuts[0]])] + [
      loaded.decode_fragment(ids[i:j]) for i, j in zip(cuts, cuts[1:] + [len(ids)])]
  assert "".join(parts) == text or "\ufffd" in "".join(parts)


def test_missing_model_and_mismatch(tmp_path, texts):
  with pytest.raises(FileNotFoundError, match="--tokenizer"):
    tokenizer_lib.Tokenizer.load(tmp_path / "none.model")
  tok = tokenizer_lib.train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=600)
  info = {**tok.info(), "fingerprint": "0" * 64}
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match="test store"):
    tokenizer_lib.check_tokenizer(tok, info, "test store")
  tokenizer_lib.check_tokenizer(tok, tok.info(), "test store")
