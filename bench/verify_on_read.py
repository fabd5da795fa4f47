r"""What verifying on read costs (retro_jax.db.verify): seconds per GB, against a plain read.

  python -m bench.verify_on_read [--db=runs/default_db] [--reps=3]

Over every shard file a command verifies the first time it reads it (the chunk store's tokens.npy,
doc_ids.npy and doc_table.npy, the embeddings and the neighbours shards of --db; read only):
  read:    a sequential read of the file (8 MiB blocks), the floor any check pays,
  sha256:  the content checksum `verify.file_once` computes (layout.sha256_file),
  range:   the id range check of `verify.ids_in_range` over the tokens and neighbours arrays.
Each after one warm-up pass, so the files are in the page cache: the figures are the CPU cost of
the check (a cold read adds the disk's own time to both the plain read and the check). Median of
--reps. Results: bench/results/verify_on_read.json (docs/benchmarks.md quotes them).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags
from etils import epath

from retro_jax.db import chunk_store, layout, verify
from bench.common import run_provenance

_DB = flags.DEFINE_string("db", "runs/default_db", "Database to read (not modified).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed passes (median).")
_OUT = flags.DEFINE_string("out", "bench/results/verify_on_read.json", "Results file.")


def shard_files(db: str) -> dict[str, list[str]]:
  manifest = chunk_store.read_manifest(epath.Path(db) / "chunks")  # the whole shard list
  out = {"tokens": [], "other_chunk_files": [], "embeddings": [], "neighbours": []}
  for s in manifest["shards"]:
    d = os.path.join(db, "chunks", s["path"])
    out["tokens"].append(os.path.join(d, "tokens.npy"))
    out["other_chunk_files"] += [os.path.join(d, n) for n in ("doc_ids.npy", "doc_table.npy")]
    for kind, path in (("embeddings", layout.embeddings_path(db, s["index"])),
                       ("neighbours", layout.neighbours_path(db, s["index"]))):
      if os.path.exists(path):
        out[kind].append(str(path))
  return out


def read_all(path: str, block: int = 8 << 20) -> None:
  with open(path, "rb") as f:
    while f.read(block):
      pass


def timed(fn, paths, reps: int) -> float:
  for p in paths:  # warm-up: page cache
    fn(p)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for p in paths:
      fn(p)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv) -> None:
  del argv
  files = shard_files(_DB.value)
  every = [p for ps in files.values() for p in ps]
  gb = sum(os.path.getsize(p) for p in every) / 1e9
  load_before = open("/proc/loadavg").read().split()[:3]
  t_read = timed(read_all, every, _REPS.value)
  t_sha = timed(layout.sha256_file, every, _REPS.value)
  ranged = files["tokens"] + files["neighbours"]
  gb_ranged = sum(os.path.getsize(p) for p in ranged) / 1e9
  t_range = timed(lambda p: verify.ids_in_range(np.load(p, mmap_mode="r"), -1, 1 << 40, p, ""),
                  ranged, _REPS.value)
  res = {"db": _DB.value, "files": len(every), "gb": gb,
         "gb_by_kind": {k: sum(os.path.getsize(p) for p in v) / 1e9 for k, v in files.items()},
         "read_seconds_per_gb": t_read / gb, "sha256_seconds_per_gb": t_sha / gb,
         "sha256_gb_per_second": gb / t_sha,
         "range_check_seconds_per_gb": t_range / gb_ranged,
         "sha256_over_read": t_sha / t_read,
         "note": "page cache warm (CPU cost of the check); median of reps; shared 2-core machine",
         "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                     "loadavg_before": load_before,
                     "loadavg_after": open("/proc/loadavg").read().split()[:3]},
         "reps": _REPS.value, "measured_at_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  res["provenance"] = run_provenance("bench.verify_on_read")
  with open(_OUT.value, "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  app.run(main)
