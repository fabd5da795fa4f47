r"""The global index from 200k to 10M vectors: build time, RAM and disk per vector, QPS and recall@10.

  python -m bench.global_index_scaling --embeddings='runs/default_db/embeddings/shard-*.npy' \
      [--sizes=200000,1000000,3000000,10000000 --scratch=/tmp/global_scaling]

Data: the default store's real MiniLM embeddings (60,473 x 384) first, then, beyond them, copies of
the real vectors with Gaussian noise added (per-dimension sigma `--noise`, 0.04 by default: about
0.8x the embeddings' own per-dimension standard deviation, so that a copy's cosine to another copy
of the same vector, ~0.62, is near a real vector's cosine to its nearest real neighbour, median
0.69) and re-normalised. Rows are generated block by block from a seeded generator (never the whole
database in RAM); the index is built by `retro_jax.retrieval.global_index.build` at its default
settings (training threads: `--threads`).

Per size: build seconds (train, encode), RAM bytes per vector (PQ codes in fast-scan blocks and
int64 ids: `GlobalIndex.memory_bytes()`), disk bytes per vector (index files and the int8 rerank
copy), and for a sweep of nprobe x rerank pool: QPS (`--num_queries` stored vectors as queries, one
batched `GlobalIndex.search(Q, 10)` on `--threads` threads, the best of `--repeats` calls, since
other jobs share the machine and only slow a call down; the median is kept too) and tie-aware
recall@10 against exact float32 search (streamed over the database). The headline per size is the
highest QPS among settings with recall@10 >= 0.9. Writes bench/results/global_index_scaling.json
(after every size, so a run stopped early keeps its points) and docs/global_index_scaling.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from retro_jax.retrieval import global_index as global_lib  # noqa: E402
from bench.common import run_provenance  # noqa: E402

_EMB = flags.DEFINE_string("embeddings", "runs/default_db/embeddings/shard-*.npy",
                           "Glob of the real float32 [n, D] embedding shards.")
_SIZES = flags.DEFINE_list("sizes", ["200000", "1000000", "3000000", "10000000"], "Database sizes.")
_NOISE = flags.DEFINE_float("noise", 0.04, "Per-dimension sigma of the noise on the copies.")
_NQ = flags.DEFINE_integer("num_queries", 1000, "Stored vectors used as queries.")
_THREADS = flags.DEFINE_integer("threads", 2, "Build and search threads.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (best and median reported).")
_NPROBE = flags.DEFINE_list("nprobe", ["8", "16", "32", "48", "64", "96", "128"], "nprobe sweep.")
_RERANK = flags.DEFINE_list("rerank", ["64", "96", "192"], "Rerank pool sweep.")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/global_scaling", "Where the indexes are built "
                               "(each size's is deleted after it is measured).")
_OUT = flags.DEFINE_string("out", "bench/results/global_index_scaling.json", "Results file.")
_PLOT = flags.DEFINE_string("plot", "docs/global_index_scaling.png", "Plot file.")
_MERGE = flags.DEFINE_bool("merge", True, "Keep the points of sizes not measured in this run from "
                           "an existing --out (each point records its run's date; compare QPS "
                           "only within one run).")
K = 10
BLOCK = 65_536


class NoisyCopies:
  """float32 [n, D] rows: the real vectors, then noisy re-normalised copies (row i copies real row
  i mod B), generated per block of 65,536 rows from a generator seeded by the block number."""

  def __init__(self, real_BxD: np.ndarray, n: int, sigma: float, seed: int = 0):
    self.real, self.n, self.sigma, self.seed = real_BxD, int(n), float(sigma), seed
    self.shape = (self.n, real_BxD.shape[1])
    self.dtype = np.float32

  def block(self, b: int) -> np.ndarray:
    a, e = b * BLOCK, min((b + 1) * BLOCK, self.n)
    rows = np.arange(a, e)
    x = self.real[rows % len(self.real)].copy()
    copy = rows >= len(self.real)
    if copy.any():
      rng = np.random.default_rng([self.seed, b])
      noise = rng.standard_normal((int(copy.sum()), x.shape[1]), dtype=np.float32) * self.sigma
      y = x[copy] + noise
      x[copy] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return x

  def __getitem__(self, key):
    if isinstance(key, slice):
      a, e, _ = key.indices(self.n)
      blocks = range(a // BLOCK, (max(e, a + 1) - 1) // BLOCK + 1)
      x = np.concatenate([self.block(b) for b in blocks]) if e > a else np.zeros((0, self.shape[1]))
      return x[a - blocks[0] * BLOCK:e - blocks[0] * BLOCK].astype(np.float32)
    rows = np.asarray(key, np.int64)
    out = np.empty((len(rows), self.shape[1]), np.float32)
    which = rows // BLOCK
    for b in np.unique(which):
      m = which == b
      out[m] = self.block(int(b))[rows[m] - b * BLOCK]
    return out


def as_sources(data: NoisyCopies, shard_rows: int = 1 << 20):
  """The data as embeddings shards of `shard_rows` rows (views; nothing is generated here)."""
  class View:
    def __init__(self, a, e):
      self.a, self.e = a, e
      self.shape = (e - a, data.shape[1])

    def __getitem__(self, key):
      if isinstance(key, slice):
        s, t, _ = key.indices(self.shape[0])
        return data[self.a + s:self.a + t]
      return data[np.asarray(key, np.int64) + self.a]
  return [(i, View(a, min(a + shard_rows, data.n)), a)
          for i, a in enumerate(range(0, data.n, shard_rows))]


def exact_topk(data: NoisyCopies, queries_QxD: np.ndarray, m: int = 32):
  """Exact top-m (ids [Q, m] int64, scores [Q, m]) by a streamed pass over every block."""
  best_s = np.full((len(queries_QxD), 0), -np.inf, np.float32)
  best_i = np.full((len(queries_QxD), 0), -1, np.int64)
  for b in range(-(-data.n // BLOCK)):
    s = queries_QxD @ data.block(b).T
    part = np.argpartition(s, -m, axis=1)[:, -m:]
    cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
    cand_i = np.concatenate([best_i, part + b * BLOCK], 1)
    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :m]
    best_s = np.take_along_axis(cand_s, order, 1)
    best_i = np.take_along_axis(cand_i, order, 1)
  return best_i, best_s


def recall(ids_QxK, ref_ids_QxM, ref_scores_QxM, eps=1e-5) -> float:
  """Tie-aware recall@K: a returned id counts when its exact score reaches the exact K-th score
  (every such id is among the exact top-m kept by `exact_topk`)."""
  hits = []
  for ids, ref_i, ref_s in zip(ids_QxK, ref_ids_QxM, ref_scores_QxM):
    good = set(ref_i[ref_s >= ref_s[K - 1] - eps].tolist())
    hits.append(min(len(good & set(ids.tolist())), K) / K)
  return float(np.mean(hits))


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def plot(report, path):
  matplotlib.use("Agg")
  pts = report["sizes"]
  n = [p["num_vectors"] for p in pts]
  fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
  ax[0].plot(n, [p["best_at_recall_0.9"]["qps"] if p["best_at_recall_0.9"] else np.nan
                 for p in pts], "o-")
  ax[0].set(xscale="log", xlabel="vectors", ylabel="QPS at recall@10 >= 0.9",
            title="QPS (2 threads, shared machine)")
  ax[0].set_ylim(bottom=0)
  ax[1].plot(n, [p["ram_bytes_per_vector"] for p in pts], "o-", label="RAM")
  ax[1].plot(n, [p["disk_bytes_per_vector"] for p in pts], "s-", label="disk (with int8 rerank)")
  ax[1].set(xscale="log", yscale="log", xlabel="vectors", ylabel="bytes / vector",
            title="memory per vector")
  ax[1].axhline(64, color="grey", ls=":", lw=1)
  ax[1].legend()
  for p in pts:
    sw = p["sweep"]
    ax[2].plot([s["recall@10"] for s in sw], [s["qps"] for s in sw], ".",
               label=f"{p['num_vectors']:,}")
  ax[2].set(yscale="log", xlabel="recall@10 vs exact", ylabel="QPS", title="sweep (nprobe x rerank)")
  ax[2].axvline(0.9, color="grey", ls=":", lw=1)
  ax[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  faiss.omp_set_num_threads(_THREADS.value)
  paths = sorted(glob.glob(_EMB.value))
  if not paths:
    raise SystemExit(f"No embeddings match {_EMB.value}; build the default database first.")
  real = np.concatenate([np.load(p) for p in paths]).astype(np.float32)
  report = {"real_vectors": int(len(real)), "dim": int(real.shape[1]), "noise_sigma": _NOISE.value,
            "data": "the real default-store embeddings, then noisy re-normalised copies of them "
                    f"(per-dimension Gaussian sigma {_NOISE.value})",
            "threads": _THREADS.value, "num_queries": _NQ.value, "k": K,
            "recall": "tie-aware recall@10 vs exact float32 search over the whole database",
            "config": dataclasses.asdict(global_lib.GlobalIndexConfig()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       "shared with other jobs (compare within this run)",
            "sizes": []}
  sizes = [int(s) for s in _SIZES.value]
  kept = []
  if _MERGE.value and os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      old = json.load(f)
    if old.get("config") == report["config"] and old.get("noise_sigma") == _NOISE.value:
      kept = [dict(p, date_utc=p.get("date_utc", old.get("date_utc")))
              for p in old["sizes"] if p["num_vectors"] not in sizes]
  run_date = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
  for n in sizes:
    data = NoisyCopies(real, n, _NOISE.value)
    out = os.path.join(_SCRATCH.value, f"n{n}")
    shutil.rmtree(out, ignore_errors=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    config = global_lib.GlobalIndexConfig(training_threads=_THREADS.value)
    manifest = global_lib.build(as_sources(data), out, config)
    build_s = time.perf_counter() - t0
    index = global_lib.GlobalIndex(out, verify_files=False)
    rng = np.random.default_rng(1)
    qids = np.sort(rng.choice(n, _NQ.value, replace=False))
    queries = data[qids]
    t1 = time.perf_counter()
    ref_ids, ref_scores = exact_topk(data, queries)
    exact_s = time.perf_counter() - t1
    sweep = []
    for rr in [int(x) for x in _RERANK.value]:
      for npb in [int(x) for x in _NPROBE.value]:
        index.config = dataclasses.replace(index.config, nprobe=npb, rerank=rr)
        ids, _ = index.search(queries, K)
        times = []
        for _ in range(_REPEATS.value):
          t = time.perf_counter()
          index.search(queries, K)
          times.append(time.perf_counter() - t)
        row = {"nprobe": npb, "rerank": rr, "qps": len(qids) / min(times),
               "qps_median": len(qids) / statistics.median(times),
               "recall@10": recall(ids, ref_ids, ref_scores)}
        sweep.append(row)
        print(f"n={n:>9,} nprobe={npb:4d} rerank={rr:4d} {row['qps']:8.0f} q/s "
              f"recall@10 {row['recall@10']:.4f}", flush=True)
    ok = [s for s in sweep if s["recall@10"] >= 0.9]
    point = {
        "num_vectors": n, "nlist": manifest["config"]["nlist"], "factory": manifest["factory"],
        "serving_shards": int(manifest["config"]["serving_shards"]),
        "build_seconds": build_s, "build_phases": manifest["build_seconds"],
        "encode_vectors_per_second": n / manifest["build_seconds"]["encode"],
        "ram_bytes_per_vector": index.memory_bytes() / n,
        "disk_bytes_per_vector": dir_bytes(out) / n,
        "rerank_disk_bytes_per_vector": real.shape[1],
        "process_peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0)
        / 1024,
        "exact_search_seconds": exact_s,
        "best_at_recall_0.9": max(ok, key=lambda s: s["qps"]) if ok else None,
        "best_at_recall_0.95": max([s for s in sweep if s["recall@10"] >= 0.95],
                                   key=lambda s: s["qps"], default=None),
        "sweep": sweep, "date_utc": run_date}
    report["sizes"].append(point)
    print(f"n={n:,}: build {build_s:.0f} s, RAM {point['ram_bytes_per_vector']:.1f} B/vector, "
          f"disk {point['disk_bytes_per_vector']:.0f} B/vector, best at recall>=0.9: "
          f"{point['best_at_recall_0.9']}", flush=True)
    del index
    shutil.rmtree(out, ignore_errors=True)
    # QPS ratio between the smallest and largest size measured in this run (same machine, load).
    pts = [p["best_at_recall_0.9"]["qps"] for p in report["sizes"] if p["best_at_recall_0.9"]]
    report["qps_ratio_smallest_to_largest"] = (pts[0] / pts[-1]) if len(pts) > 1 else None
    report["date_utc"] = run_date
    merged = dict(report, sizes=sorted(kept + report["sizes"], key=lambda p: p["num_vectors"]))
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    merged["provenance"] = run_provenance("bench.global_index_scaling")
    with open(_OUT.value, "w") as f:
      json.dump(merged, f, indent=1)
    if _PLOT.value:
      plot(merged, _PLOT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
