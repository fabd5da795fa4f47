r"""Building a database into gs:// against building it on local disk, stage by stage.

    python -m bench.gcs_build [--rounds=1 --out=bench/results/gcs_build.json]

The tests' corpus (tests/data/corpus: 12 kernel docs + 24 Wikipedia leads, ~480 chunks, 2 store
shards; vocab 1000, the default global index, k=2) is built with `retro_jax.build.stages.build` into a
fresh local directory and into a fresh prefix of a local GCS emulator (tests/gcs_emulator.py:
fake-gcs-server on localhost), alternately, in one process. The gs:// figure is this code's own
I/O path (uploads, ranged reads, hashing through gcsfs and tensorstore) on an emulator without
network latency; a real bucket adds its round trips. Per-stage seconds are the build's own
`build_times.json` figures; the ratio is gs:// / local within one run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import corpus_path  # noqa: E402
import gcs_emulator  # noqa: E402

from bench.common import run_provenance  # noqa: E402
from retro_jax.build import stages as build_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 1, "builds of each kind (alternating local, gs://)")
flags.DEFINE_string("out", "bench/results/gcs_build.json", "where the results go")

SETTINGS = dict(corpus=corpus_path.spec(kernel=12, wiki=24), vocab_size=1000,
                heldout_fraction=0.1, k=2, docs_per_shard=20)


def _stages(record: dict) -> dict[str, float]:
  return {s: v["build_seconds"] for s, v in record["stages"].items()}


def main(argv):
  del argv
  runs: dict[str, list[dict]] = {"local": [], "gs": []}
  with gcs_emulator.running() as emulator, tempfile.TemporaryDirectory() as tmp:
    build_lib.build(os.path.join(tmp, "warm"), **SETTINGS)  # compiles and caches, untimed
    for r in range(FLAGS.rounds):
      for kind in ("local", "gs"):
        db = (os.path.join(tmp, f"db{r}") if kind == "local"
              else f"gs://{emulator.new_bucket()}/db")
        t0 = time.perf_counter()
        record = build_lib.build(db, **SETTINGS)
        runs[kind].append({"wall_seconds": time.perf_counter() - t0, "stages": _stages(record)})
  med = {k: {"wall_seconds": statistics.median(r["wall_seconds"] for r in v),
             "stages": {s: statistics.median(r["stages"][s] for r in v) for s in v[0]["stages"]}}
         for k, v in runs.items()}
  ratio = {s: med["gs"]["stages"][s] / max(med["local"]["stages"][s], 1e-9)
           for s in med["local"]["stages"]}
  ratio["wall"] = med["gs"]["wall_seconds"] / med["local"]["wall_seconds"]
  result = {"settings": SETTINGS, "rounds": FLAGS.rounds, "median": med,
            "gs_over_local": ratio, "runs": runs,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_average_1m": os.getloadavg()[0]},
            "note": "gs:// is a local fake-gcs-server (no network latency); one process, "
                    "local and gs:// builds alternating; a shared, loaded machine"}
  result["provenance"] = run_provenance("bench.gcs_build")
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({"median": med, "gs_over_local": ratio}, indent=1))


if __name__ == "__main__":
  app.run(main)
