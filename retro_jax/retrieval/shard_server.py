r"""One index shard served over gRPC: the server half of the retrieval service (schema: service.proto).

The command is `python -m retro_jax.retrieval.serve`. Loads `DB/index/<backend>/shard-I` (checksums verified) over `DB/embeddings/shard-I.npy`, and
answers `ShardSearch.Search` with this shard's exact top-k (the in-process `Retriever` restricted to
the one shard: over-fetch, exact rescoring, same-document exclusion, removed documents dropped), plus
each result's document id. `retro_jax.retrieval.client.ServiceRetriever` fans out to every shard's
process and merges, giving the same ids as the in-process `Retriever` over all shards.

* Binds to 127.0.0.1 unless `--host` says otherwise (`--host=0.0.0.0` to serve other machines; the
  service has no authentication, so only on a trusted network). `--port=0` picks a free port;
  `--port_file` receives `{"address", "shard", "pid"}` (atomically) once the shard is serving.
* Bounds (`Limits`): k, queries per request, request bytes and the search's estimated working
  memory; a request beyond them is refused (INVALID_ARGUMENT / RESOURCE_EXHAUSTED) before any
  work, and so are NaN or infinite queries. The port is bound without SO_REUSEPORT: a second server
  on a port in use fails to start instead of sharing the port.
* Health: the standard `grpc.health.v1.Health` service reports NOT_SERVING while the shard loads and
  SERVING once it is loaded and has answered a warm-up query (service name "" and
  `retro_jax.retrieval.ShardSearch`); Search answers UNAVAILABLE until then.
* Removed documents (`python -m retro_jax.edit_db --remove_docs=...` writes
  `DB/chunks/deletions.json`) take effect without a restart: the file is checked (stat) before every
  search and reloaded when it changed.
* Added documents (`edit_db --add`) are not: each process serves what it loaded. Every Info and
  Search answer carries the content fingerprint it loaded (retro_jax/retrieval/fingerprint.py) and
  the database's now (re-read when a manifest's stat changes; no file is hashed per request), so
  a client sees a stale shard and says so. The operator picks an edit up with one command,
  `python -m retro_jax.retrieval.serve --reload=HOST:PORT,...` (the Reload RPC: each process
  loads the database again while still answering from the old copy, then swaps; twice the
  shard's memory meanwhile); a shard added by the edit (per-shard backends) needs its own process.
* The global index (`DB/index/global`, the default): `--shard=S` serves serving shard S (its
  partitions); each query is routed to its nearest partitions and answered from those this shard
  holds (ShardInfo: offset 0, count = the vectors it holds, backend "global"); the client merges
  the serving shards' answers as the in-process `Retriever` merges them.
* `--index_root` serves a shard of another index directory (e.g. the benchmark's re-sharded copy);
  its embeddings are then the ones named in the shard's manifest, its offset the manifest's.
SIGTERM / SIGINT: health goes NOT_SERVING, in-flight searches get 2 s to finish, the process exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import grpc
import numpy as np
from etils import epath
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.db.layout import write_json_atomic
from retro_jax.errors import UserError
from retro_jax.retrieval import fingerprint as fingerprint_lib
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval import service_pb2, service_pb2_grpc

SERVICE_NAME = "retro_jax.retrieval.ShardSearch"
GLOBAL = index_lib.GLOBAL_BACKEND
MAX_MESSAGE_BYTES = 256 << 20  # a 4096 x 384 float32 query block is 6 MiB (gRPC's default cap: 4)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one Search request may ask of a shard; beyond it the request is refused before any work.

  max_k: results per query (INVALID_ARGUMENT above it; the training neighbours use 2, evaluation
    10-40, and the neighbours' refill of removed documents grows k by doubling up to this).
  max_queries: queries per request (INVALID_ARGUMENT).
  max_request_bytes: a request's size, checked by gRPC itself (RESOURCE_EXHAUSTED).
  max_work_bytes: the search's working memory, estimated from queries x k x overfetch (the exact
    rescoring gathers query_block x candidates x dim float32 rows; results are int64 + float32):
    RESOURCE_EXHAUSTED above it, so no request can take the shard's memory.
  """
  max_k: int = 4096
  max_queries: int = 8192
  max_request_bytes: int = 32 << 20
  max_work_bytes: int = 512 << 20

  def work_bytes(self, q: int, k: int, dim: int, overfetch: int, query_block: int) -> int:
    n = k * overfetch
    return min(q, query_block) * n * dim * 4 + q * n * (8 + 4) * 3


