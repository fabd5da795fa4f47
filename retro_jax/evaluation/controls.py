r"""Does the model use what it retrieves? The shuffled-neighbours control, overlap bins, intervals.

Shuffled control: chunk c of the held-out set is handed the neighbours retrieved for chunk
`perm[c]`, a seeded random chunk of ANOTHER held-out document (`shuffled_rows`; only when one
document holds over half the chunks do some get another chunk of their own, reported as
`shuffled_same_document`). The neighbours
stay real retrieved text of the same database, with the same statistics, only unrelated to the
chunk: a model that reads its neighbours scores worse than with its own (on < shuffled); a model
that merely got used to having some encoder input scores the same.

Two more controls hold topic and source fixed: `shuffled_source` gives chunk c the neighbours of a
chunk of another held-out document of the SAME source (`source_of_key`: kernel docs get kernel
docs' neighbours, whatever the version; `same_source_rows`), and `same_document` the neighbours of
another chunk of its OWN document, at least `SAME_DOCUMENT_GAP` chunks away in either direction
(`same_document_rows`: the neighbours of a chunk carry its continuation, so nearer chunks would
still hold the text to predict). A model that reads its neighbours beats both; one that only uses
the topic or style of its neighbours does not.

Overlap bins: the leakage statistic r(C) (longest common token substring between the chunk and its
10 nearest training neighbours, over the chunk size; `retro_jax.evaluation.bpb`) split into
`OVERLAP_BINS`: r <= 12.5% (the paper's leakage-filtered threshold), 12.5% < r < 50%, r >= 50%.
A model that copies from its neighbours gains most where they overlap most. The paper's r(C)
looks at the chunk's own 10 nearest neighbours; what the model is GIVEN when it predicts chunk c is
the first k neighbours of the preceding chunk c - 1 (chunk plus continuation), so the same bins
are also taken of `bpb.given_overlap` (0 for a document's first chunk, which gets no neighbours).

Intervals: a paired bootstrap over documents. bpb is a ratio (bits / bytes over the chunks), so a
resample draws documents with replacement (the same draw for both sides of a difference, since
both scored the same text) and recomputes both ratios; the interval is the 2.5 / 97.5 percentiles
of the difference over `NUM_RESAMPLES` draws of a fixed seed. Differences are a - b in bpb:
negative = a is better.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

NUM_RESAMPLES = 2000
OVERLAP_BINS = (("r<=12.5%", 0.0, 0.125), ("12.5%<r<50%", 0.125, 0.5), ("r>=50%", 0.5, 1.0))


class ControlError(ValueError):
  """A held-out set that cannot serve a control (e.g. a single document)."""


def doc_of_row(doc_first_row_D: np.ndarray, num_rows: int) -> np.ndarray:
  """int64 [C]: the held-out document index of each chunk row."""
  counts = np.diff(np.append(np.asarray(doc_first_row_D, np.int64), num_rows))
  return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def shuffled_rows(doc_C: np.ndarray, seed: int = 0) -> np.ndarray:
  """int64 [C]: a seeded permutation perm with perm[c] != c, and doc_C[perm[c]] != doc_C[c] for
  as many chunks as the documents' sizes allow (all unless one document holds more than half the
  chunks; then 2 * its chunks - C of them stay inside it, the fewest possible).

  The chunks are laid out document by document (documents in seeded random order, the largest
  first; chunks in seeded random order inside each) and each takes the row M places further on,
  cyclically, M = the largest document's chunk count: a document's block never reaches itself."""
  doc_C = np.asarray(doc_C, np.int64)
  n = len(doc_C)
  if n < 2 or len(np.unique(doc_C)) < 2:
    raise ControlError(f"the shuffled control needs chunks of at least 2 held-out documents; got "
                       f"{n} chunks of {len(np.unique(doc_C))}.")
  rng = np.random.default_rng(seed)
  docs, counts = np.unique(doc_C, return_counts=True)
  order = rng.permutation(len(docs))
  order = order[np.argsort(-counts[order], kind="stable")]  # largest first, ties in random order
  by_doc = np.argsort(doc_C, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  layout = np.concatenate([rng.permutation(by_doc[starts[d]:starts[d + 1]]) for d in order])
  shift = int(counts.max()) % n
  perm = np.empty(n, np.int64)
  perm[layout] = layout[(np.arange(n) + shift) % n]
  return perm


def source_of_key(key: str) -> str:
  """A document key's source: its prefix before ':' without a version suffix
  ('linux-doc-6.12:x.rst.txt' and 'linux-doc:y.rst.txt' are both 'linux-doc'); '' without one."""
  prefix = key.partition(":")[0] if ":" in key else ""
  return re.sub(r"-\d+(\.\d+)*$", "", prefix)


def same_source_rows(doc_C: np.ndarray, source_D: Sequence[str], seed: int = 0
                     ) -> tuple[np.ndarray, float]:
  """(perm int64 [C], fraction of chunks paired within their source): `shuffled_rows` inside each
  source (chunks of another held-out document of the same source). A source with a single
  held-out document cannot: its chunks are paired with chunks of other sources' documents (the
  plain shuffled control), and the fraction says how many chunks that left."""
  doc_C = np.asarray(doc_C, np.int64)
  src = np.asarray(source_D, dtype=object)[doc_C]
  perm = np.full(len(doc_C), -1, np.int64)
  for s in sorted(set(src.tolist())):
    rows = np.flatnonzero(src == s)
    if len(np.unique(doc_C[rows])) >= 2:
      perm[rows] = rows[shuffled_rows(doc_C[rows], seed)]
  rest = np.flatnonzero(perm < 0)
  if len(rest):
    if len(np.unique(doc_C[rest])) >= 2:
      perm[rest] = rest[shuffled_rows(doc_C[rest], seed)]
    else:  # one lone document left: borrow rows of the plain shuffled control
      perm[rest] = shuffled_rows(doc_C, seed)[rest]
  same = src[perm] == src
  return perm, float(np.mean(same)) if len(same) else 0.0


SAME_DOCUMENT_GAP = 3


def same_document_rows(doc_C: np.ndarray, gap: int = SAME_DOCUMENT_GAP
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(perm int64 [C], defined bool [C]): chunk c of a document of n chunks takes the row of its
  chunk (c + n // 2) mod n, at least `gap` chunks away both ways (so n >= 2 * gap). Chunks of
  shorter documents are not defined (perm[c] = c); compare them out with the mask."""
  doc_C = np.asarray(doc_C, np.int64)
  perm = np.arange(len(doc_C), dtype=np.int64)
  defined = np.zeros(len(doc_C), bool)
  for d in np.unique(doc_C):
    rows = np.flatnonzero(doc_C == d)
    n = len(rows)
    if n >= 2 * gap:
      perm[rows] = rows[(np.arange(n) + n // 2) % n]
      defined[rows] = True
  return perm, defined


def same_document_fraction(doc_C: np.ndarray, perm: np.ndarray) -> float:
  """Fraction of chunks paired with a chunk of their own document (0 unless one dominates)."""
  doc_C = np.asarray(doc_C)
  return float(np.mean(doc_C[perm] == doc_C)) if len(doc_C) else 0.0


def bin_masks(leakage_C: np.ndarray) -> dict[str, np.ndarray]:
  """name -> bool [C] of the chunks in each overlap bin (first bin closed at 0, last at 1)."""
  r = np.asarray(leakage_C)
  out = {}
  for i, (name, lo, hi) in enumerate(OVERLAP_BINS):
    if i == 0:
      out[name] = r <= hi + 1e-9
    elif i == len(OVERLAP_BINS) - 1:
      out[name] = r >= lo - 1e-9
    else:
      out[name] = (r > lo + 1e-9) & (r < hi - 1e-9)
  return out


def bpb(loss_C: np.ndarray, bytes_C: np.ndarray, mask_C: np.ndarray | None = None
        ) -> float | None:
  """Bits per byte of the chunks in mask_C (all by default): nats / ln 2 / bytes; None when they
  hold no bytes."""
  loss_C, bytes_C = np.asarray(loss_C), np.asarray(bytes_C)
  if mask_C is not None:
    loss_C, bytes_C = loss_C[mask_C], bytes_C[mask_C]
  nbytes = bytes_C.sum()
  return float(loss_C.sum() / math.log(2) / nbytes) if nbytes else None


def bpb_by_bin(loss_C: np.ndarray, bytes_C: np.ndarray, leakage_C: np.ndarray) -> dict:
  """name -> {"bpb", "chunks"} per overlap bin (bpb None for an empty bin)."""
  return {name: {"bpb": bpb(loss_C, bytes_C, m), "chunks": int(m.sum())}
          for name, m in bin_masks(leakage_C).items()}


def paired_bootstrap(loss_a_C: np.ndarray, loss_b_C: np.ndarray, bytes_C: np.ndarray,
                     doc_C: np.ndarray, mask_C: np.ndarray | None = None,
                     num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict:
  """bpb(a) - bpb(b) over the chunks in mask_C, with its 95% interval from resampling documents.

  Returns {"diff", "ci95": [lo, hi], "chunks", "docs", "excludes_zero"}; None values when no
  chunk is selected."""
  mask_C = np.ones(len(bytes_C), bool) if mask_C is None else np.asarray(mask_C, bool)
  doc_C = np.asarray(doc_C, np.int64)
  num_docs = int(doc_C.max()) + 1 if len(doc_C) else 0
  a_D = np.bincount(doc_C[mask_C], np.asarray(loss_a_C)[mask_C] / math.log(2), num_docs)
  b_D = np.bincount(doc_C[mask_C], np.asarray(loss_b_C)[mask_C] / math.log(2), num_docs)
  n_D = np.bincount(doc_C[mask_C], np.asarray(bytes_C, np.float64)[mask_C], num_docs)
  used = n_D > 0
  a_D, b_D, n_D = a_D[used], b_D[used], n_D[used]
  if not used.any():
    return {"diff": None, "ci95": [None, None], "chunks": 0, "docs": 0, "excludes_zero": False}
  diff = float(a_D.sum() / n_D.sum() - b_D.sum() / n_D.sum())
  rng = np.random.default_rng(seed)
  D = len(n_D)
  w_BxD = rng.multinomial(D, np.full(D, 1.0 / D), size=num_resamples).astype(np.float64)
  nbytes_B = w_BxD @ n_D
  d_B = (w_BxD @ a_D - w_BxD @ b_D) / nbytes_B
  lo, hi = (float(x) for x in np.percentile(d_B, [2.5, 97.5]))
  return {"diff": diff, "ci95": [lo, hi], "chunks": int(mask_C.sum()), "docs": int(D),
          "excludes_zero": bool(lo > 0 or hi < 0)}


def compare(loss_a_C: np.ndarray, loss_b_C: np.ndarray, bytes_C: np.ndarray, doc_C: np.ndarray,
            leakage_C: np.ndarray, seed: int = 0, mask_C: np.ndarray | None = None) -> dict:
  """`paired_bootstrap` on all chunks ("all") and in each overlap bin (of the chunks in mask_C,
  when given: a control defined for some chunks only)."""
  mask_C = np.ones(len(bytes_C), bool) if mask_C is None else np.asarray(mask_C, bool)
  out = {"all": paired_bootstrap(loss_a_C, loss_b_C, bytes_C, doc_C, mask_C, seed=seed)}
  for name, m in bin_masks(leakage_C).items():
    out[name] = paired_bootstrap(loss_a_C, loss_b_C, bytes_C, doc_C, m & mask_C, seed=seed)
  return out


def ratio_bootstrap(loss_ref_C: np.ndarray, loss_a_C: np.ndarray, loss_b_C: np.ndarray,
                    bytes_C: np.ndarray, doc_C: np.ndarray, mask_C: np.ndarray | None = None,
                    num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict:
  """R = (bpb(ref) - bpb(a)) / (bpb(ref) - bpb(b)) with a 95% interval from the same resampling
  of documents as `paired_bootstrap` (e.g. a retrofit's recovery of the from-scratch gain:
  ref = the baseline, a = the retrofit, b = RETRO from scratch). {"ratio", "ci95", "docs"}."""
  mask_C = np.ones(len(bytes_C), bool) if mask_C is None else np.asarray(mask_C, bool)
  doc_C = np.asarray(doc_C, np.int64)
  num_docs = int(doc_C.max()) + 1 if len(doc_C) else 0
  per_doc = [np.bincount(doc_C[mask_C], np.asarray(x)[mask_C] / math.log(2), num_docs)
             for x in (loss_ref_C, loss_a_C, loss_b_C)]
  n_D = np.bincount(doc_C[mask_C], np.asarray(bytes_C, np.float64)[mask_C], num_docs)
  used = n_D > 0
  r_D, a_D, b_D, n_D = (x[used] for x in (*per_doc, n_D))
  if not used.any():
    return {"ratio": None, "ci95": [None, None], "docs": 0}
  ratio = float((r_D.sum() - a_D.sum()) / (r_D.sum() - b_D.sum()))
  rng = np.random.default_rng(seed)
  D = len(n_D)
  w_BxD = rng.multinomial(D, np.full(D, 1.0 / D), size=num_resamples).astype(np.float64)
  r_B = (w_BxD @ r_D - w_BxD @ a_D) / (w_BxD @ r_D - w_BxD @ b_D)
  lo, hi = (float(x) for x in np.percentile(r_B, [2.5, 97.5]))
  return {"ratio": ratio, "ci95": [lo, hi], "docs": int(D)}


# Fewer documents than this: a resample over them says nothing; tables print no interval.
MIN_DOCS_FOR_INTERVAL = 10


def format_diff(d: dict, digits: int = 4) -> str:
  """'-0.0123 [-0.0200, -0.0051]', or '-0.0123 (3 docs, no interval)', or 'n/a'."""
  if d.get("diff") is None:
    return "n/a"
  if d.get("docs", MIN_DOCS_FOR_INTERVAL) < MIN_DOCS_FOR_INTERVAL:
    return f"{d['diff']:+.{digits}f} ({d['docs']} docs, no interval)"
  lo, hi = d["ci95"]
  return f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
