r"""A database of N synthetic chunks, in the real formats, for the index and neighbours stages.

    python -m bench.synthetic_db --db=runs/synth_10m --num_chunks=10000000

Written with the chunk store's and the embeddings stage's own writers and records, so that
`build_db --stages=index,neighbours` runs on it as on any database:

- the chunk store: documents of 20 chunks, 4,096 per store shard (the default database's shape),
  no held-out documents; each chunk's 64 tokens are a fixed pattern of its id (nothing reads them
  in the index and neighbours stages); the tokenizer is the source database's;
- the embeddings: the source database's real MiniLM vectors first (chunk i < R is real vector i),
  then noisy copies of them (chunk i copies real vector i mod R, Gaussian noise of per-dimension
  sigma `--noise`, re-normalised; the construction of bench/global_index_scaling.py), generated
  shard by shard from a generator seeded by the shard number.

Resumable: a store shard or embeddings shard already finished is kept. Nothing is held in RAM
beyond one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from absl import app, flags
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, prepare, provenance
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import retriever as retriever_lib

_DB = flags.DEFINE_string("db", "runs/synth_10m", "The database to write.")
_N = flags.DEFINE_integer("num_chunks", 10_000_000, "Chunks (and vectors).")
_SOURCE = flags.DEFINE_string("source", "runs/default_db", "A built database: its tokenizer and "
                              "embeddings are the real part.")
_NOISE = flags.DEFINE_float("noise", 0.04, "Per-dimension sigma of the noise on the copies.")

CHUNKS_PER_DOC = 20
DOCS_PER_SHARD = 4096
CHUNK_SIZE = 64
CORPUS_SPEC = "synthetic"


def _real_vectors(source: str) -> np.ndarray:
  shards = retriever_lib.db_embedding_shards(source, verify_content=False)
  return np.concatenate([np.load(str(p), mmap_mode="r") for _, p, _ in shards]).astype(np.float32)


def store_shard_span(n: int, shard: int) -> tuple[int, int]:
  """(first chunk id, chunks) of store shard `shard` of an N-chunk synthetic store."""
  per = CHUNKS_PER_DOC * DOCS_PER_SHARD
  return shard * per, max(0, min(per, n - shard * per))


def _write_store_shard(out: epath.Path, shard: int, n: int, settings: dict, stats: dict) -> None:
  first, count = store_shard_span(n, shard)
  ids = np.arange(first, first + count, dtype=np.int64)
  tokens = ((ids[:, None] * 7 + np.arange(CHUNK_SIZE)[None]) % 8000 + 3).astype(np.int32)
  docs = -(-count // CHUNKS_PER_DOC)
  doc0 = shard * DOCS_PER_SHARD
  rows = np.arange(docs, dtype=np.int64) * CHUNKS_PER_DOC
  nchunks = np.minimum(CHUNKS_PER_DOC, count - rows)
  table = np.stack([doc0 + np.arange(docs), rows, nchunks, nchunks * CHUNK_SIZE * 4,
                    np.zeros(docs, np.int64)], 1).astype(np.int64)
  payloads = {"tokens.npy": layout.npy_bytes(tokens),
              "doc_ids.npy": layout.npy_bytes(np.repeat(table[:, 0], table[:, 2])),
              "doc_table.npy": layout.npy_bytes(table),
              "doc_keys.json": json.dumps([f"synthetic:{d}" for d in table[:, 0]]).encode()}
  shard_dir = out / layout.shard_name(shard)
  shard_dir.mkdir(parents=True, exist_ok=True)
  files = {}
  for name in chunk_store_lib.SHARD_FILES:
    layout.write_bytes_atomic(shard_dir / name, payloads[name])
    files[name] = {"sha256": layout.sha256_bytes(payloads[name]), "bytes": len(payloads[name])}
  marker = {"index": shard, "settings": settings, "files": files, "num_chunks": int(count),
            "num_docs": int(docs), "num_tokens": int(count * CHUNK_SIZE),
            "docs_shorter_than_chunk": 0, "num_utf8_bytes": int(table[:, 3].sum()),
            "first_doc_id": int(doc0), "heldout_doc_ids": [],
            "heldout_doc_keys": [], "corpus_stats": stats}
  layout.write_json_atomic(out / (layout.shard_name(shard) + ".done.json"), marker)


def write_store(db: epath.Path, n: int, source: str) -> int:
  """The chunk store (finished shards kept); returns the number of store shards."""
  tok_path = db / layout.TOKENIZER_PATH
  if not tok_path.exists():
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.join(source, layout.TOKENIZER_PATH), tok_path)
  tokenizer = prepare.load_db_tokenizer(str(db))
  settings = chunk_store_lib.store_settings(tokenizer, CORPUS_SPEC, CHUNK_SIZE, DOCS_PER_SHARD,
                                            heldout_fraction=0.0)
  per = CHUNKS_PER_DOC * DOCS_PER_SHARD
  shards = -(-n // per)
  stats = {"num_store_shards": shards}
  out = db / layout.CHUNKS_DIR
  out.mkdir(parents=True, exist_ok=True)
  for s in range(shards):
    if not (out / (layout.shard_name(s) + ".done.json")).exists():
      _write_store_shard(out, s, n, settings, stats)
  if not (out / layout.MANIFEST).exists():
    chunk_store_lib.finalize_chunk_store(out)
  return shards


def write_embeddings(db: epath.Path, n: int, shards: int, real_RxD: np.ndarray, sigma: float,
                     info: dict) -> None:
  emb_dir = layout.embeddings_dir(db)
  emb_dir.mkdir(parents=True, exist_ok=True)
  layout.write_json_atomic(emb_dir / layout.EMBEDDER_INFO, info)
  r = len(real_RxD)
  for s in range(shards):
    path = layout.embeddings_path(db, s)
    if layout.is_finished(path):
      continue
    first, count = store_shard_span(n, s)
    ids = np.arange(first, first + count, dtype=np.int64)
    with layout.staged_file(path) as tmp:
      out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                      shape=(count, real_RxD.shape[1]))
      rng = np.random.default_rng([0, s])
      for a in range(0, count, 16_384):
        rows = ids[a:a + 16_384]
        x = real_RxD[rows % r].copy()
        copy = rows >= r
        if copy.any():
          y = x[copy] + rng.standard_normal((int(copy.sum()), x.shape[1]),
                                            dtype=np.float32) * sigma
          x[copy] = y / np.linalg.norm(y, axis=1, keepdims=True)
        out[a:a + len(x)] = x
      out.flush()
      del out
    embed_lib.write_finished(path, count, 4096, info["fingerprint"], info["dtype"])
    print(f"embeddings shard {s + 1}/{shards} written", flush=True)
  if provenance.write_outputs(db, "embeddings", shards) is None:
    raise RuntimeError("not every embeddings shard is finished")


def main(argv):
  del argv
  t0 = time.perf_counter()
  db = epath.Path(_DB.value)
  shards = write_store(db, _N.value, _SOURCE.value)
  print(f"chunk store: {shards} shards ({time.perf_counter() - t0:.0f} s)", flush=True)
  info = json.loads((layout.embeddings_dir(_SOURCE.value) / layout.EMBEDDER_INFO).read_text())
  write_embeddings(db, _N.value, shards, _real_vectors(_SOURCE.value), _NOISE.value, info)
  print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