def server_options(limits: Limits) -> list[tuple[str, int]]:
  """gRPC server options: bounded request size, and no SO_REUSEPORT (a second server on a port in
  use must fail to bind, not silently share the port's connections)."""
  return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
          ("grpc.max_receive_message_length", limits.max_request_bytes),
          ("grpc.so_reuseport", 0)]


class ServeError(UserError, RuntimeError):
  """A shard that cannot be served (missing index, mismatched database)."""


class ShardServicer(service_pb2_grpc.ShardSearchServicer):
  """Searches one index shard; thread-safe (gRPC calls it from a pool of worker threads)."""

  def __init__(self, db_dir: str, shard: int, backend: str | None = None,
               index_root: str | None = None, verify: bool = True, overfetch: int = 4,
               search_threads: int = 1, address: str = "", limits: Limits = Limits()):
    self.db_dir, self.shard_number, self.address = str(db_dir), int(shard), address
    self.limits, self.overfetch = limits, overfetch
    self._lock = threading.Lock()
    if index_root is None and retriever_lib.db_backend(self.db_dir, backend) == GLOBAL:
      self._watch_content(GLOBAL, None, global_lib.index_dir(self.db_dir) / layout.MANIFEST)
      self.store = self._open_store()
      self._init_global(overfetch, verify)
      return
    if index_root is None:
      backend = retriever_lib.db_backend(self.db_dir, backend)
      found = retriever_lib.db_embedding_shards(self.db_dir, lambda i: i == self.shard_number)
      if not found:
        num_shards = chunk_store_lib.ChunkStore.open(self.db_dir).num_shards
        raise ServeError(f"{self.db_dir} has no shard {self.shard_number} (chunk-store shards: "
                         f"0..{num_shards - 1}); pick one of those for --shard.")
      _, emb_path, offset = found[0]
      shard_path = str(layout.index_shard_dir(layout.index_dir(self.db_dir, backend),
                                               self.shard_number))
    else:
      emb_path, offset = None, None
      shard_path = str(layout.index_shard_dir(index_root, self.shard_number))
    if not epath.Path(shard_path).is_dir():
      raise ServeError(f"Index shard {shard_path} does not exist; build it with `python -m "
                       f"retro_jax.build_db --db={self.db_dir} --backend={backend} --stages=index`.")
    if index_root is not None:
      backend = index_lib.read_manifest(shard_path)["config"]["backend"]
    self._watch_content(backend, index_root, epath.Path(shard_path) / index_lib.MANIFEST)
    self.store = self._open_store()
    index_shard = index_lib.load_shard(shard_path, emb_path, verify=verify)
    if offset is not None and index_shard.offset != offset:
      raise ServeError(f"Index shard {shard_path} was built for offset {index_shard.offset} but "
                       f"the database puts shard {self.shard_number} at {offset}; rebuild it.")
    if hasattr(index_shard, "set_num_threads"):
      index_shard.set_num_threads(search_threads)
    self.index_shard = index_shard
    self.index_sha256 = layout.sha256_file(os.path.join(shard_path, index_lib.MANIFEST))
    self.retriever = retriever_lib.Retriever([index_shard], doc_ids=self.store.doc_ids,
                                             overfetch=overfetch)
    self.num_shards = self.store.num_shards if index_root is None else 0
    self._deletions_stat = None
    self.deletions_sha256, self.num_deleted_docs = "", 0
    self._refresh_deletions()

  def _init_global(self, overfetch: int, verify: bool) -> None:
    """Serving shard `shard` of the global index: its partitions, every query routed to them."""
    manifest = global_lib.read_manifest(global_lib.index_dir(self.db_dir))
    have = global_lib.serving_shard_ids(manifest)
    if self.shard_number not in have:
      raise ServeError(f"The global index of {self.db_dir} has serving shards {have}; pick one of "
                       "those for --shard.")
    self.retriever = retriever_lib.Retriever.from_global_index(
        self.db_dir, serving=[self.shard_number], verify=verify, doc_ids=self.store.doc_ids,
        overfetch=overfetch)
    self.index_shard = self.retriever.shards[0]
    self.index_sha256 = layout.sha256_file(global_lib.index_dir(self.db_dir) / layout.MANIFEST)
    self.num_shards = len(have)
    self._deletions_stat = None
    self.deletions_sha256, self.num_deleted_docs = "", 0
    self._refresh_deletions()

  def _open_store(self) -> chunk_store_lib.ChunkStore:
    """The chunk store with its shard list read now: the process serves one snapshot (a list
    read lazily after an edit would not fit the totals read at open)."""
    store = chunk_store_lib.ChunkStore.open(self.db_dir)
    store.shard_offsets  # noqa: B018 (reads and checks the shard list)
    return store

  # -- the content served, and the database's now ----------------------------------------------
  def _watch_content(self, backend: str, index_root: str | None, index_manifest) -> None:
    """Records the database's content fingerprint before the shard is loaded (an edit while it
    loads then shows as stale: a false alarm at worst, never a missed edit) and the manifests
    whose change means the database may hold other content now."""
    self._fingerprint_args = (self.db_dir, backend, index_root)
    self._watched = [os.fspath(layout.chunks_dir(self.db_dir) / layout.MANIFEST),
                     os.fspath(index_manifest)]
    self._watch_seen = self._watch_key()
    self.fingerprint = fingerprint_lib.fingerprint(*self._fingerprint_args)
    self.db_fingerprint = self.fingerprint

  def _watch_key(self) -> tuple:
    """(mtime, size, inode) of each watched manifest; on gs:// (no cheap stat) the current
    30-second period, so the fingerprint is re-read at most twice a minute there."""
    key = []
    for path in self._watched:
      if "://" in path:
        key.append(int(time.monotonic() // 30))
        continue
      try:
        st = os.stat(path)
        key.append((st.st_mtime_ns, st.st_size, st.st_ino))
      except FileNotFoundError:  # being rewritten by an edit
        key.append(None)
    return tuple(key)

  def _refresh_fingerprint(self) -> None:
    """Re-reads the database's fingerprint when a watched manifest changed (a stat per search)."""
    key = self._watch_key()
    if key == self._watch_seen:
      return
    with self._lock:
      if key == self._watch_seen:
        return
      try:
        self.db_fingerprint = fingerprint_lib.fingerprint(*self._fingerprint_args)
      except (UserError, OSError, ValueError, KeyError) as e:  # an edit half done: not ours
        self.db_fingerprint = f"unreadable ({type(e).__name__})"
      self._watch_seen = key

  # -- removed documents ------------------------------------------------------------------------
  def _refresh_deletions(self) -> None:
    """Reloads DB/chunks/deletions.json when its (mtime, size, inode) changed since the last look."""
    path = os.fspath(self.store.deletions_path)
    try:
      st = os.stat(path)
      key = (st.st_mtime_ns, st.st_size, st.st_ino)
    except FileNotFoundError:
      key = None
    if key == self._deletions_stat:
      return
    with self._lock:
      if key == self._deletions_stat:
        return
      self.retriever.set_deleted_ranges(self.store.deleted_chunk_ranges())
      self.num_deleted_docs = int(self.store.deleted_doc_ids().size)
      self.deletions_sha256 = layout.sha256_file(path) if key is not None else ""
      self._deletions_stat = key

  # -- RPCs -------------------------------------------------------------------------------------
  def info(self) -> service_pb2.ShardInfo:
    return service_pb2.ShardInfo(
        shard=self.shard_number, offset=self.index_shard.offset, count=self.index_shard.count,
        dim=self.retriever.dim, backend=getattr(self.index_shard.config, "backend", GLOBAL),
        index_sha256=self.index_sha256, num_deleted_docs=self.num_deleted_docs,
        deletions_sha256=self.deletions_sha256, address=self.address,
        fingerprint=self.fingerprint, db_fingerprint=self.db_fingerprint,
        num_shards=self.num_shards)

  def _refresh(self, context) -> None:
    """The database's fingerprint and removed documents as they are now."""
    self._refresh_fingerprint()
    try:
      self._refresh_deletions()
    except UserError as e:  # e.g. a removal of a document added after this shard loaded
      stale = self.fingerprint != self.db_fingerprint
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e) + (
          f"; this shard serves older content than {self.db_dir}: reload it "
          f"(`python -m retro_jax.retrieval.serve --reload={self.address}`)" if stale else ""))

  def Info(self, request, context):  # noqa: N802 (gRPC method name)
    self._refresh(context)
    return self.info()

  def Search(self, request, context):  # noqa: N802
    q, d, k = int(request.num_queries), int(request.dim), int(request.k)
    problem = None
    if d != self.retriever.dim:
      problem = f"queries have dim {d}; shard {self.shard_number} holds dim {self.retriever.dim}"
    elif q < 0 or len(request.queries) != q * d * 4:
      problem = f"queries hold {len(request.queries)} bytes, expected {q} x {d} float32"
    elif k < 1 or k > self.limits.max_k:
      problem = f"k={k} must be in [1, {self.limits.max_k}]"
    elif q > self.limits.max_queries:
      problem = f"{q} queries in one request; at most {self.limits.max_queries} (split the batch)"
    elif request.exclude_doc_ids and len(request.exclude_doc_ids) != q * 8:
      problem = f"exclude_doc_ids hold {len(request.exclude_doc_ids)} bytes, expected {q} int64"
    if problem:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
    work = self.limits.work_bytes(q, k, d, self.overfetch, self.retriever.query_block)
    if work > self.limits.max_work_bytes:
      context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{q} queries x k={k} need ~{work >> 20} MiB of search memory, more than this "
                    f"shard's {self.limits.max_work_bytes >> 20} MiB per request; send fewer "
                    f"queries or a smaller k")
    queries_QxD = np.frombuffer(request.queries, "<f4").reshape(q, d)
    if not np.isfinite(queries_QxD).all():
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, "queries hold NaN or infinite values")
    self._refresh(context)
    exclude_Q = (np.frombuffer(request.exclude_doc_ids, "<i8") if request.exclude_doc_ids
                 else None)
    ids_QxK, scores_QxK = self.retriever.search(queries_QxD, k, exclude_Q)
    docs_QxK = np.full(ids_QxK.shape, -1, np.int64)
    valid = ids_QxK >= 0
    docs_QxK[valid] = self.store.doc_ids(ids_QxK[valid])
    return service_pb2.SearchResponse(
        num_queries=q, k=k, ids=ids_QxK.astype("<i8").tobytes(),
        scores=scores_QxK.astype("<f4").tobytes(), doc_ids=docs_QxK.astype("<i8").tobytes(),
        shard=self.info())


