"""The client half of the retrieval service: fan out to every shard process, merge a global top-k.

    from retro_jax.retrieval.client import ServiceRetriever
    with ServiceRetriever(["127.0.0.1:50051", "127.0.0.1:50052"], timeout_s=5.0) as r:
      ids_QxK, scores_QxK = r.search(queries_QxD, k, exclude_doc_ids_Q)   # as Retriever.search

`ServiceRetriever.search` has the in-process `retro_jax.retrieval.retriever.Retriever.search`
interface and result: each shard process (`retro_jax.retrieval.serve`) returns its shard's exact
top-k (over-fetched, rescored exactly, same-document exclusion, removed documents dropped); the
client merges them by (score descending, id ascending), the in-process retriever's order, so the
ids equal the in-process retriever's over the same shards.

Every shard is queried at once (gRPC futures) under one deadline. A shard that is down, too slow or
answering for another shard raises `ShardUnavailableError` naming the shard number and address --
never a result silently missing a shard. With `allow_partial=True` (per call or per client) the
answer merges the shards that did reply and a `PartialResultsWarning` names the missing ones
(`search_full(...).missing` lists them too).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retro_jax.errors import UserError
from retro_jax.retrieval import fingerprint as fingerprint_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import service_pb2, service_pb2_grpc
from retro_jax.retrieval.shard_server import CHANNEL_OPTIONS, SERVICE_NAME, Limits


class ShardUnavailableError(UserError, RuntimeError):
  """One or more shards did not answer (down, past the deadline, or serving something else).

  `failures` is a list of (shard number or None, address, reason)."""

  def __init__(self, failures: Sequence[tuple[int | None, str, str]], fix: str = ""):
    self.failures = list(failures)
    names = "; ".join(f"shard {'?' if s is None else s} at {a}: {why}" for s, a, why in failures)
    fix = fix or ("restart the shard's server (`python -m retro_jax.retrieval.serve --db=DIR "
                  "--shard=I --port=P`) or pass allow_partial=True to accept results without it")
    super().__init__(f"Retrieval service: {len(self.failures)} shard(s) failed -- {names}. {fix}.")


RELOAD_COMMAND = "python -m retro_jax.retrieval.serve --reload="


class StaleShardError(UserError, RuntimeError):
  """Shards that serve other database content than the database now holds (edited since they
  loaded it: `edit_db --add`), or than each other. `problems`: (shard number, address, why)."""

  def __init__(self, problems: Sequence[tuple["ShardClient", str]], addresses: Sequence[str],
               db: str | None = None):
    self.problems = [(c.shard, c.address, why) for c, why in problems]
    names = "; ".join(f"shard {s} at {a}: {why}" for s, a, why in self.problems)
    super().__init__(
        f"Retrieval service: {len(self.problems)} shard(s) serve other content than "
        f"{db or 'the database'} (edited since they loaded it?) -- {names}. Reload them: "
        f"`{RELOAD_COMMAND}{','.join(addresses)}` (or restart them); their answers would miss "
        "what the edit added.")


class ShardMismatchError(UserError, RuntimeError):
  """Shards that do not fit together (overlapping ranges, other dims, other deletions)."""


class PartialResultsWarning(UserWarning):
  """Results were merged without some shards (allow_partial=True)."""


class StaleResultsWarning(UserWarning):
  """Results were merged from shards serving stale content (allow_partial=True)."""


@dataclasses.dataclass
class SearchResult:
  ids_QxK: np.ndarray     # int64 global chunk ids, -1 pads
  scores_QxK: np.ndarray  # float32 exact dot products, -inf pads
  doc_ids_QxK: np.ndarray  # int64 document of each id, -1 pads
  missing: list[tuple[int | None, str, str]]  # shards left out (allow_partial only)


def merge_top_k(ids_QxC: np.ndarray, scores_QxC: np.ndarray, docs_QxC: np.ndarray, k: int):
  """Top k per row by score descending then id ascending (as `index.top_k_rows`), docs aligned."""
  q, c = ids_QxC.shape
  order = np.lexsort((ids_QxC, -scores_QxC), axis=1)[:, :k]
  ids = np.take_along_axis(ids_QxC, order, axis=1)
  scores = np.take_along_axis(scores_QxC, order, axis=1).astype(np.float32)
  docs = np.take_along_axis(docs_QxC, order, axis=1)
  if c < k:
    ids = np.concatenate([ids, np.full((q, k - c), -1, np.int64)], axis=1)
    scores = np.concatenate([scores, np.full((q, k - c), -np.inf, np.float32)], axis=1)
    docs = np.concatenate([docs, np.full((q, k - c), -1, np.int64)], axis=1)
  empty = np.isneginf(scores)
  return (np.where(empty, -1, ids).astype(np.int64), scores,
          np.where(empty, -1, docs).astype(np.int64))


class ShardClient:
  """One shard's channel: `search_future`, `info`, `health`."""

  def __init__(self, address: str, shard: int | None = None):
    self.address = address
    self.shard = shard  # learned from Info when not given
    self.info: service_pb2.ShardInfo | None = None
    self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    self.stub = service_pb2_grpc.ShardSearchStub(self.channel)
    self.health_stub = health_pb2_grpc.HealthStub(self.channel)

  def fetch_info(self, timeout_s: float, wait_for_ready: bool = True) -> service_pb2.ShardInfo:
    info = self.stub.Info(service_pb2.InfoRequest(), timeout=timeout_s,
                          wait_for_ready=wait_for_ready)
    if self.shard is not None and info.shard != self.shard:
      raise ShardMismatchError(f"{self.address} serves shard {info.shard}, expected shard "
                               f"{self.shard}; fix the address list.")
    self.shard, self.info = int(info.shard), info
    return info

  def search_future(self, queries_QxD: np.ndarray, k: int, exclude_Q: np.ndarray | None,
                    timeout_s: float) -> grpc.Future:
    req = service_pb2.SearchRequest(
        num_queries=queries_QxD.shape[0], dim=queries_QxD.shape[1],
        queries=np.ascontiguousarray(queries_QxD, "<f4").tobytes(), k=k,
        exclude_doc_ids=(b"" if exclude_Q is None
                         else np.ascontiguousarray(exclude_Q, "<i8").tobytes()))
    return self.stub.Search.future(req, timeout=timeout_s)

  def health(self, timeout_s: float = 2.0) -> str:
    """"SERVING", "NOT_SERVING", or "UNREACHABLE (<code>)"."""
    try:
      r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                 timeout=timeout_s)
    except grpc.RpcError as e:
      return f"UNREACHABLE ({e.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

  def close(self) -> None:
    self.channel.close()


