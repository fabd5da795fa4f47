r"""Bits-per-byte on held-out documents, retrieval on / off / shuffled, with the leakage filter.

Documents: the database's held-out documents (recorded in its manifest, never retrieved during
training). Each is scored on its own in windows of `seq_len` tokens starting every `stride` tokens
(the paper: 2048 / 1024): the first window scores all its tokens, each later one only the tokens no
earlier window scored, so every token but the document's first is predicted once, with at least
seq_len - stride tokens of context. Windows start on chunk boundaries. A scored token gets its
preceding chunk's neighbours through CCA only if that chunk is in its window: with stride <=
seq_len - chunk_size (`stride=0` picks seq_len - chunk_size) every scored chunk but each
document's first has them; with stride = seq_len the first chunk of every later window (a quarter
of the tokens at 256 / 64) is scored without retrieval. `scored_tokens_without_retrieval` reports
the fraction (the documents' first chunks, which never have a preceding chunk, left out).

Retrieval: for each held-out chunk, its 10 (or `num_neighbours`, if more) nearest chunks among
training documents only (held-out documents, hence the chunk's own, and removed ones are excluded),
queried with the database's stored embedding of the chunk. `--retriever` picks who searches:
`exact` (default: exact dot product streamed over the stored embeddings), `index` (the in-process
`Retriever` over the database's ANN index, as sampling uses it), or `service` (the gRPC shard
processes at `--service=HOST:PORT,...`, `python -m retro_jax.retrieval.serve`). `db_fraction` < 1
keeps a seeded random subset of the training documents as the retrieval database (the paper's
database-size axis). Chunk u's first `num_neighbours` neighbours (chunk + continuation,
`neighbour_len` tokens) feed the model.

Bits-per-byte: summed token losses in bits over the UTF-8 bytes of the text (each chunk's detokenised
text), per chunk, so that chunks can be filtered.
Leakage filter (the paper's Sec. 4.4): for each chunk C, s = the longest common
contiguous token substring between C and any of its 10 nearest training neighbours (each the
neighbour chunk plus its continuation, padding never matching), r(C) = s / chunk_size;
bpb(alpha) = sum of losses / sum of bytes over chunks with r(C) <= alpha. The filter depends on the
data only, so models compared at the same alpha are scored on the same chunks.

Modes: `on` (each chunk's own neighbours), `off` (no neighbours: CCA is the identity), `shuffled`
(each chunk gets the neighbours of a seeded random chunk of another held-out document, the control
of retro_jax.evaluation.controls), `shuffled_source` (of another held-out document of the same
source), `same_document` (of another chunk of the same document, far enough away; defined for
long enough documents only, and compared on those), and `baseline` (a second model, retrieval
off). Every mode's bpb is split by the overlap bins of r(C) (`bins`) and of the overlap with the
neighbours the model is given, those of the preceding chunk (`bins_given`, `given_overlap`), and
every difference (on - off, on - shuffled, on - baseline, ...) gets a 95% interval from a paired
bootstrap over documents, overall and in each bin of both kinds.

Sharding: the model is restored onto a mesh (`mesh`, default every device data-parallel; the
`--mesh` flag) in the training layout, and each batch of windows is split over the batch axes
(`eval_step.EvalStep`); the batch size is rounded up to a multiple of the batch shards (the extra
windows repeat the last one and are not scored).

Output: JSON (bpb per mode, bpb(alpha) on a grid of alpha, chunk counts, bpb per overlap bin, the
differences with intervals, each chunk's loss) and a PNG of bpb(alpha).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time
from typing import Any, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from retro_jax.build.neighbours import search_block
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, npy_rows, verify
from retro_jax.db.chunk_store import ChunkStore
from retro_jax.db.prepare import load_db_tokenizer
from retro_jax.errors import UserError
from retro_jax.evaluation import controls
from retro_jax.evaluation.modes import DIFFERENCES, MODE_SETS, MODES
from retro_jax.training.eval_step import EvalStep
from retro_jax.model import placement
from retro_jax.model.partitioning import make_mesh
from retro_jax.retrieval.client import ServiceRetriever
from retro_jax.retrieval.retriever import Retriever, db_embedding_rows, db_embedding_shards
from retro_jax.training import checkpoint as ckpt_lib

FILTER_NEIGHBOURS = 10


class EvalError(UserError, ValueError):
  """Bad evaluation settings (stride, sequence length) or a database that cannot serve them."""


# ------------------------------------------------------------------------------------------------
# The held-out set and its retrieval (model independent).

@dataclasses.dataclass
class HeldOut:
  """Held-out documents as token arrays plus per-chunk facts; chunk c of the set is row c."""
  doc_tokens: list[np.ndarray]   # per document, its tokens (trailing pad removed)
  doc_first_row: np.ndarray      # per document, its first row in the chunk arrays below
  chunk_ids_C: np.ndarray        # global chunk ids
  chunk_bytes_C: np.ndarray      # UTF-8 bytes of each chunk's text
  neighbours_CxN: np.ndarray     # int64 nearest training chunks (N >= 10), -1 where none
  leakage_C: np.ndarray          # r(C) in [0, 1]
  doc_keys: list[str] | None = None  # per document, its key (sources for `shuffled_source`)


def training_doc_mask(store, db_fraction: float, seed: int = 0) -> np.ndarray:
  """bool per document: retrievable (a training document in the kept fraction)."""
  if not 0 < db_fraction <= 1:
    raise EvalError(f"db_fraction={db_fraction} must be in (0, 1].")
  keep = ~store.doc_heldout
  deleted = np.asarray(store.deleted_doc_ids(), np.int64)
  if len(deleted):  # documents removed from the database (retro_jax.build.edit) are never retrieved
    keep = keep.copy()
    keep[deleted] = False
  if db_fraction < 1:
    # Nested subsets: a document kept at fraction f is kept at every larger fraction.
    u = np.random.default_rng(seed).random(store.num_docs)
    keep &= u < db_fraction
  return keep


def exact_neighbours(store, db_dir: str, query_ids_Q: np.ndarray, k: int, allowed_doc_D: np.ndarray,
                     block: int = 32768) -> np.ndarray:
  """Top-k chunk ids by exact dot product of stored embeddings among chunks of allowed documents.

  Streams the embedding shards in blocks (memory-mapped, or ranged reads on gs://; never the
  whole database in RAM).
  """
  embs = [(npy_rows.open_rows(p), off) for _, p, off in db_embedding_shards(db_dir)]
  q_QxD = db_embedding_rows(db_dir, query_ids_Q)
  best_s = np.full((len(q_QxD), k), -np.inf, np.float32)
  best_i = np.full((len(q_QxD), k), -1, np.int64)
  for emb_NxD, off in embs:
    for s in range(0, emb_NxD.shape[0], block):
      e = np.asarray(emb_NxD[s:s + block], np.float32)
      ids = np.arange(off + s, off + s + len(e), dtype=np.int64)
      ok = allowed_doc_D[store.doc_ids(ids)]
      if not ok.any():
        continue
      sc = q_QxD @ e[ok].T
      cand_i = np.broadcast_to(ids[ok], sc.shape)
      all_s = np.concatenate([best_s, sc], 1)
      all_i = np.concatenate([best_i, cand_i], 1)
      top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else \
          np.broadcast_to(np.arange(all_s.shape[1]), (len(all_s), all_s.shape[1]))
      best_s = np.take_along_axis(all_s, top, 1)
      best_i = np.take_along_axis(all_i, top, 1)
  order = np.argsort(-best_s, axis=1, kind="stable")
  best_i = np.take_along_axis(best_i, order, 1)
  best_s = np.take_along_axis(best_s, order, 1)
  return np.where(np.isfinite(best_s), best_i, -1)


def searched_neighbours(searcher, store, db_dir: str, query_ids_Q: np.ndarray, k: int,
                        allowed_doc_D: np.ndarray) -> np.ndarray:
  """Top-k chunk ids among chunks of allowed documents from a searcher (the in-process `Retriever`
  over the database's index, or the gRPC `ServiceRetriever`), queried with the chunks' stored
  embeddings: the training neighbours' own search (`neighbours.search_block`: the query's document
  excluded by the searcher, the disallowed ones dropped, short rows fetched again)."""
  query_ids_Q = np.asarray(query_ids_Q, np.int64)
  return search_block(searcher, store, db_embedding_rows(db_dir, query_ids_Q), query_ids_Q, k,
                      np.flatnonzero(~allowed_doc_D).astype(np.int64))


def longest_common_substrings(chunks_CxM: np.ndarray, nbrs_CxNxR: np.ndarray,
                              pad_id: int) -> np.ndarray:
  """Vectorised over chunks and neighbours: dynamic programming along the chunk's tokens."""
  C, M = chunks_CxM.shape
  _, N, R = nbrs_CxNxR.shape
  prev = np.zeros((C, N, R + 1), np.int32)
  best = np.zeros(C, np.int32)
  for i in range(M):
    a = chunks_CxM[:, i][:, None, None]
    eq = (nbrs_CxNxR == a) & (a != pad_id) & (nbrs_CxNxR != pad_id)
    cur = np.zeros_like(prev)
    cur[:, :, 1:] = np.where(eq, prev[:, :, :-1] + 1, 0)
    best = np.maximum(best, cur.reshape(C, -1).max(1))
    prev = cur
  return best


