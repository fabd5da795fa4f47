r"""Embedding throughput of the JAX all-MiniLM-L6-v2 embedder on real chunk texts (this CPU).

    python -m bench.embed_throughput [--num_texts=512 --rounds=3 --batch_sizes=32,64]

Texts: chunks of the default database (`runs/default_db`, `make db`; `make bench-embed` builds it
first), when its chunk store is finished, otherwise Linux kernel documentation cut into ~280-character pieces (about one 64-token SentencePiece chunk).
Settings (dtype x bucketed x batch size) alternate round by round on the same texts; chunks/s is the
median over rounds, after a warm-up that compiles every shape. Cosine is against the fp32 bucketed
result. The PyTorch reference figures on this CPU: 63.6 chunks/s fp32, 154 bf16.
Target: >= 160 chunks/s with cosine >= 0.9999 to fp32.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.common import matmul_gflops, run_provenance
from retro_jax.db import layout  # noqa: E402
from retro_jax.retrieval.embedder import Embedder  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_texts", 512, "chunk texts embedded per timed round")
flags.DEFINE_integer("rounds", 3, "timed rounds per setting (alternating)")
flags.DEFINE_list("batch_sizes", ["16"], "rows per forward call to compare ('t2048' = 2048 tokens per call)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "matmul operand dtypes to compare")
flags.DEFINE_bool("unbucketed", True, "also time padding every batch to max_length")
flags.DEFINE_string("db", "runs/default_db", "database whose chunks are used (when its chunk store "
                    "is finished)")
flags.DEFINE_string("out", "bench/results/embed_throughput.json", "where the results go")

KERNEL_DOCS = pathlib.Path("/usr/share/doc/linux-doc-6.1/html/_sources")


def kernel_doc_pieces(n: int, chars: int = 280, seed: int = 0) -> list[str]:
  files = sorted(KERNEL_DOCS.rglob("*.rst.txt"))
  if not files:
    raise FileNotFoundError(f"no *.rst.txt under {KERNEL_DOCS}: apt-get install linux-doc-6.1")
  rng = np.random.default_rng(seed)
  pieces = []
  for path in rng.choice(files, size=min(len(files), 4 * n // 10 + 20), replace=False):
    text = path.read_text(errors="replace")
    pieces.extend(text[i:i + chars] for i in range(0, len(text) - chars + 1, chars))
  return [pieces[i] for i in sorted(rng.choice(len(pieces), size=n, replace=False))]


def db_chunk_texts(db: pathlib.Path, n: int, seed: int = 0) -> list[str]:
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.db import tokenizer as tokenizer_lib
  store = chunk_store_lib.ChunkStore.open(db)
  tokenizer = tokenizer_lib.Tokenizer.load(db / "tokenizer" / "spm.model")
  ids = np.sort(np.random.default_rng(seed).choice(store.num_chunks, size=n, replace=False)).astype(np.int64)
  return list(store.chunk_text(ids, tokenizer))


def main(argv) -> None:
  del argv
  db = pathlib.Path(FLAGS.db)
  if (db / layout.CHUNKS_DIR / layout.MANIFEST).exists():  # the chunk stage's commit point
    texts, source = db_chunk_texts(db, FLAGS.num_texts), f"{db} chunks (random sample, seed 0)"
  else:
    texts, source = kernel_doc_pieces(FLAGS.num_texts), "linux-doc-6.1 pieces of 280 characters"
  settings = []
  for dtype in FLAGS.dtypes:
    for bs in FLAGS.batch_sizes:
      emb = Embedder.load(max_length=128, dtype=dtype, batch_size=int(bs.lstrip("t")),
                          tokens_per_batch=int(bs[1:]) if bs.startswith("t") else None)
      for bucketed in ([True, False] if FLAGS.unbucketed else [True]):
        settings.append({"dtype": dtype, "batch_size": bs, "bucketed": bucketed, "embedder": emb})
  lengths = np.array([len(x) for x in settings[0]["embedder"].tokenize(texts)])
  print(f"{len(texts)} texts from {source}; WordPiece tokens mean {lengths.mean():.1f}, "
        f"{(lengths >= 128).mean():.1%} truncated at 128")
  results = {}
  for s in settings:  # warm-up: compiles every bucket shape
    t0 = time.perf_counter()
    s["out"] = s["embedder"].embed(texts, bucketed=s["bucketed"])
    s["warmup_s"] = time.perf_counter() - t0
    s["times"] = []
  for r in range(FLAGS.rounds):
    for s in settings:
      t0 = time.perf_counter()
      s["embedder"].embed(texts, bucketed=s["bucketed"])
      s["times"].append(time.perf_counter() - t0)
    print(f"round {r}: " + ", ".join(f"{len(texts) / s['times'][-1]:.1f}" for s in settings))
  ref = next(s["out"] for s in settings if s["dtype"] == "float32" and s["bucketed"]) \
      if "float32" in FLAGS.dtypes else None
  for s in settings:
    name = f"{s['dtype']}_bs{s['batch_size']}_{'bucketed' if s['bucketed'] else 'padded128'}"
    row = {"chunks_per_s": len(texts) / statistics.median(s["times"]),
           "chunks_per_s_rounds": [round(len(texts) / t, 2) for t in s["times"]],
           "warmup_incl_compile_s": round(s["warmup_s"], 2)}
    if ref is not None:
      row["min_cosine_to_fp32"] = float(np.min(np.sum(s["out"] * ref, axis=1)))
    results[name] = row
    print(f"{name:32s} {row['chunks_per_s']:8.1f} chunks/s  min cos {row.get('min_cosine_to_fp32', float('nan')):.6f}")
  report = {
      "benchmark": "embed_throughput", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "texts": source, "num_texts": len(texts), "rounds": FLAGS.rounds,
      "mean_wordpiece_tokens": float(lengths.mean()), "max_length": 128,
      "jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "load_avg_at_end": os.getloadavg(),
      "allocator_env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
      "jax_matmul_gflops_2048": {"float32": matmul_gflops(jnp.float32, reps=5), "bfloat16": matmul_gflops(jnp.bfloat16, reps=5)},
      "pytorch_reference_chunks_per_s": {"float32": 63.6, "bf16_autocast": 154.0},
      "target": ">= 160 chunks/s with min cosine >= 0.9999 to fp32",
      "results": results,
  }
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  report["provenance"] = run_provenance("bench.embed_throughput")
  out.write_text(json.dumps(report, indent=1))
  print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))


if __name__ == "__main__":
  app.run(main)
