"""Shared by the benchmarks: JAX's own matmul rate on this machine, measured in the same run;
exact top-k search and recall for the index benchmarks; what a results file records about its
run; a results page written again."""
import json
import statistics
import sys
import time

import jax
import numpy as np

from retro_jax.evaluation.figures import provenance


def matmul_gflops(dtype, n: int = 2048, reps: int = 10) -> float:
  """GFLOP/s of a jitted n x n x n matmul, median of `reps` timed calls after one warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9


def exact_top(sources, queries_QxD: np.ndarray, k: int, own_docs_Q=None, doc_ids=None):
  """(ids, scores) [Q, k]: exact float32 top-k over the (shard, rows, first id) `sources`,
  streamed in blocks; with `own_docs_Q` (and `doc_ids(ids)`), each query's own document
  excluded."""
  best_ids = np.full((len(queries_QxD), k), -1, np.int64)
  best = np.full((len(queries_QxD), k), -np.inf, np.float32)
  for _, emb, off in sources:
    for a in range(0, int(emb.shape[0]), 65_536):
      x = np.asarray(emb[a:a + 65_536], np.float32)
      s = queries_QxD @ x.T
      ids = np.arange(off + a, off + a + len(x), dtype=np.int64)
      if own_docs_Q is not None:
        s[own_docs_Q[:, None] == doc_ids(ids)[None]] = -np.inf
      cat_s = np.concatenate([best, s], 1)
      cat_i = np.concatenate([best_ids, np.broadcast_to(ids, s.shape)], 1)
      top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
      best, best_ids = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
  return best_ids, best


def recall(found_QxK: np.ndarray, true_QxK: np.ndarray) -> float:
  """Mean share of each query's true ids found."""
  return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_QxK, true_QxK)]))


def run_provenance(module: str) -> dict:
  """{command, commit, date} of this run: `python -m MODULE` with this process's arguments
  (tests/test_results_sources.py requires them of every results file)."""
  return provenance(" ".join([f"python -m {module}"] + sys.argv[1:]))


def write_page(doc: str, page, results: str) -> None:
  """`doc` written again by `page` from the results file `results` (no measurement)."""
  with open(results) as f:
    res = json.load(f)
  with open(doc, "w") as f:
    f.write(page(res))