def load_heldout(store, db_dir: str, *, db_fraction: float = 1.0, k: int = FILTER_NEIGHBOURS,
                 neighbour_len: int = 128, max_docs: int | None = None, seed: int = 0,
                 searcher=None) -> HeldOut:
  """Held-out chunks with their neighbours: exact search, or `searcher` (`searched_neighbours`)."""
  tokenizer = load_db_tokenizer(db_dir)  # SentencePiece or byte-level BPE
  docs = np.asarray(store.heldout_doc_ids, np.int64)
  if max_docs:
    docs = docs[:max_docs]
  if not len(docs):
    raise EvalError(f"{db_dir} has no held-out documents (heldout_fraction=0 at build time).")
  m, pad = store.chunk_size, store.pad_id
  doc_tokens, first_row, ids, rows = [], [], [], 0
  keys = [store.doc_key(int(d)) for d in docs]
  for d in docs:
    first, n = int(store.doc_first_chunk[d]), int(store.doc_num_chunks[d])
    cid = np.arange(first, first + n, dtype=np.int64)
    toks = np.asarray(store.tokens(cid)).reshape(-1)
    nz = np.flatnonzero(toks != pad)
    doc_tokens.append(toks[:nz[-1] + 1] if len(nz) else toks[:0])
    first_row.append(rows)
    rows += len(cid)
    ids.append(cid)
  chunk_ids = np.concatenate(ids)
  texts = store.chunk_text(chunk_ids, tokenizer)
  chunk_bytes = np.array([len(t.encode("utf-8")) for t in texts], np.int64)
  allowed = training_doc_mask(store, db_fraction, seed)
  if searcher is None:
    nbrs = exact_neighbours(store, db_dir, chunk_ids, k, allowed)
  else:
    nbrs = searched_neighbours(searcher, store, db_dir, chunk_ids, k, allowed)
  nbr_tok = np.asarray(store.neighbour_tokens(np.where(nbrs >= 0, nbrs, 0).reshape(-1),
                                              neighbour_len)).reshape(*nbrs.shape, neighbour_len)
  nbr_tok = np.where(nbrs[..., None] >= 0, nbr_tok, pad)
  chunk_tok = np.asarray(store.tokens(chunk_ids))
  lcs = longest_common_substrings(chunk_tok, nbr_tok[:, :FILTER_NEIGHBOURS], pad)
  return HeldOut(doc_tokens, np.asarray(first_row, np.int64), chunk_ids, chunk_bytes, nbrs,
                 lcs / m, keys)


