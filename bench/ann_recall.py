r"""ANN recall and speed on the default corpus: ScaNN settings vs faiss-cpu vs exact, in one run.

  python -m bench.ann_recall [--embeddings='runs/default_db/embeddings/shard-*.npy']

Held-out queries: `--num_queries` chunk embeddings (fixed seed) are left out of the database.
recall@k = |approximate top-k ∩ exact top-k| / k, against exact (faiss Flat) search. Queries/s: all
queries in one batched call on `--threads` threads, median of `--repeats`, with every setting timed
once per round, rounds alternating over all settings (the machine is shared, so compare within a
run). Writes bench/results/ann_recall.json.
"""

from __future__ import annotations

import os

# faiss's bundled OpenBLAS picks a slow kernel on this CPU unless told (this process only).
os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import glob  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from retro_jax.retrieval import index as index_lib  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from bench.common import run_provenance  # noqa: E402

_EMB = flags.DEFINE_string("embeddings", "runs/default_db/embeddings/shard-*.npy",
                           "Glob of float32 [n, D] embedding shards (concatenated in order).")
_NQ = flags.DEFINE_integer("num_queries", 2000, "Held-out query chunks.")
_THREADS = flags.DEFINE_integer("threads", 2, "Search threads.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (median).")
_LEAVES = flags.DEFINE_list("scann_num_leaves", ["300", "600", "1200"], "ScaNN tree sizes "
                            "(~sqrt(n), 2*sqrt(n), 4*sqrt(n) at 82k-100k points).")
_LTS = flags.DEFINE_list("scann_leaves_frac", ["0.015", "0.025", "0.04", "0.06", "0.09", "0.13",
                                               "0.2"], "ScaNN leaves_to_search / num_leaves.")
_REORDER = flags.DEFINE_list("scann_reorder", ["30", "60", "120"], "ScaNN reorder counts.")
_QC = flags.DEFINE_list("scann_quantize_centroids", ["false", "true"], "int8 tree centroids.")
_SOAR = flags.DEFINE_float("soar_lambda", 1.5, "ScaNN SOAR lambda.")
_FAISS = flags.DEFINE_string("faiss_factories", "IVF286,PQ192x4fs,RFlat;IVF572,PQ192x4fs,RFlat",
                             "';'-separated faiss fast-scan factories (IVF, PQ, exact rerank).")
_NPROBE = flags.DEFINE_list("faiss_nprobe", ["8", "16", "24", "32", "48", "64", "96"], "nprobe.")
_KFACTOR = flags.DEFINE_list("faiss_k_factor", ["2", "4", "8"], "RFlat rerank factor.")
_OUT = flags.DEFINE_string("out", "bench/results/ann_recall.json", "Results file.")
_DOC_PREFIX = flags.DEFINE_string(
    "doc_prefix", "", "Keep only the chunks of documents whose key starts with this (for example "
    "'linux-doc:' = the kernel docs alone, the corpus of the reference figures in docs/benchmarks.md); "
    "needs --chunks. Empty: every embedding row.")
_CHUNKS = flags.DEFINE_string("chunks", "runs/default_db/chunks",
                              "The chunk store whose chunk ids are the embedding rows.")
_MAX_POINTS = flags.DEFINE_integer("max_points", 0, "Random subset of this many rows (seed 1) "
                                   "before the held-out split (0: all); 84070 = the anchors' size.")
K = 10


@dataclasses.dataclass
class Setting:
  family: str
  params: dict
  fn: object  # queries -> ids_QxK
  recall_at_2: float = 0.0
  recall_at_10: float = 0.0
  times: list = dataclasses.field(default_factory=list)

  @property
  def name(self):
    return f"{self.family} " + ",".join(f"{k}={v}" for k, v in self.params.items())


def recall(ids_QxK, ref_scores_QxK, queries_QxD, db_NxD, k, eps=1e-5):
  """Tie-aware recall@k (as in ann-benchmarks): a returned id counts when its exact score reaches
  the exact k-th score (minus eps), so duplicate chunks with equal scores are not misses."""
  ids = ids_QxK[:, :k]
  true_QxK = np.einsum("qd,qkd->qk", queries_QxD, db_NxD[np.maximum(ids, 0)])
  hit = (ids >= 0) & (true_QxK >= ref_scores_QxK[:, k - 1:k] - eps)
  return float(np.mean(np.minimum(hit.sum(1), k) / k))


