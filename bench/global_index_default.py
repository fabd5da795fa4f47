r"""The global index vs today's per-shard faiss index on the default store, side by side in one run.

  python -m bench.global_index_default --db=COPY_OF/runs/default_db

End to end as users and the neighbours stage see it: `Retriever.search` with the same-document
exclusion (every shard, rescoring, merge), `--num_queries` stored chunks as queries (fixed seed),
k=10, `--threads` threads. recall@10 is tie-aware (a returned chunk counts when its exact float32
score reaches the exact 10th score of the query's non-own-document chunks) against exact search
with the same exclusion. Also timed: the raw index calls alone (per-shard faiss `index.search` on
every shard; `GlobalIndex.search`: route, scan, int8 rerank, merge), without the exclusion.
Every setting is timed once per round, rounds alternate, medians of `--repeats` are reported (the
machine is shared: compare within a run). Builds DB/index/global (and today's DB/index/faiss)
first if missing (the database is modified: pass a copy). Writes bench/results/global_index_default.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from retro_jax.db import layout  # noqa: E402
from retro_jax.db.chunk_store import ChunkStore  # noqa: E402
from retro_jax.retrieval import build_index as build_index_lib  # noqa: E402
from retro_jax.retrieval import global_index as global_lib  # noqa: E402
from retro_jax.retrieval import index as index_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from bench.common import run_provenance  # noqa: E402

_DB = flags.DEFINE_string("db", None, "A copy of the default store (DB/index/global is added).")
_NQ = flags.DEFINE_integer("num_queries", 2000, "Stored chunks used as queries.")
_THREADS = flags.DEFINE_integer("threads", 2, "Search threads (faiss OpenMP).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median).")
_NPROBE = flags.DEFINE_list("nprobe", ["8", "16", "24", "32", "48"], "Global index nprobe values.")
_OUT = flags.DEFINE_string("out", "bench/results/global_index_default.json", "Results file.")
K = 10


def exact_reference(db_NxD, doc_N, queries_QxD, own_Q, k):
  """Exact top-k scores per query among chunks of other documents (float32, blocked)."""
  ref = np.empty((len(queries_QxD), k), np.float32)
  for a in range(0, len(queries_QxD), 250):
    s = queries_QxD[a:a + 250] @ db_NxD.T
    s[doc_N[None, :] == own_Q[a:a + 250, None]] = -np.inf
    ref[a:a + 250] = -np.sort(-s, axis=1)[:, :k]
  return ref


def tie_aware_recall(ids_QxK, queries_QxD, db_NxD, doc_N, own_Q, ref_QxK, eps=1e-5):
  ok = ids_QxK >= 0
  true = np.einsum("qd,qkd->qk", queries_QxD, db_NxD[np.maximum(ids_QxK, 0)])
  hit = ok & (true >= ref_QxK[:, -1:] - eps) & (doc_N[np.maximum(ids_QxK, 0)] != own_Q[:, None])
  return float(np.mean(np.minimum(hit.sum(1), ids_QxK.shape[1]) / ids_QxK.shape[1]))


def main(argv):
  del argv
  faiss.omp_set_num_threads(_THREADS.value)
  db = _DB.value
  store = ChunkStore.open(db)
  paths = retriever_lib.embedding_paths(db)
  db_NxD = np.concatenate([np.load(p) for p in paths]).astype(np.float32)
  doc_N = store.doc_ids(np.arange(len(db_NxD)))
  n = len(db_NxD)
  t0 = time.perf_counter()
  built_now = not global_lib.is_built(global_lib.index_dir(db),
                                      retriever_lib.db_global_sources(db))
  manifest = build_index_lib.build_global_index(db)
  build_s = time.perf_counter() - t0 if built_now else manifest["build_seconds"]["total"]
  if not build_index_lib.shard_is_done(  # today's per-shard faiss index, built if missing
      str(layout.index_shard_dir(layout.index_dir(db, "faiss"), 0)),
      index_lib.IndexConfig(backend="faiss"), 0):
    build_index_lib.build_index(db, index_lib.IndexConfig(backend="faiss"))
  rng = np.random.default_rng(0)
  qids = np.sort(rng.choice(n, _NQ.value, replace=False))
  queries_QxD = db_NxD[qids]
  own_Q = doc_N[qids]
  ref_QxK = exact_reference(db_NxD, doc_N, queries_QxD, own_Q, K)

  today = retriever_lib.Retriever.from_db(db, "faiss", doc_ids=store.doc_ids)
  settings = {"today per-shard faiss (end to end)":
              lambda: today.search(queries_QxD, K, own_Q)[0],
              "today per-shard faiss (raw index calls)":
              lambda: [s.search(queries_QxD, K) for s in today.shards][0][0]}
  globals_ = {}
  for npb in [int(x) for x in _NPROBE.value]:
    r = retriever_lib.Retriever.from_db(db, "global", doc_ids=store.doc_ids,
                                        config_overrides={"nprobe": npb})
    globals_[npb] = r
    settings[f"global nprobe={npb} (end to end)"] = (
        lambda r=r: r.search(queries_QxD, K, own_Q)[0])
    settings[f"global nprobe={npb} (raw index call)"] = (
        lambda r=r: r.shards[0].search(queries_QxD, K)[0])
  times = {name: [] for name in settings}
  results = {}
  for name, fn in settings.items():  # warm-up, and the answers for recall
    results[name] = fn()
  for _ in range(_REPEATS.value):
    for name, fn in settings.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  rows = {}
  for name in settings:
    qps = len(qids) / statistics.median(times[name])
    row = {"qps": qps}
    if "end to end" in name:
      row["recall@10"] = tie_aware_recall(np.asarray(results[name]), queries_QxD, db_NxD, doc_N,
                                          own_Q, ref_QxK)
    rows[name] = row
    print(f"{name:45s} {qps:9.0f} q/s" + (f"  recall@10 {row['recall@10']:.4f}"
                                           if "recall@10" in row else ""), flush=True)
  g = globals_[int(_NPROBE.value[0])].shards[0]
  base = rows["today per-shard faiss (end to end)"]["qps"]
  for npb in globals_:
    e2e = rows[f"global nprobe={npb} (end to end)"]
    e2e["qps_vs_today"] = e2e["qps"] / base
    e2e["e2e_vs_raw_qps"] = e2e["qps"] / rows[f"global nprobe={npb} (raw index call)"]["qps"]
  # The top files (trained quantizer, scale) and each serving shard's files, by their records.
  serving = [global_lib.read_serving_record(global_lib.index_dir(db), s)
             for s in global_lib.serving_shard_ids(manifest)]
  index_bytes = {f: r["bytes"] for f, r in manifest["files"].items()}
  index_bytes.update({f"serving/{r['shard']}/{f}": v["bytes"] for r in serving
                      for f, v in r["files"].items()})
  report = {
      "db": db, "num_vectors": n, "num_queries": int(len(qids)), "k": K,
      "threads": _THREADS.value, "repeats": _REPEATS.value,
      "recall": "tie-aware recall@10 vs exact float32 search, own document excluded",
      "global_index": {
          "factory": manifest["factory"], "config": manifest["config"],
          "build_seconds": build_s, "build_phases_seconds": manifest["build_seconds"],
          "encode_vectors_per_second": n / manifest["build_seconds"]["encode"],
          "build_threads": manifest["config"]["training_threads"],
          "ram_bytes_per_vector": g.memory_bytes() / n,
          "disk_bytes_per_vector": sum(index_bytes.values()) / n,
          "rerank_int8_bytes_per_vector": sum(v for f, v in index_bytes.items()
                                              if f.endswith("/rerank")) / n,
          "serving_shards": [{k: r[k] for k in ("shard", "part_start", "part_end", "count",
                                                "ram_bytes")} for r in serving]},
      "today": {"index_shards": len(today.shards), "factory": today.shards[0].config.faiss_factory,
                "nprobe": today.shards[0].config.faiss_nprobe,
                "k_factor": today.shards[0].config.faiss_k_factor},
      "results": rows,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared "
                 "with other jobs (compare within this run)",
      "date_utc": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  report["provenance"] = run_provenance("bench.global_index_default")
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("db")
  app.run(main)