def given_neighbours(held: HeldOut, num_neighbours: int) -> np.ndarray:
  """int64 [C, num_neighbours]: the neighbours chunk c is given when it is predicted, those of the
  preceding chunk c - 1 of its document; -1 for a document's first chunk, which is given none."""
  C = len(held.chunk_ids_C)
  first = np.zeros(C, bool)
  first[held.doc_first_row] = True
  given = held.neighbours_CxN[np.where(first, 0, np.arange(C) - 1), :num_neighbours]
  return np.where(first[:, None], -1, given)


def given_overlap(held: HeldOut, store, num_neighbours: int, neighbour_len: int) -> np.ndarray:
  """float [C]: overlap of each chunk with what the model is given when predicting it
  (`given_neighbours`, each the chunk + continuation): the longest common token substring over the
  chunk size; 0 for a document's first chunk."""
  given = given_neighbours(held, num_neighbours)
  flat = given.reshape(-1)
  toks = np.asarray(store.neighbour_tokens(np.where(flat >= 0, flat, 0), neighbour_len))
  toks = np.where(flat[:, None] >= 0, toks, store.pad_id)
  toks = toks.reshape(len(given), num_neighbours, neighbour_len)
  chunk_tok = np.asarray(store.tokens(held.chunk_ids_C))
  return longest_common_substrings(chunk_tok, toks, store.pad_id) / store.chunk_size