class _Gate(service_pb2_grpc.ShardSearchServicer):
  """Answers UNAVAILABLE until the real servicer is loaded, then forwards to it; Reload loads a
  new one (`load()`) while the old one answers, then swaps them (searches in flight finish on the
  old one). One reload at a time; a failed one leaves the old servicer serving."""

  def __init__(self, load: Callable[[], "ShardServicer"] | None = None):
    self.target: ShardServicer | None = None
    self.load = load
    self._reload_lock = threading.Lock()

  def Search(self, request, context):  # noqa: N802
    if self.target is None:
      context.abort(grpc.StatusCode.UNAVAILABLE, "shard is still loading")
    return self.target.Search(request, context)

  def Info(self, request, context):  # noqa: N802
    if self.target is None:
      context.abort(grpc.StatusCode.UNAVAILABLE, "shard is still loading")
    return self.target.Info(request, context)

  def Reload(self, request, context):  # noqa: N802
    if self.target is None or self.load is None:
      context.abort(grpc.StatusCode.UNAVAILABLE, "shard is still loading")
    with self._reload_lock:
      t0 = time.perf_counter()
      try:
        new = self.load()
      except (UserError, OSError, ValueError) as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"reload failed, still serving what it loaded before: {e}")
      old, self.target = self.target, new
    print(f"[serve] shard {new.shard_number} reloaded in {time.perf_counter() - t0:.1f} s: "
          f"content {fingerprint_lib.short(old.fingerprint)} -> "
          f"{fingerprint_lib.short(new.fingerprint)}, {new.index_shard.count} chunks", flush=True)
    return new.info()


