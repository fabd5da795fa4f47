r"""One checkpoint's held-out bpb with its neighbours found three ways: exact search, the in-process
ANN index, and the gRPC retrieval service (one shard process per index shard, on loopback).

    python -m bench.eval_retrievers --workdir=runs/demo/retro [--db=runs/default_db --seq_len=256
        --stride=256 --out=bench/results/eval_retrievers.json]

Same documents, windows and model each time; what differs is who searched (and so how many of the
exact neighbours the ANN found, recall@k against exact, reported per retriever).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from bench.common import run_provenance  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo/retro", "trained RETRO workdir")
flags.DEFINE_string("db", None, "database (default: the one the model trained on)")
flags.DEFINE_integer("seq_len", 256, "window length")
flags.DEFINE_integer("stride", 256, "window stride")
flags.DEFINE_string("out", "bench/results/eval_retrievers.json", "results JSON")


def main(argv):
  del argv
  from retro_jax.db.chunk_store import ChunkStore
  from retro_jax.evaluation import bpb as ev
  from retro_jax.retrieval import retriever as retriever_lib
  from retro_jax.retrieval import shard_server as serve_lib
  from retro_jax.training import checkpoint as ckpt_lib

  _, cfg, info = ckpt_lib.load_model(FLAGS.workdir)
  db = FLAGS.db or info["db"]
  store = ChunkStore.open(db)
  k = max(ev.FILTER_NEIGHBOURS, cfg.num_neighbours)
  report = {"workdir": FLAGS.workdir, "db": db, "backend": retriever_lib.db_backend(db),
            "seq_len": FLAGS.seq_len, "stride": FLAGS.stride, "results": {}}
  exact = None
  shards = serve_lib.served_shards(db)
  with tempfile.TemporaryDirectory() as tmp:
    procs = serve_lib.start_shards(db, shards, tmp)
    try:
      service = [p.address for p in procs]
      for kind in ("exact", "index", "service"):
        t0 = time.time()
        with ev.open_searcher(kind, db, service) as searcher:
          held = ev.load_heldout(store, db, k=k, neighbour_len=cfg.neighbour_len, searcher=searcher)
        t_search = time.time() - t0
        res = ev.evaluate(FLAGS.workdir, db=db, seq_len=FLAGS.seq_len, stride=FLAGS.stride,
                          retrieval="on", held=held, progress=False)
        on = res["results"]["on"]
        exact = held if exact is None else exact
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in
                                zip(held.neighbours_CxN, exact.neighbours_CxN)]))
        report["results"][kind] = {"bpb": on["bpb"], "bpb_alpha_12.5": ev.bpb_at(on, 0.125),
                                   "neighbour_search_seconds": t_search,
                                   f"recall@{k}_vs_exact": recall,
                                   "num_chunks": len(held.chunk_ids_C)}
        print(f"{kind:8s} bpb {on['bpb']:.4f}  alpha 12.5% {ev.bpb_at(on, 0.125):.4f}  "
              f"recall@{k} vs exact {recall:.3f}  search {t_search:.1f} s", flush=True)
      report["service_shards"] = service
    finally:
      for p in procs:
        p.stop()
  report["date_utc"] = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
  report["provenance"] = run_provenance("bench.eval_retrievers")
  with open(FLAGS.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
