r"""The global index's two searchers on the same vectors, in one run: faiss fast-scan and ScaNN.

    python -m bench.synthetic_db --db=runs/synth_10m --num_chunks=10000000
    python -m bench.global_searchers --db=runs/synth_10m   # -> bench/results/global_searchers.json

For each size N (`--sizes`, the first N vectors of `--db`'s embeddings; bench/synthetic_db.py
says what they are) one index is built (`global_index.build`, `searcher="scann"`): the same
trained partitioner and quantizer, the same partition -> serving-shard layout (serving shards of
`--vectors_per_serving_shard`), the same int8 rerank copy; each serving shard holds both the faiss
fast-scan codes of its partitions and a ScaNN searcher over its vectors (a tree of ~2 sqrt(n)
leaves, AH codes). A query is routed to serving shards by its nearest partitions (nprobe) as
always; within a serving shard faiss scans the routed partitions, ScaNN searches its own leaves
(a fraction of them); both rerank their best `rerank` against the int8 copy. Then, per searcher,
a sweep of its settings: QPS of one batched `GlobalIndex.search(Q, 10)` over `--num_queries`
stored vectors on `--threads` threads (best and median of `--repeats`), and recall@10 against
exact float32 search over the N vectors (streamed). Per searcher: the best QPS at recall@10 >= 0.9
and >= 0.95, bytes per vector in RAM and on disk, and build seconds (faiss: train + encode +
merge without the ScaNN build; ScaNN: the same plus its build, which a ScaNN-only index would
still need since the routing and rerank are shared), both on `--threads` training threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

import faiss
import numpy as np
from absl import app, flags

from bench import common
from retro_jax.evaluation.figures import provenance
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import retriever as retriever_lib

_DB = flags.DEFINE_string("db", "runs/synth_10m", "A database through its embeddings stage.")
_SIZES = flags.DEFINE_list("sizes", ["1000000", "10000000"], "Vectors (the first N).")
_VPS = flags.DEFINE_integer("vectors_per_serving_shard", 1 << 21, "Serving shard size.")
_NQ = flags.DEFINE_integer("num_queries", 1000, "Stored vectors used as queries.")
_THREADS = flags.DEFINE_integer("threads", 2, "Search threads (faiss OpenMP, ScaNN pool).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per setting.")
_NPROBE = flags.DEFINE_list("nprobe", ["2", "4", "8", "16", "32", "48", "96"],
                            "faiss nprobe sweep.")
_LEAVES = flags.DEFINE_list("leaves",
                            ["0.0025", "0.005", "0.01", "0.02", "0.04", "0.08", "0.15"],
                            "ScaNN: fractions of a serving shard's leaves searched.")
_RERANK = flags.DEFINE_list("rerank", ["16", "32", "64", "96", "192"],
                            "Rerank pool sweep (both).")
_SCRATCH = flags.DEFINE_string("scratch", "/tmp/global_searchers", "Where the indexes are built.")
_OUT = flags.DEFINE_string("out", "bench/results/global_searchers.json", "Results file.")
_DOC = flags.DEFINE_string("doc", "docs/global_searchers.md", "The page written from it.")
_DOC_ONLY = flags.DEFINE_bool("doc_only", False, "Only write --doc from an existing --out.")
K = 10


def _sources(db: str, n: int):
  out, have = [], 0
  for i, emb, off in retriever_lib.db_global_sources(db):
    if have >= n:
      break
    take = min(int(emb.shape[0]), n - have)
    out.append((i, emb[:take], off))
    have += take
  return out


def _timed(index, q):
  times, found = [], None
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    found, _ = index.search(q, K)
    times.append(time.perf_counter() - t0)
  return found, len(q) / min(times), len(q) / statistics.median(times)


def _best(sweep, at):
  ok = [r for r in sweep if r["recall@10"] >= at]
  return max(ok, key=lambda r: r["qps"]) if ok else None


def measure(db: str, n: int) -> dict:
  sources = _sources(db, n)
  root = os.path.join(_SCRATCH.value, f"n{n}")
  shutil.rmtree(root, ignore_errors=True)
  config = global_lib.GlobalIndexConfig(searcher="scann", vectors_per_serving_shard=_VPS.value,
                                        training_threads=_THREADS.value)
  t0 = time.perf_counter()
  manifest = global_lib.build(sources, root, config)
  wall = time.perf_counter() - t0
  bs = manifest["build_seconds"]
  rng = np.random.default_rng(0)
  emb_rows = rng.choice(n, _NQ.value, replace=False)
  q = np.concatenate([np.asarray(e[np.sort(emb_rows[(emb_rows >= off) & (emb_rows < off + len(e))])
                                   - off], np.float32) for _, e, off in sources])
  t1 = time.perf_counter()
  true, _ = common.exact_top(sources, q, K)
  exact_s = time.perf_counter() - t1
  files = {}
  for d, _, fs in os.walk(root):
    for f in fs:
      files[os.path.relpath(os.path.join(d, f), root)] = os.path.getsize(os.path.join(d, f))
  shared = sum(v for k, v in files.items() if k.endswith((".rerank.npy", ".ids.npy")))
  faiss_disk = sum(v for k, v in files.items() if k.endswith(".faiss"))
  scann_disk = sum(v for k, v in files.items() if ".scann/" in k)
  faiss.omp_set_num_threads(_THREADS.value)
  res = {"num_vectors": n, "serving_shards": manifest["config"]["serving_shards"],
         "nlist": manifest["config"]["nlist"], "factory": manifest["factory"],
         "build_wall_seconds": wall, "build_seconds": bs, "exact_search_seconds": exact_s,
         "searchers": {}}
  for name in ("faiss", "scann"):
    index = global_lib.GlobalIndex(root, searcher=name)
    sweep = []
    knobs = ([("nprobe", int(v)) for v in _NPROBE.value] if name == "faiss"
             else [("scann_leaves_to_search", float(v)) for v in _LEAVES.value])
    for knob, value in knobs:
      for rerank in map(int, _RERANK.value):
        index.config = dataclasses.replace(index.config, rerank=rerank, **{knob: value})
        found, qps, qps_median = _timed(index, q)
        sweep.append({knob: value, "rerank": rerank, "qps": qps, "qps_median": qps_median,
                      "recall@10": common.recall(found, true)})
        print(name, n, sweep[-1], flush=True)
    ram = (index.memory_bytes() if name == "faiss"
           else scann_disk + sum(8 * len(i) for i in index._rr_ids.values() if i is not None))
    build = bs["train"] + bs["encode"] + bs["merge"] - bs.get("scann_within_merge", 0.0)
    res["searchers"][name] = {
        "build_seconds": build + (bs.get("scann_within_merge", 0.0) if name == "scann" else 0.0),
        "ram_bytes_per_vector": ram / n,
        "ram_note": ("faiss: codes + ids in the inverted lists (memory_bytes)" if name == "faiss"
                     else "ScaNN: its serialized searcher (tree, AH codes, its own int32 ids) + "
                          "sorted ids where a shard's ids are not 0..n-1"),
        "disk_bytes_per_vector": ((faiss_disk if name == "faiss" else scann_disk) + shared) / n,
        "best_at_recall_0.9": _best(sweep, 0.9), "best_at_recall_0.95": _best(sweep, 0.95),
        "sweep": sweep}
    del index
  shutil.rmtree(root, ignore_errors=True)
  return res


def page(out: dict) -> str:
  p = out["provenance"]
  lines = ["# The global index's searchers: faiss fast-scan and ScaNN, same vectors, one run", "",
           f"Written by `{p['command']}` at commit {p['commit']} on {p['date']} from "
           "`bench/results/global_searchers.json`; how: `bench/global_searchers.py`.",
           f"Data: {out['data']}. {out['threads']} search threads, {out['num_queries']:,} stored "
           f"vectors as queries, recall@10 against exact float32 search. Machine: "
           f"{out['machine']}.", "",
           "| vectors | serving shards | searcher | build s | RAM B/vector | disk B/vector "
           "| QPS at recall >= 0.9 (setting, recall) | QPS at recall >= 0.95 (setting, recall) |",
           "|" + "---|" * 8]

  def cell(b):
    if b is None:
      return "not reached"
    knob = {k: v for k, v in b.items() if k in ("nprobe", "scann_leaves_to_search", "rerank")}
    return f"{b['qps']:,.0f} ({', '.join(f'{k} {v}' for k, v in knob.items())}; " \
           f"{b['recall@10']:.3f})"
  for r in out["sizes"]:
    for name, s in r["searchers"].items():
      lines.append(f"| {r['num_vectors']:,} | {r['serving_shards']} | {name} | "
                   f"{s['build_seconds']:,.0f} | {s['ram_bytes_per_vector']:,.1f} | "
                   f"{s['disk_bytes_per_vector']:,.1f} | {cell(s['best_at_recall_0.9'])} | "
                   f"{cell(s['best_at_recall_0.95'])} |")
  lowest = []
  for r in out["sizes"]:
    for name, s in r["searchers"].items():
      knobs = ("nprobe" if name == "faiss" else "scann_leaves_to_search", "rerank")
      least = {k: min(x[k] for x in s["sweep"]) for k in knobs}
      for at in ("0.9", "0.95"):
        b = s[f"best_at_recall_{at}"]
        at_least = [k for k in knobs if b is not None and b[k] == least[k]]
        if at_least:
          lowest.append(f"{name} at {r['num_vectors']:,} (recall >= {at}: "
                        f"{' and '.join(at_least)})")
  if lowest:
    lines += ["", "A best setting is the sweep's lowest for " + ", ".join(lowest) + ": a lower "
              "one, not swept, may be faster at that recall."]
  else:
    lines += ["", "No best setting is the sweep's lowest (in either setting): each best lies "
              "inside the sweep."]
  lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  if _DOC_ONLY.value:
    common.write_page(_DOC.value, page, _OUT.value)
    return
  out = {"provenance": provenance("python -m bench.global_searchers " + " ".join(sys.argv[1:])),
         "data": f"the first N vectors of {_DB.value} (bench/synthetic_db.py: the default "
                 "database's real MiniLM vectors, then noisy re-normalised copies)",
         "threads": _THREADS.value, "num_queries": _NQ.value, "machine": f"{os.cpu_count()} cores",
         "vectors_per_serving_shard": _VPS.value, "sizes": []}
  for n in map(int, _SIZES.value):
    out["sizes"].append(measure(_DB.value, n))
    with open(_OUT.value, "w") as f:  # after every size, so a stopped run keeps its points
      json.dump(out, f, indent=1)
    with open(_DOC.value, "w") as f:
      f.write(page(out))


if __name__ == "__main__":
  app.run(main)
