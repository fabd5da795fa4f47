"""The paper's rule for training neighbours: none from any document present in the sequence.

The neighbours stage (`retro_jax.build.neighbours`) stores, per chunk, its nearest chunks of OTHER
documents (never the chunk's own, never a held-out one), best first. Training sequences
(`retro_jax.training.input_pipeline`) can span several documents, and which ones depends on the
run's seq_len, so the rest of the paper's rule ("neighbours from the same document as the
training sequence are filtered out") is applied when a sequence is read: each chunk keeps the
first k stored neighbours whose document is not in the sequence. Store more candidates than the
model uses (`build_db --k`, e.g. 2x the model's k) so that the filter rarely leaves a slot
empty; an empty slot is -1 (all padding), as for any missing neighbour.
"""
from __future__ import annotations

import numpy as np


def exclude_documents(nbr_LxS: np.ndarray, nbr_docs_LxS: np.ndarray, excluded_docs: np.ndarray,
                      k: int) -> np.ndarray:
  """int64 [L, k]: per row, the first k ids (stored order, best first) that are valid (>= 0) and
  whose document is not in `excluded_docs`; -1 padded."""
  nbr_LxS = np.asarray(nbr_LxS, np.int64)
  keep_LxS = (nbr_LxS >= 0) & ~np.isin(nbr_docs_LxS, np.asarray(excluded_docs, np.int64))
  order = np.argsort(~keep_LxS, axis=1, kind="stable")  # kept first, stored order preserved
  ids = np.take_along_axis(np.where(keep_LxS, nbr_LxS, -1), order, axis=1)[:, :k]
  if ids.shape[1] < k:
    ids = np.concatenate([ids, np.full((len(ids), k - ids.shape[1]), -1, np.int64)], axis=1)
  return ids