# ------------------------------------------------------------------------------------------------
# Windows and scoring.

@dataclasses.dataclass
class Window:
  doc: int
  start: int       # first input token (a chunk boundary)
  score_from: int  # first target index (absolute in the document) this window scores


def resolve_stride(seq_len: int, stride: int, chunk_size: int) -> int:
  """`stride`, or for 0 the largest that gives every scored chunk its preceding chunk's
  neighbours: seq_len - chunk_size (seq_len when the window is a single chunk)."""
  return stride if stride else max(chunk_size, seq_len - chunk_size)


def scored_tokens_without_retrieval(doc_lengths: Sequence[int], seq_len: int, stride: int,
                                    chunk_size: int) -> float:
  """Fraction of the scored targets outside each document's first chunk whose window lacks the
  preceding chunk (input position < chunk_size - 1: CCA gives it no neighbours)."""
  m, missing, total = chunk_size, 0, 0
  for w in make_windows(doc_lengths, seq_len, stride, chunk_size):
    n = doc_lengths[w.doc]
    lo, hi = max(0, w.score_from - w.start - 1), min(seq_len, n - 1 - w.start)
    total += max(0, hi - lo) - (min(n - 1, m - 1) if w.start == 0 else 0)
    if w.start > 0:
      missing += max(0, min(hi, m - 1) - lo)
  return missing / total if total else 0.0


def make_windows(doc_lengths: Sequence[int], seq_len: int, stride: int, chunk_size: int
                 ) -> list[Window]:
  if stride <= 0 or stride > seq_len:
    raise EvalError(f"stride={stride} must be in (0, seq_len={seq_len}].")
  if stride % chunk_size or seq_len % chunk_size:
    raise EvalError(f"seq_len={seq_len} and stride={stride} must be multiples of the chunk size "
                    f"{chunk_size} (windows start on chunk boundaries).")
  out = []
  for d, n in enumerate(doc_lengths):
    if n < 2:
      continue
    s, score_from = 0, 1
    while True:
      out.append(Window(d, s, score_from))
      if s + seq_len >= n - 1:
        break
      score_from = s + seq_len + 1
      s += stride
  return out