def serve(db_dir: str, shard: int, host: str = "127.0.0.1", port: int = 0,
          backend: str | None = None, index_root: str | None = None, port_file: str | None = None,
          workers: int = 4, search_threads: int = 1, overfetch: int = 4, verify: bool = True,
          stop_event: threading.Event | None = None, limits: Limits = Limits()) -> None:
  """Runs the server until SIGTERM / SIGINT (or `stop_event`)."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                       options=server_options(limits))

  def load() -> ShardServicer:  # at start, and again for each Reload
    servicer = ShardServicer(db_dir, shard, backend=backend, index_root=index_root, verify=verify,
                             overfetch=overfetch, search_threads=search_threads, address=address,
                             limits=limits)
    warm = np.zeros((1, servicer.retriever.dim), np.float32)
    warm[0, 0] = 1.0
    servicer.retriever.search(warm, 2)
    return servicer

  gate = _Gate(load)
  health = grpc_health.HealthServicer()
  for name in ("", SERVICE_NAME):
    health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
  service_pb2_grpc.add_ShardSearchServicer_to_server(gate, server)
  health_pb2_grpc.add_HealthServicer_to_server(health, server)
  host = f"[{host.strip('[]')}]" if ":" in host else host  # IPv6 literals in brackets
  try:
    bound = server.add_insecure_port(f"{host}:{port}")
  except RuntimeError:  # newer grpcio raises where older ones return 0
    bound = 0
  if bound == 0 or (port and bound != port):
    raise ServeError(f"could not bind {host}:{port} (in use by another process?); pick another "
                     f"--port, or --port=0 for a free one")
  address = f"{host}:{bound}"
  server.start()
  stop_event = stop_event or threading.Event()
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda *_: stop_event.set())
  t0 = time.perf_counter()
  servicer = gate.target = load()
  for name in ("", SERVICE_NAME):
    health.set(name, health_pb2.HealthCheckResponse.SERVING)
  print(f"[serve] shard {shard} ({servicer.index_shard.count} chunks from id "
        f"{servicer.index_shard.offset}, content {fingerprint_lib.short(servicer.fingerprint)}) "
        f"serving on {address} (pid {os.getpid()}) after {time.perf_counter() - t0:.1f} s",
        flush=True)
  if port_file:
    write_json_atomic(port_file, {"address": address, "shard": int(shard), "pid": os.getpid()})
  stop_event.wait()
  for name in ("", SERVICE_NAME):
    health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
  server.stop(grace=2.0).wait()


# ------------------------------------------------------------------------------------------------
# Starting shard processes (tests, benchmarks, a local deployment).


@dataclasses.dataclass
class ShardProcess:
  """A `serve` child process and the address it listens on."""
  shard: int
  address: str
  process: subprocess.Popen
  log_path: str

  def kill(self) -> None:
    """SIGKILL (a crash, as far as clients can tell)."""
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()

  def stop(self, timeout_s: float = 10.0) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.kill()


def served_shards(db_dir: str, backend: str | None = None) -> list[int]:
  """The `--shard` numbers that together serve the database: the global index's serving shards,
  or one per embeddings shard for the per-shard backends."""
  if retriever_lib.db_backend(db_dir, backend) == GLOBAL:
    manifest = global_lib.read_manifest(global_lib.index_dir(db_dir))
    return global_lib.serving_shard_ids(manifest)
  return [i for i, _, _ in retriever_lib.db_embedding_shards(db_dir)]


def start_shards(db_dir: str, shards: Sequence[int], workdir: str, host: str = "127.0.0.1",
                 backend: str | None = None, index_root: str | None = None,
                 extra_flags: Sequence[str] = (), timeout_s: float = 300.0,
                 env: dict | None = None) -> list[ShardProcess]:
  """Starts one `python -m retro_jax.retrieval.serve` per shard (free ports) and waits until each
  has written its port file (i.e. is SERVING). Logs go to `workdir/shard-XXXXX.log`."""
  os.makedirs(workdir, exist_ok=True)
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **(env or {})}
  procs = []
  try:
    for i in shards:
      port_file = os.path.join(workdir, f"shard-{i:05d}.addr.json")
      if os.path.exists(port_file):
        os.remove(port_file)
      log_path = os.path.join(workdir, f"shard-{i:05d}.log")
      cmd = [sys.executable, "-m", "retro_jax.retrieval.serve", f"--db={db_dir}", f"--shard={i}",
             f"--host={host}", "--port=0", f"--port_file={port_file}",
             *([f"--backend={backend}"] if backend else []),
             *([f"--index_root={index_root}"] if index_root else []), *extra_flags]
      with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
      procs.append(ShardProcess(i, "", p, log_path))
    deadline = time.monotonic() + timeout_s
    for sp in procs:
      port_file = os.path.join(workdir, f"shard-{sp.shard:05d}.addr.json")
      while not os.path.exists(port_file):
        if sp.process.poll() is not None:
          with open(sp.log_path) as f:
            tail = f.read()[-3000:]
          raise ServeError(f"Shard {sp.shard} server exited with {sp.process.returncode}; log "
                           f"{sp.log_path}:\n{tail}")
        if time.monotonic() > deadline:
          raise ServeError(f"Shard {sp.shard} server not serving after {timeout_s} s; see "
                           f"{sp.log_path}.")
        time.sleep(0.05)
      with open(port_file) as f:
        sp.address = json.load(f)["address"]
  except BaseException:
    for sp in procs:
      sp.kill()
    raise
  return procs
