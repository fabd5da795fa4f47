r"""Retrieval-service latency and throughput on loopback, and a shard killed under load.

  python -m bench.service_latency [--db=runs/default_db] [--shards=2,4] [--work=/tmp/retro_service_bench]

Setup (cached in --work, reused by a rerun): the database's chunk store and tokenizer are copied,
its embeddings re-cut into N document-aligned, near-equal index shards per N in --shards, and one
ScaNN shard built per piece (the database's default IndexConfig; the source database is only read).

For each N: N `python -m retro_jax.retrieval.serve` processes (one per shard, --search_threads=1)
and a load generator in a second process (`--worker`, a `ServiceRetriever`, `--concurrency` threads
each keeping one request in flight) on 127.0.0.1. Queries are `--num_queries` chunk embeddings of the
database (fixed seed), each excluding its own document, k=2 (a RETRO training/sampling query).
  0. single_one_in_flight: one query per request, one request in flight, --seconds / 2: latency
     without queueing.
  1. single: one query per request for --seconds; latency p50/p90/p99 and requests/s (= queries/s).
  2. batched: --batch queries per request for --seconds; queries/s.
  3. kill: single-query load; after --kill_after s one shard process gets SIGKILL; the load goes on
     for --kill_seconds. Every answer is checked against the in-process Retriever over the same
     shards (ids equal, or equal up to the order of exactly tied scores: see TIE); counted: answers
     before/after the kill, ShardUnavailableError errors, wrong answers (must be 0), and the time
     from the kill to the first error.
ABUSE (--abuse, one shard count: the first of --shards): the single-query load for --seconds
without abuse, then with an abuse worker sending --abuse_rate requests/s beyond the shards' bounds
(k = 1,000,000; more queries than `Limits.max_queries`; a request above `max_request_bytes`; a
batch whose search memory is above `max_work_bytes`; NaN and infinite queries), then without
again. Recorded: every abusive request's status (all must be rejected), each shard's RSS idle and
its peak (VmRSS sampled every 20 ms) in each phase, and the p99 of the normal requests per phase.
Written to --abuse_out.

In-process `Retriever.search` latency on the same shards (one query, one thread) is measured for
comparison (the service's overhead is gRPC + the fan-out + the merge). The machine is shared: the
load average before and after goes into bench/results/service_latency.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.common import run_provenance  # noqa: E402
from retro_jax.db import layout  # noqa: E402

_DB = flags.DEFINE_string("db", "runs/default_db", "Source database (read only).")
_WORK = flags.DEFINE_string("work", "/tmp/retro_service_bench", "Scratch directory (cached).")
_SHARDS = flags.DEFINE_list("shards", ["2", "4"], "Shard counts to measure.")
_NQ = flags.DEFINE_integer("num_queries", 2000, "Query chunk embeddings.")
_K = flags.DEFINE_integer("num_neighbours", 2, "Neighbours per query.")
_CONC = flags.DEFINE_integer("concurrency", 4, "Requests in flight from the load process.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds per steady-load phase.")
_BATCH = flags.DEFINE_integer("batch", 64, "Queries per request in the batched phase.")
_KILL_AFTER = flags.DEFINE_float("kill_after", 4.0, "Seconds of load before the kill.")
_KILL_SECONDS = flags.DEFINE_float("kill_seconds", 10.0, "Seconds of load in the kill phase.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 5.0, "Client deadline per request.")
_OUT = flags.DEFINE_string("out", "bench/results/service_latency.json", "Results file.")
# Worker (load generator) mode.
_WORKER = flags.DEFINE_bool("worker", False, "Run as the load-generating process.")
_ADDRS = flags.DEFINE_list("addresses", [], "Worker: shard addresses.")
_QFILE = flags.DEFINE_string("queries", None, "Worker: npz with queries, exclude, expected.")
_MODE = flags.DEFINE_enum("mode", "single", ["single", "batched", "abuse"],
                          "Worker: request shape ('abuse': requests beyond the bounds).")
_DURATION = flags.DEFINE_float("duration", 10.0, "Worker: seconds of load.")
_WOUT = flags.DEFINE_string("worker_out", None, "Worker: results file.")
# Abuse run (--abuse): requests beyond the shards' bounds mixed into the single-query load.
_ABUSE = flags.DEFINE_bool("abuse", False, "Measure the abuse run instead (see ABUSE below).")
_ABUSE_RATE = flags.DEFINE_float("abuse_rate", 10.0, "Abusive requests per second (abuse run).")
_ABUSE_OUT = flags.DEFINE_string("abuse_out", "bench/results/service_abuse.json",
                                 "Results file of the abuse run.")

# TIE: the ids differ from the reference only in the order (or choice) of candidates whose scores
# are equal to 1e-5 -- distinct chunks with identical text have bit-identical embeddings, and
# ScaNN's float32 reorder can differ in the last bit between calls, so either order is a correct
# top-k. WRONG: anything else (another score, an id outside the reference's top k + 8).
OK, WRONG, UNAVAILABLE, OTHER, TIE = 0, 1, 2, 3, 4
TIE_ATOL = 1e-5


def classify(ids_QxK, scores_QxK, want_QxK, want_scores_QxK, wide_QxW) -> int:
  if np.array_equal(ids_QxK, want_QxK):
    return OK
  if (np.allclose(scores_QxK, want_scores_QxK, rtol=0, atol=TIE_ATOL)
      and all(np.isin(a, w).all() for a, w in zip(ids_QxK, wide_QxW))):
    return TIE
  return WRONG


# ------------------------------------------------------------------------------------------------
# Worker: the load-generating process.


def abuse_worker() -> None:
  """Sends requests beyond the bounds to every shard at --abuse_rate per second; records codes."""
  import grpc

  from retro_jax.retrieval import service_pb2, service_pb2_grpc
  from retro_jax.retrieval import shard_server as serve_lib
  limits, dim = serve_lib.Limits(), 384
  stubs = [service_pb2_grpc.ShardSearchStub(grpc.insecure_channel(
      a, options=serve_lib.CHANNEL_OPTIONS)) for a in _ADDRS.value]
  nan = np.full((1, dim), np.nan, np.float32)
  inf = np.full((1, dim), np.inf, np.float32)
  kinds = [("k_1000000", 1, 1_000_000, None),
           ("batch_above_max_queries", limits.max_queries + 1, 2, None),
           ("request_above_max_bytes", limits.max_request_bytes // (dim * 4) + 64, 2, None),
           ("search_memory_above_max", 4096, 4096, None),
           ("nan_query", 1, 2, nan), ("inf_query", 1, 2, inf)]
  payload = {q: np.random.default_rng(0).standard_normal((q, dim)).astype(np.float32).tobytes()
             for _, q, _, v in kinds if v is None}
  records: list[tuple[str, str, float]] = []
  open(_WOUT.value + ".started", "w").close()
  stop_at, i = time.monotonic() + _DURATION.value, 0
  while time.monotonic() < stop_at:
    name, q, k, values = kinds[i % len(kinds)]
    stub = stubs[(i // len(kinds)) % len(stubs)]
    data = values.tobytes() if values is not None else payload[q]
    t0 = time.perf_counter()
    try:
      stub.Search(service_pb2.SearchRequest(num_queries=q, dim=dim, k=k, queries=data),
                  timeout=_TIMEOUT.value)
      code = "OK"
    except grpc.RpcError as e:
      code = e.code().name
    records.append((name, code, time.perf_counter() - t0))
    i += 1
    time.sleep(max(0.0, 1.0 / _ABUSE_RATE.value - (time.perf_counter() - t0)))
  with open(_WOUT.value, "w") as f:
    json.dump({"records": records}, f)


def worker() -> None:
  if _MODE.value == "abuse":
    abuse_worker()
    return
  from retro_jax.retrieval import client as client_lib
  data = np.load(_QFILE.value)
  q_QxD, excl_Q, want_QxK = data["queries"], data["exclude"], data["expected"]
  want_scores_QxK, wide_QxW = data["expected_scores"], data["expected_wide"]
  nq, k = len(q_QxD), want_QxK.shape[1]
  batch = _BATCH.value if _MODE.value == "batched" else 1
  records: list[tuple[float, float, int]] = []  # (start unix time, latency s, outcome)
  errors: list[str] = []
  lock = threading.Lock()
  with client_lib.ServiceRetriever(_ADDRS.value, timeout_s=_TIMEOUT.value) as service:
    service.search(q_QxD[:batch], k, excl_Q[:batch])  # connect + warm
    open(_WOUT.value + ".started", "w").close()
    stop_at = time.monotonic() + _DURATION.value

    def loop(t: int) -> None:
      i = t * 997
      while time.monotonic() < stop_at:
        rows = np.arange(i, i + batch) % nq
        i += batch * _CONC.value
        start, t0 = time.time(), time.perf_counter()
        try:
          ids, scores = service.search(q_QxD[rows], k, excl_Q[rows])
          outcome = classify(ids, scores, want_QxK[rows], want_scores_QxK[rows], wide_QxW[rows])
          if outcome != OK:
            r = np.flatnonzero((ids != want_QxK[rows]).any(axis=1))[:2]
            msg = (f"{'tie' if outcome == TIE else 'WRONG'} rows {rows[r]}: got {ids[r].tolist()} "
                   f"scores {scores[r].tolist()} want {want_QxK[rows][r].tolist()} scores "
                   f"{want_scores_QxK[rows][r].tolist()}")
          else:
            msg = None
        except client_lib.ShardUnavailableError as e:
          outcome, msg = UNAVAILABLE, str(e)
        except Exception as e:  # noqa: BLE001 -- counted and reported, never hidden
          outcome, msg = OTHER, f"{type(e).__name__}: {e}"
        with lock:
          records.append((start, time.perf_counter() - t0, outcome))
          if msg and len(errors) < 5:
            errors.append(msg)

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(_CONC.value)]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
  with open(_WOUT.value, "w") as f:
    json.dump({"records": records, "errors": errors, "batch": batch}, f)


# ------------------------------------------------------------------------------------------------
# Setup: re-sharded index copies.


def prepare(db: str, work: str, n_shards: int) -> tuple[str, str]:
  """(chunk-store DB copy, index root with n_shards document-aligned ScaNN shards)."""
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval import index as index_lib
  from retro_jax.retrieval import retriever as retriever_lib
  db_copy = os.path.join(work, "db")
  if not os.path.isfile(os.path.join(db_copy, "chunks", "manifest.json")):
    shutil.rmtree(db_copy, ignore_errors=True)
    os.makedirs(db_copy)
    shutil.copytree(os.path.join(db, "tokenizer"), os.path.join(db_copy, "tokenizer"))
    shutil.copytree(os.path.join(db, "chunks"), os.path.join(db_copy, "chunks.tmp"))
    os.replace(os.path.join(db_copy, "chunks.tmp"), os.path.join(db_copy, "chunks"))
  store = chunk_store_lib.ChunkStore.open(db_copy)
  n = store.num_chunks
  starts = store.doc_first_chunk
  cuts = [0] + [int(starts[np.argmin(np.abs(starts - j * n / n_shards))])
                for j in range(1, n_shards)] + [n]
  root = os.path.join(work, f"index_{n_shards}")
  os.makedirs(root, exist_ok=True)
  src = [(p, o) for _, p, o in retriever_lib.db_embedding_shards(db)]
  for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
    out = str(layout.index_shard_dir(root, i))
    emb = os.path.join(root, f"emb-{i:05d}.npy")
    try:
      m = index_lib.read_manifest(out)
      if m["offset"] == a and m["count"] == b - a:
        continue
    except index_lib.IndexError_:
      pass
    arr = np.lib.format.open_memmap(emb + ".tmp.npy", mode="w+", dtype=np.float32,
                                    shape=(b - a, 384))
    for path, off in src:
      part = np.load(path, mmap_mode="r")
      lo, hi = max(a, off), min(b, off + len(part))
      if lo < hi:
        arr[lo - a:hi - a] = part[lo - off:hi - off]
    arr.flush()
    del arr
    os.replace(emb + ".tmp.npy", emb)
    t0 = time.perf_counter()
    index_lib.build_shard(emb, a, index_lib.IndexConfig(), out)
    print(f"[bench] built shard {i}/{n_shards} [{a}, {b}) in {time.perf_counter() - t0:.1f} s",
          flush=True)
  return db_copy, root


def in_process_reference(db_copy: str, root: str, n_shards: int, q_QxD, excl_Q, k):
  """Expected ids (the in-process Retriever, ScaNN on one thread as the servers) and its latency."""
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval import retriever as retriever_lib
  store = chunk_store_lib.ChunkStore.open(db_copy)
  r = retriever_lib.Retriever.load([str(layout.index_shard_dir(root, i)) for i in range(n_shards)],
                                   doc_ids=store.doc_ids)
  for s in r.shards:
    if hasattr(s, "set_num_threads"):  # ScaNN (faiss shards search on one thread here anyway)
      s.set_num_threads(1)
  want = [r.search(q_QxD[i:i + 1], k, excl_Q[i:i + 1]) for i in range(len(q_QxD))]
  want_QxK = np.stack([w[0][0] for w in want])
  want_scores_QxK = np.stack([w[1][0] for w in want])
  wide_QxW = np.stack([r.search(q_QxD[i:i + 1], k + 8, excl_Q[i:i + 1])[0][0]
                       for i in range(len(q_QxD))])
  lat = []
  for i in range(min(500, len(q_QxD))):
    t0 = time.perf_counter()
    r.search(q_QxD[i:i + 1], k, excl_Q[i:i + 1])
    lat.append(time.perf_counter() - t0)
  return want_QxK, want_scores_QxK, wide_QxW, lat


def run_worker(addresses, qfile, mode, duration, out, concurrency=None) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "bench.service_latency", "--worker", f"--addresses={','.join(addresses)}",
         f"--queries={qfile}", f"--mode={mode}", f"--duration={duration}", f"--worker_out={out}",
         f"--concurrency={concurrency or _CONC.value}", f"--batch={_BATCH.value}", f"--timeout_s={_TIMEOUT.value}"]
  return subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def summarize(path: str, since: float | None = None) -> dict:
  with open(path) as f:
    res = json.load(f)
  rec = np.asarray(res["records"], np.float64).reshape(-1, 3)
  if since is not None:
    rec = rec[rec[:, 0] >= since]
  ok = rec[(rec[:, 2] == OK) | (rec[:, 2] == TIE)]
  span = (rec[:, 0] + rec[:, 1]).max() - rec[:, 0].min() if len(rec) else float("nan")
  lat_ms = ok[:, 1] * 1e3
  return {"requests": int(len(rec)), "ok": int(len(ok)),
          "ok_tie_order_differs": int((rec[:, 2] == TIE).sum()),
          "wrong": int((rec[:, 2] == WRONG).sum()),
          "unavailable_errors": int((rec[:, 2] == UNAVAILABLE).sum()),
          "other_errors": int((rec[:, 2] == OTHER).sum()), "seconds": float(span),
          "requests_per_s": float(len(ok) / span) if len(rec) else 0.0,
          "queries_per_s": float(len(ok) * res["batch"] / span) if len(rec) else 0.0,
          "latency_ms": {p: float(np.percentile(lat_ms, int(p[1:]))) for p in ("p50", "p90", "p99")}
          if len(ok) else None, "queries_per_request": res["batch"], "error_samples": res["errors"]}


def _reference_queries(db: str, work: str, n_shards: int, name: str):
  """The shard copies, the sampled stored chunks as queries, their in-process answers (written
  to WORK/NAME_S.npz for the load workers)."""
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval import retriever as retriever_lib
  db_copy, root = prepare(db, work, n_shards)
  store = chunk_store_lib.ChunkStore.open(db_copy)
  rows = np.sort(np.random.default_rng(0).choice(store.num_chunks, _NQ.value, replace=False))
  emb = [(np.load(p, mmap_mode="r"), o) for _, p, o in retriever_lib.db_embedding_shards(db)]
  q_QxD = np.stack([next(e[r - o] for e, o in emb if o <= r < o + len(e)) for r in rows])
  excl_Q = store.doc_ids(rows)
  want_QxK, want_scores_QxK, wide_QxW, inproc_lat = in_process_reference(
      db_copy, root, n_shards, q_QxD, excl_Q, _K.value)
  qfile = os.path.join(work, f"{name}_{n_shards}.npz")
  np.savez(qfile, queries=q_QxD, exclude=excl_Q, expected=want_QxK,
           expected_scores=want_scores_QxK, expected_wide=wide_QxW)
  return (db_copy, root, store, q_QxD, excl_Q, want_QxK, want_scores_QxK, wide_QxW, inproc_lat,
          qfile)


def measure(n_shards: int, db: str, work: str) -> dict:
  from retro_jax.retrieval import client as client_lib
  from retro_jax.retrieval import shard_server as serve_lib
  db_copy, root, store, q_QxD, excl_Q, want_QxK, want_scores_QxK, wide_QxW, inproc_lat, qfile = (
      _reference_queries(db, work, n_shards, "queries"))
  out: dict = {"num_shards": n_shards,
               "shard_sizes": [int(json.load(open(os.path.join(str(layout.index_shard_dir(root, i)),
                                                               "manifest.json")))["count"])
                               for i in range(n_shards)],
               "in_process_single_query_ms": {
                   "p50": float(np.percentile(inproc_lat, 50) * 1e3),
                   "p99": float(np.percentile(inproc_lat, 99) * 1e3)}}
  procs = serve_lib.start_shards(db_copy, range(n_shards), os.path.join(work, f"serve_{n_shards}"),
                                 index_root=root)
  try:
    with client_lib.ServiceRetriever([p.address for p in procs]) as s:
      assert set(s.health().values()) == {"SERVING"}
    phases = [("single_one_in_flight", "single", 1, _SECONDS.value / 2),
              ("single", "single", _CONC.value, _SECONDS.value),
              ("batched", "batched", _CONC.value, _SECONDS.value)]
    for name, mode, conc, seconds in phases:
      wout = os.path.join(work, f"worker_{n_shards}_{name}.json")
      w = run_worker([p.address for p in procs], qfile, mode, seconds, wout, conc)
      if w.wait() != 0:
        raise RuntimeError(f"load worker failed ({name})")
      out[name] = {"concurrency": conc, **summarize(wout)}
      print(f"[bench] {n_shards} shards {name}: {json.dumps(out[name])[:400]}", flush=True)
    wout = os.path.join(work, f"worker_{n_shards}_kill.json")
    if os.path.exists(wout + ".started"):
      os.remove(wout + ".started")
    w = run_worker([p.address for p in procs], qfile, "single", _KILL_SECONDS.value, wout)
    while not os.path.exists(wout + ".started"):  # imports + connect
      if w.poll() is not None:
        raise RuntimeError("load worker failed before the kill")
      time.sleep(0.02)
    time.sleep(_KILL_AFTER.value)
    victim = procs[-1]
    killed_at = time.time()
    os.kill(victim.process.pid, signal.SIGKILL)
    if w.wait() != 0:
      raise RuntimeError("load worker failed (kill)")
    with open(wout) as f:
      rec = np.asarray(json.load(f)["records"], np.float64).reshape(-1, 3)
    after = rec[rec[:, 0] >= killed_at]
    before = rec[rec[:, 0] + rec[:, 1] < killed_at]
    errs = rec[rec[:, 2] == UNAVAILABLE]
    first_err = float((errs[:, 0] + errs[:, 1]).min() - killed_at) if len(errs) else None
    out["kill"] = {
        "killed_shard": victim.shard, "killed_address": victim.address,
        "all": summarize(wout),
        "before_kill": {"requests": int(len(before)),
                        "ok": int(np.isin(before[:, 2], (OK, TIE)).sum()),
                        "wrong": int((before[:, 2] == WRONG).sum())},
        "started_after_kill": {"requests": int(len(after)),
                               "ok": int(np.isin(after[:, 2], (OK, TIE)).sum()),
                               "unavailable_errors": int((after[:, 2] == UNAVAILABLE).sum()),
                               "wrong": int((after[:, 2] == WRONG).sum()),
                               "other_errors": int((after[:, 2] == OTHER).sum())},
        "seconds_from_kill_to_first_error": first_err}
    print(f"[bench] {n_shards} shards kill: {json.dumps(out['kill'])[:600]}", flush=True)
  finally:
    for p in procs:
      p.stop()
  return out


def rss_bytes(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


class RssSampler:
  """Peak VmRSS of some processes, sampled every `every` seconds in a thread."""

  def __init__(self, pids, every: float = 0.02):
    self.pids, self.every, self.peak = list(pids), every, {p: 0 for p in pids}
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    while not self._stop.is_set():
      for p in self.pids:
        self.peak[p] = max(self.peak[p], rss_bytes(p))
      time.sleep(self.every)

  def __enter__(self) -> "RssSampler":
    self._t.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._t.join()


def measure_abuse(n_shards: int, db: str, work: str) -> dict:
  """Normal single-query load without, with, and again without abusive requests mixed in."""
  from retro_jax.retrieval import shard_server as serve_lib
  db_copy, root, store, q_QxD, excl_Q, want_QxK, want_scores_QxK, wide_QxW, _, qfile = (
      _reference_queries(db, work, n_shards, "queries_abuse"))
  procs = serve_lib.start_shards(db_copy, range(n_shards),
                                 os.path.join(work, f"serve_abuse_{n_shards}"), index_root=root)
  addrs = [p.address for p in procs]
  pids = [p.process.pid for p in procs]
  out: dict = {"num_shards": n_shards, "limits": dataclasses.asdict(serve_lib.Limits()),
               "abuse_rate_per_s": _ABUSE_RATE.value, "phases": {}}
  try:
    time.sleep(1.0)
    out["idle_rss_mb"] = {str(p): rss_bytes(p) / 2**20 for p in pids}
    for name, abuse in (("normal", False), ("with_abuse", True), ("normal_after", False)):
      wout = os.path.join(work, f"worker_abuse_{n_shards}_{name}.json")
      aout = wout + ".abuse.json"
      with RssSampler(pids) as rss:
        w = run_worker(addrs, qfile, "single", _SECONDS.value, wout)
        a = (subprocess.Popen([sys.executable, "-m", "bench.service_latency", "--worker",
                               f"--addresses={','.join(addrs)}", "--mode=abuse",
                               f"--duration={_SECONDS.value}", f"--worker_out={aout}",
                               f"--abuse_rate={_ABUSE_RATE.value}",
                               f"--timeout_s={_TIMEOUT.value}"],
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}) if abuse else None)
        if w.wait() != 0 or (a is not None and a.wait() != 0):
          raise RuntimeError(f"load worker failed ({name})")
      phase = {"normal_requests": summarize(wout),
               "peak_rss_mb": {str(p): v / 2**20 for p, v in rss.peak.items()}}
      if abuse:
        recs = json.load(open(aout))["records"]
        by: dict = {}
        for kind, code, _ in recs:
          by.setdefault(kind, {}).setdefault(code, 0)
          by[kind][code] += 1
        phase["abusive_requests"] = {"sent": len(recs),
                                     "accepted": sum(1 for _, c, _ in recs if c == "OK"),
                                     "codes_by_kind": by}
      out["phases"][name] = phase
      print(f"[bench] abuse {name}: {json.dumps(phase)[:600]}", flush=True)
  finally:
    for p in procs:
      p.stop()
  p99 = {n: ph["normal_requests"]["latency_ms"]["p99"] for n, ph in out["phases"].items()}
  idle = out["idle_rss_mb"]
  out["summary"] = {
      "abusive_sent": out["phases"]["with_abuse"]["abusive_requests"]["sent"],
      "abusive_accepted": out["phases"]["with_abuse"]["abusive_requests"]["accepted"],
      "peak_over_idle_rss_with_abuse": max(
          out["phases"]["with_abuse"]["peak_rss_mb"][p] / idle[p] for p in idle),
      "p99_ms": p99,
      "p99_with_abuse_over_without": p99["with_abuse"] / ((p99["normal"] + p99["normal_after"]) / 2),
      "wrong_answers": sum(ph["normal_requests"]["wrong"] for ph in out["phases"].values())}
  return out


def main(argv) -> None:
  del argv
  if _WORKER.value:
    worker()
    return
  if _ABUSE.value:
    os.makedirs(_WORK.value, exist_ok=True)
    load_before = open("/proc/loadavg").read().split()[:3]
    res = measure_abuse(int(_SHARDS.value[0]), _DB.value, _WORK.value)
    res["settings"] = {"db": _DB.value, "num_queries": _NQ.value, "k": _K.value,
                       "concurrency": _CONC.value, "seconds_per_phase": _SECONDS.value,
                       "timeout_s": _TIMEOUT.value}
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                      "loadavg_before": load_before,
                      "loadavg_after": open("/proc/loadavg").read().split()[:3],
                      "note": "shared, loaded 2-core machine: compare ratios within this run"}
    res["measured_at_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    res["provenance"] = run_provenance("bench.service_latency")
    os.makedirs(os.path.dirname(_ABUSE_OUT.value), exist_ok=True)
    with open(_ABUSE_OUT.value, "w") as f:
      json.dump(res, f, indent=1)
    print(json.dumps(res["summary"], indent=1))
    return
  os.makedirs(_WORK.value, exist_ok=True)
  load_before = open("/proc/loadavg").read().split()[:3]
  t0 = time.time()
  results = {"settings": {"db": _DB.value, "num_queries": _NQ.value, "k": _K.value,
                          "concurrency": _CONC.value, "seconds": _SECONDS.value,
                          "batch": _BATCH.value, "kill_after": _KILL_AFTER.value,
                          "kill_seconds": _KILL_SECONDS.value, "timeout_s": _TIMEOUT.value,
                          "server": "--search_threads=1 --workers=4, ScaNN default IndexConfig",
                          "queries": "database chunk embeddings (seed 0), own document excluded"},
             "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "loadavg_before": load_before},
             "runs": []}
  for n in [int(x) for x in _SHARDS.value]:
    results["runs"].append(measure(n, _DB.value, _WORK.value))
  results["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
  results["wall_seconds"] = time.time() - t0
  results["measured_at_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
  results["provenance"] = run_provenance("bench.service_latency")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps({r["num_shards"]: {"p50_ms_1_in_flight":
                                      r["single_one_in_flight"]["latency_ms"]["p50"],
                                      "p50_ms": r["single"]["latency_ms"]["p50"],
                                      "p99_ms": r["single"]["latency_ms"]["p99"],
                                      "qps_single": r["single"]["queries_per_s"],
                                      "qps_batched": r["batched"]["queries_per_s"],
                                      "wrong": sum(r[p]["wrong"] for p in (
                                          "single_one_in_flight", "single", "batched")),
                                      "tie_order_differs": sum(r[p]["ok_tie_order_differs"] for p in (
                                          "single_one_in_flight", "single", "batched")),
                                      "kill_wrong": r["kill"]["all"]["wrong"],
                                      "kill_errors": r["kill"]["all"]["unavailable_errors"]}
                    for r in results["runs"]}, indent=1))


if __name__ == "__main__":
  app.run(main)
