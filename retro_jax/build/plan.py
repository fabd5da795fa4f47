"""How a build stage's work is planned: a few range descriptors in the job graph, expanded into
blocks by the workers.

The launching process knows the database by its totals only (chunk count, store-shard count: the
chunk store's manifest.json). It puts at most `PLAN_RANGES` descriptors into a stage's graph,
each a `[start, end)` range of global chunk ids (or of store-shard numbers); a worker expands its
range into the stage's blocks (aligned to store shards, from the shard list it reads itself) and
skips the ones already finished. So the graph and the launcher's reads stay the same size from
ten thousand chunks to tens of billions, and the blocks, not the ranges, are what the runner
spreads over its workers (a Reshuffle after the expansion).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# The most range descriptors one stage's job graph holds.
PLAN_RANGES = 4096
# Query blocks whose first rows fall in one SEARCH_GROUP_ROWS-row span of global ids form one
# search group: the neighbours search is keyed by (serving shard, search group).
SEARCH_GROUP_ROWS = 16_384


def ranges(n: int, parts: int = PLAN_RANGES) -> list[tuple[int, int]]:
  """At most `parts` contiguous `[start, end)` ranges covering `[0, n)`, sizes within one."""
  parts = max(1, min(int(parts), int(n)))
  bounds = [int(n) * i // parts for i in range(parts + 1)]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def blocks_in(offsets_S1: np.ndarray, lo: int, hi: int, block_rows: int
              ) -> Iterator[tuple[int, int, int]]:
  """(store shard, first row within it, rows) of every block whose first global id is in
  `[lo, hi)`. Blocks start at each shard's first row and every `block_rows` rows after it (the
  last one of a shard may be shorter); `offsets_S1` is int64 [S + 1] (shard s: chunks
  `[offsets[s], offsets[s + 1])`)."""
  first = max(0, int(np.searchsorted(offsets_S1, lo, side="right")) - 1)
  for s in range(first, len(offsets_S1) - 1):
    a, b = int(offsets_S1[s]), int(offsets_S1[s + 1])
    if a >= hi:
      break
    start = max(0, -(-(lo - a) // block_rows) * block_rows)  # first block starting at >= lo
    for r in range(start, b - a, block_rows):
      if a + r >= hi:
        break
      yield s, r, min(block_rows, b - a - r)


def search_group(first_id: int) -> int:
  """The search group of a query block starting at global chunk id `first_id`."""
  return int(first_id) // SEARCH_GROUP_ROWS


def num_search_keys(num_chunks: int, serving_shards: int) -> int:
  """Distinct (serving shard, search group) keys of a neighbours round when every group's
  queries reach every serving shard (the upper bound the plan allows)."""
  return int(serving_shards) * max(1, -(-int(num_chunks) // SEARCH_GROUP_ROWS))
