r"""The 28-billion-chunk build in 24 hours, costed from the rates measured here.

  python -m bench.cost_model [--db=runs/default_db]

Reads the measured rates (each figure of the table names its source):
  bench/results/build_db_default.json   the default database's build: chunk and embed stage times
  bench/results/embed_aot.json          the embedder compiled for a TPU v5e topology: FLOPs/chunk
  bench/results/global_index_default.json  the global index on the default store: end-to-end
                                        queries/s (the neighbours stage's search), bytes/vector
  bench/results/global_index_scaling.json  encode vectors/s and QPS up to 10M vectors
and the default database's files (`--db`) for the bytes per chunk on disk. Writes the table to
stdout (Markdown, pasted into WORKSPACE.md) and bench/results/cost_model_28b.json.

Schedule: the chunk, embed and encode stages stream shard by shard in the first `--stream_hours`
(the index is trained on a sample embedded first); the neighbours stage searches the finished
index in the remaining hours. Worker counts are what finishes each stage in its window at the
measured per-core (or per-chip) rate, with no allowance for stragglers.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

_DB = flags.DEFINE_string("db", "runs/default_db", "A built default database (bytes per chunk).")
_CHUNKS = flags.DEFINE_float("chunks", 28e9, "Chunks in the database (the paper: 2T tokens / 64).")
_HOURS = flags.DEFINE_float("hours", 24.0, "The whole build's budget.")
_STREAM = flags.DEFINE_float("stream_hours", 12.0, "Hours for chunk + embed + encode.")
_RESULTS = flags.DEFINE_string("results", "bench/results", "Measured results.")
_OUT = flags.DEFINE_string("out", "bench/results/cost_model_28b.json", "Output JSON.")


def _load(name):
  with open(os.path.join(_RESULTS.value, name)) as f:
    return json.load(f)


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv):
  del argv
  n = _CHUNKS.value
  build = _load("build_db_default.json")
  aot = _load("embed_aot.json")
  default = _load("global_index_default.json")
  scaling = _load("global_index_scaling.json")
  cores_here = 2
  db_chunks = default["num_vectors"]
  stages = build["stages"]
  stream_s = _STREAM.value * 3600
  search_s = (_HOURS.value - _STREAM.value) * 3600
  rows = []

  def row(stage, rate, unit, source, window_s, per="core"):
    total = n / rate  # unit-seconds
    rows.append({"stage": stage, "measured_rate": rate, "rate_unit": unit, "source": source,
                 f"{per}_hours": total / 3600, "window_hours": window_s / 3600,
                 "workers": math.ceil(total / window_s), "worker": per})

  chunk_rate = db_chunks / stages["chunks"]["build_seconds"]  # one process
  row("tokenise + chunk", chunk_rate, "chunks/s per core (one process)",
      "build_db_default.json: 60,473 chunks / chunks stage seconds", stream_s)
  embed_cpu = db_chunks / stages["embeddings"]["build_seconds"] / cores_here
  row("embed (CPU, MiniLM bf16)", embed_cpu, "chunks/s per core",
      "build_db_default.json: 60,473 chunks / embeddings stage seconds / 2 cores", stream_s)
  row(f"embed (TPU v5e, MFU {aot['assumed_mfu']})", aot["chunks_per_s_per_chip"],
      "chunks/s per chip", "embed_aot.json: 197 TFLOP/s x MFU / XLA FLOPs per chunk "
      f"({aot['xla_flops_per_chunk']:.3g})", stream_s, per="chip")
  big = scaling["sizes"][-1]
  gi = default["global_index"]
  enc = gi["encode_vectors_per_second"] / gi["build_threads"]
  row("encode (assign + PQ + int8 copy)", enc, "vectors/s per core",
      f"global_index_default.json: {db_chunks:,} vectors / encode seconds "
      f"({gi['build_phases_seconds']['encode']:.2f} s, {gi['build_threads']} thread)", stream_s)
  g = min((v for k, v in default["results"].items() if k.startswith("global") and
           "end to end" in k and v["recall@10"] >= 0.95), key=lambda v: -v["qps"], default=None)
  best = big["best_at_recall_0.9"] or {}
  first = scaling["sizes"][0]["best_at_recall_0.9"] or {}
  slow = (first.get("qps", 0) / best["qps"]) if best.get("qps") else float("nan")
  e2e_60k = g["qps"] / default["threads"]
  nb_rate = e2e_60k / slow if slow == slow else e2e_60k
  row("neighbours (k=2, end to end)", nb_rate, "queries/s per core",
      "global_index_default.json end-to-end QPS at recall@10 >= 0.95 / 2 threads, divided by the "
      f"scaling run's QPS drop from {scaling['sizes'][0]['num_vectors']:,} to "
      f"{big['num_vectors']:,} vectors ({slow:.2f}x), held flat beyond", search_s)

  # Pessimistic: partitions keep growing as sqrt(N) (nlist ~ 2 sqrt(N)) at a fixed nprobe, so the
  # codes scanned per query grow as sqrt(N / 10M) from the largest measured size.
  grow = math.sqrt(n / big["num_vectors"])
  row("neighbours, if per-query work grows as sqrt(N)", nb_rate / grow, "queries/s per core",
      f"the row above / sqrt(28e9 / {big['num_vectors']:,}) = / {grow:.0f}", search_s)
  ram_vec = big["ram_bytes_per_vector"]
  db = _DB.value
  chunk_b = _dir_bytes(os.path.join(db, "chunks")) / db_chunks if os.path.isdir(db) else 276.0
  storage = {
      "chunk store (tokens int32 + doc tables)": chunk_b,
      "embeddings float32 (build intermediate)": 384 * 4,
      "index: PQ codes + ids (RAM when served)": ram_vec,
      "index: int8 rerank copy (disk)": 384,
      "training neighbours (k=2, int64)": 16,
  }
  storage_tb = {k: v * n / 1e12 for k, v in storage.items()}
  out = {"chunks": n, "hours": _HOURS.value, "stream_hours": _STREAM.value, "stages": rows,
         "bytes_per_chunk": storage, "storage_tb": storage_tb,
         "serving_ram_tb": ram_vec * n / 1e12,
         "serving_hosts_256gb": math.ceil(ram_vec * n / (256e9 * 0.8)),
         "sources": {"ram_bytes_per_vector": f"global_index_scaling.json at "
                                             f"{big['num_vectors']:,} vectors",
                     "chunk_bytes": f"{db}/chunks/ / {db_chunks} chunks"}}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print("| stage | measured rate | from | worker-hours | window | workers |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['stage']} | {r['measured_rate']:,.0f} {r['rate_unit']} | {r['source']} | "
          f"{r[r['worker'] + '_hours']:,.0f} {r['worker']}-h | {r['window_hours']:.0f} h | "
          f"{r['workers']:,} {r['worker']}s |")
  print()
  print("| data | bytes per chunk | at 28B chunks |")
  print("|---|---|---|")
  for k, v in storage.items():
    print(f"| {k} | {v:,.0f} | {storage_tb[k]:,.1f} TB |")
  print(f"\nServing RAM: {out['serving_ram_tb']:.2f} TB = {out['serving_hosts_256gb']} hosts of "
        "256 GB at 80% use.")


if __name__ == "__main__":
  app.run(main)