class ServiceRetriever:
  """`search(queries_QxD, k, exclude_doc_ids_Q) -> (ids_QxK int64, scores_QxK float32)` over shard
  processes, like `Retriever.search`.

  Args:
    addresses: "host:port" of every shard's server, or {shard number: address}.
    timeout_s: deadline of each search (all shards are asked at once).
    allow_partial: default for `search`: False raises `ShardUnavailableError` on a missing shard
      and `StaleShardError` on a shard serving other content than the database; True merges the
      shards that answered and warns (`PartialResultsWarning`, `StaleResultsWarning`).
    connect_timeout_s: how long the constructor waits for every shard's Info (a server whose
      process is starting is waited for; one that answers "still loading" is not).
    db: the database the caller uses (e.g. `sample --db`): each shard's content fingerprint must
      be this database's (read from its manifests at connect, and again whenever an answer
      differs). Without it, a shard is still stale when the database it reads has changed since
      it loaded, and the shards must agree with each other.
  """

  def __init__(self, addresses: Sequence[str] | Mapping[int, str], timeout_s: float = 10.0,
               allow_partial: bool = False, connect_timeout_s: float = 60.0,
               db: str | os.PathLike | None = None):
    items = (list(addresses.items()) if isinstance(addresses, Mapping)
             else [(None, a) for a in addresses])
    if not items:
      raise ValueError("ServiceRetriever needs at least one shard address.")
    self.clients = [ShardClient(a, s) for s, a in items]
    self.timeout_s = timeout_s
    self.allow_partial = allow_partial
    self.db = None if db is None else os.fspath(db)
    self._expected = ""  # the database's fingerprint as last read (with db)
    futs = [(c, c.stub.Info.future(service_pb2.InfoRequest(), timeout=connect_timeout_s,
                                   wait_for_ready=True)) for c in self.clients]
    failures = []
    for c, f in futs:
      try:
        info = f.result()
      except grpc.RpcError as e:
        why = (f"no answer within {connect_timeout_s:.3g} s (not running, or not reachable from "
               "here)" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
               else f"{e.code().name}: {e.details()}")
        failures.append((c.shard, c.address, why))
        continue
      if c.shard is not None and info.shard != c.shard:
        self.close()
        raise ShardMismatchError(f"{c.address} serves shard {info.shard}, expected {c.shard}.")
      c.shard, c.info = int(info.shard), info
    if failures and not allow_partial:
      self.close()
      raise ShardUnavailableError(failures)
    if failures:
      warnings.warn(f"Retrieval service: shards not reachable at connect: {failures}",
                    PartialResultsWarning, stacklevel=2)
    try:  # stale content first: its message says what to do about shards that differ
      same = self._check_content([(c, c.info) for c in self.clients if c.info is not None],
                                 allow_partial, stacklevel=3)
      self._check_layout(same_index=same)
      self._check_coverage(allow_partial, stacklevel=3)
    except UserError:
      self.close()
      raise

  def _check_layout(self, same_index: bool) -> None:
    """Shards that fit together (one index, no overlapping ranges, one dim); the shard numbers
    that no answering process serves (`unserved`)."""
    up = sorted((c for c in self.clients if c.info is not None), key=lambda c: c.info.offset)
    glob = [c for c in up if c.info.backend == index_lib.GLOBAL_BACKEND]
    if glob:  # serving shards of one global index: ids anywhere, one shard number each
      if len(glob) != len(up) or (same_index and len({c.info.index_sha256 for c in glob}) != 1):
        raise ShardMismatchError("Serving shards of different indexes (or a global index mixed "
                                 "with per-shard ones); serve one index.")
      if len({c.info.shard for c in glob}) != len(glob):
        raise ShardMismatchError("A serving shard of the global index is listed twice; serve "
                                 "each shard once.")
    ranged = [] if glob else up
    for a, b in zip(ranged, ranged[1:]):
      if a.info.offset + a.info.count > b.info.offset:
        raise ShardMismatchError(f"Shards {a.shard} ({a.address}) and {b.shard} ({b.address}) "
                                 "cover overlapping chunk ids; serve each shard once.")
    dims = {c.info.dim for c in up}
    if len(dims) > 1:
      raise ShardMismatchError(f"Shards hold different embedding sizes {sorted(dims)}.")
    self.dim = dims.pop() if dims else None
    self.num_db_shards = max((int(c.info.num_shards) for c in up), default=0)
    self.unserved = sorted(set(range(self.num_db_shards)) - {int(c.info.shard) for c in up})

  def _check_coverage(self, allow_partial: bool, stacklevel: int) -> None:
    """Every shard of the database answers for: a shard the database has and no address serves
    (one added by `edit_db --add` with a per-shard backend) is an error, or a warning."""
    if not self.unserved:
      return
    db = self.db or "DB"
    fix = ("start " + ", ".join(f"`python -m retro_jax.retrieval.serve --db={db} --shard={s}`"
                                for s in self.unserved[:3])
           + (" ..." if len(self.unserved) > 3 else "") + " and pass its address too")
    why = f"none of the addresses serves it (the database has {self.num_db_shards} shards)"
    if not allow_partial:
      raise ShardUnavailableError([(s, "(no address)", why) for s in self.unserved], fix=fix)
    warnings.warn(f"Retrieval service: results without shard(s) {self.unserved}: {why}; {fix}.",
                  PartialResultsWarning, stacklevel=stacklevel)

  def _content_problems(self, infos) -> list[tuple[ShardClient, str]]:
    """(client, why) of each shard whose content is not the database's (small string compares;
    the database's fingerprint is read again only when something differs)."""
    def problems():
      out = []
      for c, i in infos:
        if i.fingerprint != i.db_fingerprint:
          out.append((c, f"loaded {fingerprint_lib.short(i.fingerprint)}, the database it reads "
                         f"is now {fingerprint_lib.short(i.db_fingerprint)}"))
        elif self._expected and i.fingerprint != self._expected:
          out.append((c, f"serves {fingerprint_lib.short(i.fingerprint)}, {self.db} is "
                         f"{fingerprint_lib.short(self._expected)}"))
      if not out and len({i.fingerprint for _, i in infos}) > 1:
        out = [(c, f"serves {fingerprint_lib.short(i.fingerprint)}") for c, i in infos]
      return out
    out = problems()
    if (out or not self._expected) and self.db is not None and infos:
      # Edited since the last read (and maybe reloaded): what the database holds now.
      self._expected = fingerprint_lib.fingerprint(self.db, infos[0][1].backend)
      out = problems()
    return out

  def _check_content(self, infos, allow_partial: bool, stacklevel: int) -> bool:
    """True when every shard serves the database's content; else raises, or warns and returns
    False (allow_partial)."""
    problems = self._content_problems(infos)
    if not problems:
      return True
    err = StaleShardError(problems, [c.address for c in self.clients], self.db)
    if not allow_partial:
      raise err
    warnings.warn(str(err), StaleResultsWarning, stacklevel=stacklevel)
    return False

  max_k = Limits.max_k

  @staticmethod
  def _rows_per_request(k: int, dim: int, overfetch: int = 4, query_block: int = 512) -> int:
    """Queries per request that keep it within the default shard_server.Limits."""
    limits, rows = Limits(), Limits.max_queries
    while rows > 1 and limits.work_bytes(rows, k, dim, overfetch, query_block) > \
        limits.max_work_bytes:
      rows //= 2
    return rows

  @property
  def size(self) -> int:
    """Chunks over the shards that answered at connect."""
    return sum(int(c.info.count) for c in self.clients if c.info is not None)

  def health(self, timeout_s: float = 2.0) -> dict[str, str]:
    """{address: "SERVING" | "NOT_SERVING" | "UNREACHABLE (...)"} of every shard."""
    return {c.address: c.health(timeout_s) for c in self.clients}

  def search(self, queries_QxD: np.ndarray, k: int, exclude_doc_ids_Q: np.ndarray | None = None,
             *, allow_partial: bool | None = None,
             timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k by exact dot product; ids int64 (-1 pads), scores float32 (-inf pads)."""
    r = self.search_full(queries_QxD, k, exclude_doc_ids_Q, allow_partial=allow_partial,
                         timeout_s=timeout_s)
    return r.ids_QxK, r.scores_QxK

  def search_full(self, queries_QxD: np.ndarray, k: int,
                  exclude_doc_ids_Q: np.ndarray | None = None, *,
                  allow_partial: bool | None = None,
                  timeout_s: float | None = None) -> SearchResult:
    """As `search`, plus each result's document id and the shards left out."""
    allow_partial = self.allow_partial if allow_partial is None else allow_partial
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    queries_QxD = np.ascontiguousarray(queries_QxD, np.float32)
    if queries_QxD.ndim != 2 or (self.dim is not None and queries_QxD.shape[1] != self.dim):
      raise ValueError(f"queries have shape {queries_QxD.shape}; expected [Q, {self.dim}].")
    if k < 1:
      raise ValueError(f"k={k} must be >= 1.")
    q = queries_QxD.shape[0]
    if exclude_doc_ids_Q is not None:
      exclude_doc_ids_Q = np.asarray(exclude_doc_ids_Q, np.int64)
      if exclude_doc_ids_Q.shape != (q,):
        raise ValueError(f"exclude_doc_ids_Q has shape {exclude_doc_ids_Q.shape}; expected ({q},).")
    if k > self.max_k:
      raise ValueError(f"k={k} is above the service's bound of {self.max_k} per query.")
    rows = self._rows_per_request(k, queries_QxD.shape[1])
    if q > rows:  # Within the shards' per-request bounds (shard_server.Limits).
      parts = [self.search_full(queries_QxD[i:i + rows], k, None if exclude_doc_ids_Q is None
                                else exclude_doc_ids_Q[i:i + rows], allow_partial=allow_partial,
                                timeout_s=timeout_s) for i in range(0, q, rows)]
      return SearchResult(np.concatenate([p.ids_QxK for p in parts]),
                          np.concatenate([p.scores_QxK for p in parts]),
                          np.concatenate([p.doc_ids_QxK for p in parts]),
                          [m for p in parts for m in p.missing])
    futs = [(c, c.search_future(queries_QxD, k, exclude_doc_ids_Q, timeout_s))
            for c in self.clients]
    parts, failures, deletions, answered, relayout = [], [], {}, [], False
    for c, f in futs:
      try:
        resp = f.result()
      except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
          raise ValueError(f"shard {c.shard} at {c.address} rejected the query: {e.details()}")
        why = ("no answer within the deadline of %.3g s" % timeout_s
               if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
               else f"{e.code().name}: {e.details()}")
        failures.append((c.shard, c.address, why))
        continue
      if (c.info is not None and resp.shard.shard == c.info.shard
          and resp.shard.fingerprint != c.info.fingerprint):
        c.info = service_pb2.ShardInfo()  # reloaded since: its count or range may differ now
        c.info.CopyFrom(resp.shard)
        relayout = True
      problem = self._check_response(c, resp, q, k)
      if problem:
        failures.append((c.shard, c.address, problem))
        continue
      answered.append((c, resp.shard))
      deletions.setdefault(resp.shard.deletions_sha256, []).append(c.shard)
      parts.append((np.frombuffer(resp.ids, "<i8").reshape(q, k),
                    np.frombuffer(resp.scores, "<f4").reshape(q, k),
                    np.frombuffer(resp.doc_ids, "<i8").reshape(q, k)))
    if len(deletions) > 1:
      raise ShardMismatchError(
          f"Shards disagree on the removed documents (deletions.json sha256 -> shards: "
          f"{ {h[:12] or 'none': s for h, s in deletions.items()} }); they serve different "
          "copies of the database. Point every shard at the same --db.")
    if failures and (not allow_partial or not parts):
      raise ShardUnavailableError(failures)
    self._check_content(answered, allow_partial, stacklevel=3)
    if relayout:
      self._check_layout(same_index=False)  # the fingerprints above say whether they agree
    self._check_coverage(allow_partial, stacklevel=3)
    if failures:
      warnings.warn(f"Retrieval service: results without {len(failures)} shard(s): "
                    + "; ".join(f"shard {s} at {a} ({why})" for s, a, why in failures),
                    PartialResultsWarning, stacklevel=3)
    ids, scores, docs = merge_top_k(np.concatenate([p[0] for p in parts], 1),
                                    np.concatenate([p[1] for p in parts], 1),
                                    np.concatenate([p[2] for p in parts], 1), k)
    return SearchResult(ids, scores, docs, failures)

  @staticmethod
  def _check_response(c: ShardClient, resp, q: int, k: int) -> str | None:
    """A reason to distrust a response (wrong shard, ids outside its range), or None."""
    if resp.num_queries != q or resp.k != k or len(resp.ids) != q * k * 8:
      return f"malformed answer ({resp.num_queries} x {resp.k}, expected {q} x {k})"
    if c.info is not None and (resp.shard.shard != c.info.shard
                               or resp.shard.offset != c.info.offset
                               or resp.shard.count != c.info.count):
      return (f"now serves shard {resp.shard.shard} [{resp.shard.offset}, "
              f"{resp.shard.offset + resp.shard.count}), connected as shard {c.info.shard}")
    ids = np.frombuffer(resp.ids, "<i8")
    if resp.shard.backend == index_lib.GLOBAL_BACKEND:  # a serving shard's ids lie anywhere
      return None
    lo, hi = int(resp.shard.offset), int(resp.shard.offset + resp.shard.count)
    bad = (ids >= 0) & ((ids < lo) | (ids >= hi))
    if bad.any():
      return f"returned ids outside its range [{lo}, {hi})"
    return None

  def close(self) -> None:
    for c in self.clients:
      c.close()

  def __enter__(self) -> "ServiceRetriever":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# A reload loads the whole shard again (and verifies its checksums): minutes for a large one.
RELOAD_TIMEOUT_S = 3600.0


def reload_shards(addresses: Sequence[str],
                  timeout_s: float = RELOAD_TIMEOUT_S) -> list[service_pb2.ShardInfo]:
  """Asks every shard process to reload the database (the Reload RPC, all at once; an address
  with no process fails at once); returns their new ShardInfo, or raises ShardUnavailableError
  naming the ones that did not reload (they still serve what they served)."""
  clients = [ShardClient(a) for a in addresses]
  try:
    futs = [(c, c.stub.Reload.future(service_pb2.ReloadRequest(), timeout=timeout_s))
            for c in clients]
    infos, failures = [], []
    for c, f in futs:
      try:
        infos.append(f.result())
      except grpc.RpcError as e:
        failures.append((None, c.address, f"{e.code().name}: {e.details()}"))
    if failures:
      raise ShardUnavailableError(failures, fix=(
          "check the address, or start the shard's server (`python -m retro_jax.retrieval.serve "
          "--db=DIR --shard=I`)" + ("; the others reloaded" if infos else "")))
    return infos
  finally:
    for c in clients:
      c.close()