def window_batch(held: HeldOut, wins: Sequence[Window], seq_len: int, chunk_size: int,
                 num_neighbours: int, store, neighbour_len: int, pad_id: int, with_nbrs: bool,
                 neighbours_CxN: np.ndarray | None = None):
  """One batch of windows; chunk c's neighbours are row c of `neighbours_CxN` (default: its own,
  held.neighbours_CxN; the shuffled control passes another chunk's)."""
  nbrs_CxN = held.neighbours_CxN if neighbours_CxN is None else neighbours_CxN
  B, T, m = len(wins), seq_len, chunk_size
  L = T // m
  inputs = np.full((B, T), pad_id, np.int32)
  targets = np.full((B, T), pad_id, np.int32)
  scored = np.zeros((B, T), bool)
  chunk_row = np.full((B, T), -1, np.int64)  # held-out chunk row of each target
  nbr_ids = np.full((B, L, num_neighbours), -1, np.int64)
  for b, w in enumerate(wins):
    toks = held.doc_tokens[w.doc]
    n = len(toks)
    x = toks[w.start:w.start + T]
    inputs[b, :len(x)] = x
    y = toks[w.start + 1:w.start + T + 1]
    targets[b, :len(y)] = y
    t_abs = w.start + 1 + np.arange(T)
    scored[b] = (t_abs >= w.score_from) & (t_abs < n)
    chunk_row[b] = np.where(t_abs < n, held.doc_first_row[w.doc] + t_abs // m, -1)
    nchunks_doc = (n + m - 1) // m
    for u in range(L):
      c = w.start // m + u
      if c < nchunks_doc:
        nbr_ids[b, u] = nbrs_CxN[held.doc_first_row[w.doc] + c, :num_neighbours]
  batch = {"inputs": inputs, "targets": targets, "scored": scored, "chunk_row": chunk_row}
  if with_nbrs:
    flat = nbr_ids.reshape(-1)
    toks = np.asarray(store.neighbour_tokens(np.where(flat >= 0, flat, 0), neighbour_len))
    toks = toks.reshape(B, L, num_neighbours, neighbour_len)
    batch["neighbours"] = np.where(nbr_ids[..., None] >= 0, toks, pad_id).astype(np.int32)
  return batch


def make_loss_fn(model, mesh: Mesh | None = None) -> EvalStep:
  """The model's per-token loss on `mesh` (default: every device, data-parallel): called with
  (inputs, targets, neighbours) host arrays, returns numpy nats [B, T]; `.batch_ways()` is the
  number of shards a batch is split into."""
  mesh = make_mesh((-1, 1, 1)) if mesh is None else mesh
  graphdef, state = nnx.split(model)
  rules = model.config.sharding_rules
  step = EvalStep(graphdef, mesh, rules)
  params = placement.place(state, mesh, rules)  # no copy where the weights are there already

  def loss_fn(inputs, targets, neighbours):
    return step(params, inputs, targets, neighbours)
  loss_fn.batch_ways = step.batch_ways
  return loss_fn


def chunk_losses(model, cfg, held: HeldOut, store, *, seq_len: int, stride: int,
                 num_neighbours: int, retrieval: bool, batch_size: int = 8,
                 progress: bool = True, desc: str = "eval",
                 neighbours_CxN: np.ndarray | None = None,
                 mesh: Mesh | None = None) -> np.ndarray:
  """Summed loss in nats of the targets in each held-out chunk (neighbours: `window_batch`), on
  `mesh` (`make_loss_fn`)."""
  model.eval()
  wins = make_windows([len(t) for t in held.doc_tokens], seq_len, stride, cfg.chunk_size)
  if retrieval and not cfg.retrieval:
    raise EvalError("retrieval on asked of a model without CCA layers (a baseline).")
  if retrieval and num_neighbours > held.neighbours_CxN.shape[1]:
    raise EvalError(f"num_neighbours={num_neighbours} > the {held.neighbours_CxN.shape[1]} "
                    "retrieved per chunk; load the held-out set with a larger k.")
  loss_fn = make_loss_fn(model, mesh)
  ways = loss_fn.batch_ways()
  batch_size = -(-batch_size // ways) * ways  # every batch shard gets the same number of windows
  out = np.zeros(len(held.chunk_ids_C), np.float64)
  for i in tqdm(range(0, len(wins), batch_size), desc=desc, unit="batch", disable=not progress):
    group = wins[i:i + batch_size]
    group = group + [group[-1]] * (batch_size - len(group))  # one compiled shape
    b = window_batch(held, group, seq_len, cfg.chunk_size, num_neighbours, store,
                     cfg.neighbour_len, cfg.pad_id, retrieval, neighbours_CxN)
    nll = loss_fn(b["inputs"], b["targets"], b.get("neighbours"))
    real = np.arange(batch_size) < len(wins[i:i + batch_size])
    sel = b["scored"] & real[:, None]
    np.add.at(out, b["chunk_row"][sel], nll[sel])
  return out


ALPHAS = tuple(i / 64 for i in range(65))


def summarise(loss_C: np.ndarray, held: HeldOut, alphas: Sequence[float] = ALPHAS) -> dict:
  curve, counts = {}, {}
  for a in alphas:
    keep = held.leakage_C <= a + 1e-9
    curve[f"{a:.4f}"] = controls.bpb(loss_C, held.chunk_bytes_C, keep)
    counts[f"{a:.4f}"] = int(keep.sum())
  return {"bpb": controls.bpb(loss_C, held.chunk_bytes_C), "bpb_alpha": curve,
          "chunks_alpha": counts}


def bpb_at(result: dict, alpha: float) -> float:
  """bpb(alpha) at the largest grid point <= alpha."""
  keys = sorted(result["bpb_alpha"], key=float)
  best = [k for k in keys if float(k) <= alpha + 1e-9][-1]
  return result["bpb_alpha"][best]


def plot(results: dict[str, dict], path: str, title: str = "", min_chunks: int = 20) -> None:
  """bpb(alpha) curves: results maps a label to a `summarise` dict."""
  matplotlib.use("Agg")
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, r in results.items():
    # Thresholds that keep too few chunks to measure anything are left out.
    total = max(r["chunks_alpha"].values())
    xs = [x for x in sorted(r["bpb_alpha"], key=float)
          if r["chunks_alpha"][x] >= max(min_chunks, 0.01 * total)]
    ax.plot([float(x) for x in xs], [r["bpb_alpha"][x] for x in xs], label=label)
  ax.axvline(0.125, color="grey", lw=0.8, ls="--")
  ax.set_xlabel("max chunk overlap with its 10 nearest neighbours, alpha")
  ax.set_ylabel("bits per byte on chunks with r(C) <= alpha")
  ax.set_title(title or "Leakage-filtered bpb")
  ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()  # through epath: `path` may be gs://
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  epath.Path(path).write_bytes(buf.getvalue())


def parse_modes(retrieval: str | Sequence[str]) -> tuple[str, ...]:
  """'all' | 'both' | one mode | a sequence of modes -> the modes, in MODES order."""
  names = MODE_SETS.get(retrieval, (retrieval,)) if isinstance(retrieval, str) else retrieval
  names = [m for n in names for m in MODE_SETS.get(n, (n,))]
  bad = sorted(set(names) - set(MODES))
  if bad or not names:
    raise EvalError(f"retrieval={retrieval!r}; expected 'all', 'both' or modes of {MODES}.")
  return tuple(m for m in MODES if m in names)


def mode_rows(held: HeldOut, mode: str, shuffle_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(perm int64 [C], defined bool [C]): chunk row c is given row perm[c]'s neighbours in `mode`
  (on: its own; shuffled: a chunk of another held-out document, `controls.shuffled_rows`;
  shuffled_source: of another document of the same source, `controls.same_source_rows`;
  same_document: another chunk of its own document, `controls.same_document_rows`, defined for
  the chunks of long enough documents only)."""
  C = len(held.chunk_ids_C)
  doc_C = controls.doc_of_row(held.doc_first_row, C)
  every = np.ones(C, bool)
  if mode in ("on", "off"):
    return np.arange(C, dtype=np.int64), every
  if mode == "shuffled":
    return controls.shuffled_rows(doc_C, shuffle_seed), every
  if mode == "shuffled_source":
    if held.doc_keys is None:
      raise EvalError("the shuffled_source control needs the held-out documents' keys.")
    sources = [controls.source_of_key(k) for k in held.doc_keys]
    return controls.same_source_rows(doc_C, sources, shuffle_seed)[0], every
  if mode == "same_document":
    return controls.same_document_rows(doc_C)
  raise EvalError(f"unknown retrieval mode {mode!r}; expected one of {MODES}")


def mode_neighbours(held: HeldOut, mode: str, shuffle_seed: int = 0) -> np.ndarray | None:
  """int64 [C, N]: the neighbours chunk row c is given in `mode` (None for off): row perm[c]'s of
  `mode_rows`."""
  if mode == "off":
    return None
  return held.neighbours_CxN[mode_rows(held, mode, shuffle_seed)[0]]


def skipped_controls(modes: Sequence[str], num_docs: int) -> dict[str, str]:
  """The controls of `modes` that the held-out set cannot serve, each with the reason: the
  shuffled ones take neighbours from another held-out document."""
  if num_docs >= 2:
    return {}
  return {m: f"it takes neighbours from another held-out document and there is {num_docs}"
          for m in modes if m in ("shuffled", "shuffled_source")}


def evaluate(path: str, *, step: int | None = None, db: str | None = None, seq_len: int = 2048,
             stride: int = 1024, num_neighbours: int | None = None,
             retrieval: str | Sequence[str] = "all", db_fraction: float = 1.0,
             batch_size: int = 8, max_docs: int | None = None, held: HeldOut | None = None,
             progress: bool = True, retriever: str = "exact", service: Sequence[str] = (),
             backend: str | None = None, baseline: str | None = None, baseline_step: int | None = None,
             shuffle_seed: int = 0, keep_chunk_losses: bool = True,
             service_timeout_s: float = 10.0, mesh: Mesh | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint at `path` (a workdir), and the `baseline` workdir's (retrieval off)
  on the same chunks when given, sharded over `mesh` (default: every device, data-parallel);
  returns the JSON-able results."""
  if num_neighbours is not None and num_neighbours < 1:
    raise EvalError(f"--num_neighbours={num_neighbours} must be >= 1 (omit it for the model's).")
  mesh = make_mesh((-1, 1, 1)) if mesh is None else mesh
  model, cfg, info = ckpt_lib.load_model(path, step, mesh=mesh)
  db = db or info["db"]
  layout.db_root(db)  # reachable (gs://) and a directory, before anything reads it
  verify.check_checkpoint_tokenizer(info.get("db_tokenizer"), info["db"], db, info["path"])
  store = chunk_store_lib.ChunkStore.open(db)
  k = num_neighbours or cfg.num_neighbours
  modes = parse_modes(retrieval)
  if not cfg.retrieval:
    modes = ("off",)
  stride = resolve_stride(seq_len, stride, cfg.chunk_size)
  t0 = time.time()
  source = "precomputed HeldOut" if held is not None else retriever
  if held is None:
    with open_searcher(retriever, db, service, backend, service_timeout_s) as searcher:
      held = load_heldout(store, db, db_fraction=db_fraction, k=max(FILTER_NEIGHBOURS, k),
                          neighbour_len=cfg.neighbour_len, max_docs=max_docs, searcher=searcher)
  t_retrieve = time.time() - t0
  out = {"checkpoint": info["path"], "step": info["step"], "db": db, "db_fraction": db_fraction,
         "retriever": source,
         "seq_len": seq_len, "stride": stride, "num_neighbours": k,
         "retrieval_model": cfg.retrieval, "mesh": dict(mesh.shape),
         "num_docs": len(held.doc_tokens),
         "num_chunks": int(len(held.chunk_ids_C)), "num_bytes": int(held.chunk_bytes_C.sum()),
         "retrieve_seconds": t_retrieve, "shuffle_seed": shuffle_seed,
         "scored_tokens_without_retrieval": scored_tokens_without_retrieval(
             [len(t) for t in held.doc_tokens], seq_len, stride, cfg.chunk_size),
         "overlap_bins": [list(b) for b in controls.OVERLAP_BINS], "results": {}}
  doc_C = controls.doc_of_row(held.doc_first_row, len(held.chunk_ids_C))
  out["skipped_modes"] = skipped_controls(modes, len(np.unique(doc_C)))
  for mode, why in out["skipped_modes"].items():
    print(f"evaluate: the {mode} control is skipped: {why}", file=sys.stderr, flush=True)
  modes = tuple(m for m in modes if m not in out["skipped_modes"])
  rows = {m: mode_rows(held, m, shuffle_seed) for m in modes}  # (perm, defined) per mode
  defined = {m: d for m, (_, d) in rows.items()}
  if "shuffled" in modes:
    out["shuffled_same_document"] = controls.same_document_fraction(doc_C, rows["shuffled"][0])
  if "shuffled_source" in modes:
    src_C = np.asarray([controls.source_of_key(k) for k in held.doc_keys], object)[doc_C]
    out["shuffled_source_same_source"] = float(np.mean(src_C[rows["shuffled_source"][0]] == src_C))
  if "same_document" in modes:
    out["same_document_defined_chunks"] = int(defined["same_document"].sum())
  losses = {}
  for mode in modes:
    losses[mode] = chunk_losses(model, cfg, held, store, seq_len=seq_len, stride=stride,
                                num_neighbours=k, retrieval=mode != "off", batch_size=batch_size,
                                progress=progress, desc=f"retrieval {mode}",
                                neighbours_CxN=mode_neighbours(held, mode, shuffle_seed),
                                mesh=mesh)
  if baseline:
    base_model, base_cfg, base_info = ckpt_lib.load_model(baseline, baseline_step, mesh=mesh)
    out["baseline"] = {"checkpoint": base_info["path"], "step": base_info["step"]}
    losses["baseline"] = chunk_losses(base_model, base_cfg, held, store, seq_len=seq_len,
                                      stride=stride, num_neighbours=k, retrieval=False,
                                      batch_size=batch_size, progress=progress, desc="baseline",
                                      mesh=mesh)
  given_C = given_overlap(held, store, k, cfg.neighbour_len)
  out["given_overlap_bins"] = {n: int(m.sum()) for n, m in controls.bin_masks(given_C).items()}
  for mode, loss_C in losses.items():
    out["results"][mode] = summarise(loss_C, held)
    out["results"][mode]["bins"] = controls.bpb_by_bin(loss_C, held.chunk_bytes_C,
                                                       held.leakage_C)
    out["results"][mode]["bins_given"] = controls.bpb_by_bin(loss_C, held.chunk_bytes_C, given_C)
  pairs = [(a, b) for a, b in DIFFERENCES if a in losses and b in losses]

  def mask(a, b):  # a control defined for some chunks only is compared on those
    return defined.get(a, np.ones(len(doc_C), bool)) & defined.get(b, np.ones(len(doc_C), bool))
  out["differences"] = {
      f"{a}-{b}": controls.compare(losses[a], losses[b], held.chunk_bytes_C, doc_C,
                                   held.leakage_C, mask_C=mask(a, b)) for a, b in pairs}
  # The same differences binned by the overlap with what the model was given.
  out["differences_given"] = {
      f"{a}-{b}": controls.compare(losses[a], losses[b], held.chunk_bytes_C, doc_C, given_C,
                                   mask_C=mask(a, b)) for a, b in pairs}
  if keep_chunk_losses:  # nats per chunk row, so that later runs can be compared to these
    out["chunk_loss_nats"] = {m: np.round(v, 5).tolist() for m, v in losses.items()}
    out["chunk_given_overlap"] = np.round(given_C, 5).tolist()
  return out


RETRIEVERS = ("exact", "index", "service")


@contextlib.contextmanager
def open_searcher(kind: str, db: str, service: Sequence[str] = (), backend: str | None = None,
                  service_timeout_s: float = 10.0):
  """None for `exact`; the in-process Retriever over DB's index; or a ServiceRetriever (closed on
  exit) over the shard processes at `service` (it checks they serve DB's shards)."""
  if kind not in RETRIEVERS:
    raise EvalError(f"retriever={kind!r}; expected one of {RETRIEVERS}")
  if kind == "exact":
    yield None
  elif kind == "index":
    yield Retriever.from_db(db, backend=backend, doc_ids=ChunkStore.open(db).doc_ids)
  else:
    if not service:
      raise EvalError("--retriever=service needs --service=HOST:PORT[,HOST:PORT...] (the shard "
                      "processes of python -m retro_jax.retrieval.serve)")
    # (stale shards are an error)
    with ServiceRetriever(list(service), db=db, timeout_s=service_timeout_s,
                          connect_timeout_s=service_timeout_s) as searcher:
      yield searcher