def main(argv):
  del argv
  import faiss
  faiss.omp_set_num_threads(_THREADS.value)
  paths = sorted(glob.glob(_EMB.value))
  if not paths:
    raise FileNotFoundError(f"No embeddings match {_EMB.value}; build the database first or pass "
                            "--embeddings=GLOB.")
  unfinished = [p for p in paths if retriever_lib._unfinished(p)]  # noqa: SLF001
  if unfinished:
    raise ValueError(f"Embedding shards still being written: {unfinished}; wait for the embed stage.")
  all_NxD = np.concatenate([np.load(p, mmap_mode="r") for p in paths]).astype(np.float32)
  subset = {}
  if _DOC_PREFIX.value:
    from retro_jax.db.chunk_store import ChunkStore
    store = ChunkStore.open(_CHUNKS.value)
    doc_N = np.concatenate([store.shard_doc_ids(i) for i in range(store.num_shards)])
    if len(doc_N) != len(all_NxD):
      raise ValueError(f"{_CHUNKS.value} has {len(doc_N)} chunks, the embeddings {len(all_NxD)} rows")
    docs = np.unique(doc_N)
    keep_docs = docs[[store.doc_key(int(d)).startswith(_DOC_PREFIX.value) for d in docs]]
    all_NxD = all_NxD[np.isin(doc_N, keep_docs)]
    subset.update(doc_prefix=_DOC_PREFIX.value, documents=int(len(keep_docs)),
                  chunks=int(len(all_NxD)))
  if _MAX_POINTS.value and _MAX_POINTS.value < len(all_NxD):
    pick = np.sort(np.random.default_rng(1).choice(len(all_NxD), _MAX_POINTS.value, replace=False))
    all_NxD = all_NxD[pick]
    subset.update(random_rows=_MAX_POINTS.value)
  n_all, dim = all_NxD.shape
  rng = np.random.default_rng(0)
  held = np.zeros(n_all, bool)
  held[rng.choice(n_all, _NQ.value, replace=False)] = True
  queries_QxD = np.ascontiguousarray(all_NxD[held])
  db_NxD = np.ascontiguousarray(all_NxD[~held])
  del all_NxD
  n = len(db_NxD)
  print(f"database {n} x {dim} from {len(paths)} file(s), {len(queries_QxD)} held-out queries")
  tmp = tempfile.mkdtemp()
  db_path = os.path.join(tmp, "db.npy")
  np.save(db_path, db_NxD)

  flat = faiss.IndexFlatIP(dim)
  flat.add(db_NxD)
  ref_scores_QxK, ref_QxK = flat.search(queries_QxD, K)

  settings = [Setting("exact faiss Flat", {}, lambda q: flat.search(q, K)[1])]
  exact_shard = index_lib.build_shard(db_path, 0, index_lib.IndexConfig(backend="exact"))
  settings.append(Setting("exact JAX (retro_jax exact backend)", {},
                          lambda q: exact_shard.search(q, K)[0]))
  build_s = {}

  for nl, qc in itertools.product(map(int, _LEAVES.value), [v == "true" for v in _QC.value]):
    cfg = index_lib.IndexConfig(backend="scann", num_leaves=nl, soar_lambda=_SOAR.value,
                                quantize_centroids=qc)
    t0 = time.time()
    shard = index_lib.build_shard(db_path, 0, cfg)
    build_s[f"scann num_leaves={nl} quantize_centroids={qc}"] = round(time.time() - t0, 2)
    shard.set_num_threads(_THREADS.value)
    for frac in map(float, _LTS.value):
      lts = max(1, int(round(frac * nl)))
      for reo in map(int, _REORDER.value):
        settings.append(Setting("scann spherical+SOAR+AH2+reorder",
                                {"num_leaves": nl, "quantize_centroids": qc,
                                 "leaves_to_search": lts, "reorder": reo},
                                lambda q, s=shard, l=lts, r=reo: s.search(q, K, l, r)[0]))

  for fac in filter(None, _FAISS.value.split(";")):
    cfg = index_lib.IndexConfig(backend="faiss", faiss_factory=fac)
    t0 = time.time()
    shard = index_lib.build_shard(db_path, 0, cfg)
    build_s[f"faiss {fac}"] = round(time.time() - t0, 2)
    ivf = faiss.extract_index_ivf(shard.index)
    for nprobe in map(int, _NPROBE.value):
      for kf in map(int, _KFACTOR.value):
        def fn(q, s=shard, ivf=ivf, nprobe=nprobe, kf=kf):
          ivf.nprobe = nprobe
          s.index.k_factor = kf
          return s.search(q, K)[0]
        settings.append(Setting("faiss fast-scan", {"factory": fac, "nprobe": nprobe,
                                                    "k_factor": kf}, fn))

  for s in tqdm(settings, desc="recall"):
    ids = s.fn(queries_QxD)
    s.recall_at_2, s.recall_at_10 = (recall(ids, ref_scores_QxK, queries_QxD, db_NxD, 2),
                                  recall(ids, ref_scores_QxK, queries_QxD, db_NxD, 10))
  # Time only settings that can matter (>= 0.9 recall@10) plus the exact baselines.
  timed = [s for s in settings if s.recall_at_10 >= 0.9 or s.family.startswith("exact")]
  for _ in tqdm(range(_REPEATS.value), desc="timing rounds"):
    for s in timed:  # one call each per round: alternating
      t0 = time.perf_counter()
      s.fn(queries_QxD)
      s.times.append(time.perf_counter() - t0)

  def qps(s):
    return len(queries_QxD) / float(np.median(s.times)) if s.times else None

  def best(family_prefix, threshold):
    ok = [s for s in timed if s.family.startswith(family_prefix) and s.recall_at_10 >= threshold]
    if not ok:
      return None
    b = max(ok, key=qps)
    return {"setting": b.name, "params": b.params, "qps": round(qps(b)),
            "recall_at_2": round(b.recall_at_2, 4), "recall_at_10": round(b.recall_at_10, 4)}

  summary = {}
  for thr in (0.95, 0.99):
    summary[f"at_recall10_{thr}"] = {fam: best(fam, thr) for fam in ("scann", "faiss", "exact")}

  # End to end: the Retriever (merge, int64 ids; exact float32 rescoring when rescore=True) at the
  # best ScaNN setting for recall@10 >= 0.95.
  e2e = {}
  b95 = summary["at_recall10_0.95"]["scann"]
  if b95:
    p = b95["params"]
    cfg = index_lib.IndexConfig(backend="scann", num_leaves=p["num_leaves"],
                                leaves_to_search=p["leaves_to_search"], reorder=p["reorder"],
                                quantize_centroids=p["quantize_centroids"], soar_lambda=_SOAR.value)
    r = retriever_lib.Retriever.from_embeddings([db_path], [0], config=cfg, overfetch=2)
    r.shards[0].set_num_threads(_THREADS.value)
    variants = {"rescore=auto (trust ScaNN float32 reorder)": "auto",
                "rescore=True (memmap gather + exact dot, overfetch 2)": True}
    times = {name: [] for name in variants}
    for _ in range(_REPEATS.value):
      for name, mode in variants.items():
        r.rescore = mode
        t0 = time.perf_counter()
        ids, _ = r.search(queries_QxD, K)
        times[name].append(time.perf_counter() - t0)
    for name, mode in variants.items():
      r.rescore = mode
      ids, _ = r.search(queries_QxD, K)
      e2e[name] = {
          "params": p, "qps": round(len(queries_QxD) / float(np.median(times[name]))),
          "recall_at_10": round(recall(ids, ref_scores_QxK, queries_QxD, db_NxD, 10), 4),
          "recall_at_2": round(recall(ids, ref_scores_QxK, queries_QxD, db_NxD, 2), 4)}

  results = {
      "benchmark": "ann_recall",
      "embeddings": _EMB.value, "files": len(paths), "subset": subset or None,
      "database_size": n, "dim": dim,
      "num_queries": len(queries_QxD), "k": K, "threads": _THREADS.value,
      "repeats": _REPEATS.value, "qps_statistic": "median over alternating rounds",
      "host": platform.node(), "cpu_count": os.cpu_count(),
      "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
      "versions": {"scann": index_lib.package_versions()["scann"],
                   "faiss-cpu": index_lib.package_versions()["faiss-cpu"]},
      "build_seconds": build_s,
      "summary": summary,
      "retriever_end_to_end_at_best_scann_0.95": e2e,
      "anchors_kernel_docs_82k": {"faiss fast-scan at 0.95": 57806, "faiss fast-scan at 0.99": 23388,
                                  "scann spherical+SOAR at 0.95": 46222,
                                  "scann spherical+SOAR at 0.99": 20337,
                                  "exact faiss Flat": 6507},
      "targets": {"default backend at 0.95": 58000, "at 0.99": 23000},
      "settings": [{"family": s.family, "params": s.params, "recall_at_2": round(s.recall_at_2, 4),
                    "recall_at_10": round(s.recall_at_10, 4),
                    "qps": round(qps(s)) if s.times else None} for s in settings],
  }
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  results["provenance"] = run_provenance("bench.ann_recall")
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: results[k] for k in ("database_size", "summary", "build_seconds",
                                            "retriever_end_to_end_at_best_scann_0.95")}, indent=1))
  for s in sorted(timed, key=lambda s: (s.family, -s.recall_at_10)):
    print(f"{s.name:80s} r@2={s.recall_at_2:.4f} r@10={s.recall_at_10:.4f} qps={qps(s):,.0f}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
