r"""Does RETRO copy by position or by content? Held-out bpb split by which neighbour it is given.

    python -m bench.copy_alignment --db=runs/dup_db \
        --evals=paper:runs/figures_dup/evals/seed0_full.json,shift64:runs/explore/shift64_eval.json \
        --out=bench/results/dup_copy_alignment.json

On the duplication database the two kernel versions of one file recur chunk-aligned. Each held-out
chunk (but a document's first) is put in a group by the first neighbour it is given (that of the
preceding chunk): `twin` (the other version of the same file) or `other` (any other document), and
by its overlap r(C) with its 10 nearest training chunks (<= 12.5%, >= 50%); "all" and "r<=12.5%"
are every chunk and every chunk of that bin. For every evaluation
JSON (`python -m retro_jax.evaluate ... --out`, or a `retro_jax.figures` evaluation, with per-chunk
losses) the bpb of each of its modes in each group. A model that copies by content gains wherever
the neighbours overlap; one that copies by position gains only from the aligned twin.
"""
import json
import sys

import numpy as np
from absl import app, flags

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.evaluation import figures

FLAGS = flags.FLAGS
flags.DEFINE_string("db", "runs/dup_db", "the database the evaluations scored")
flags.DEFINE_list("evals", [], "LABEL:EVAL_JSON pairs")
flags.DEFINE_string("out", "bench/results/dup_copy_alignment.json", "results JSON")


def _path(key: str) -> str:
  return key.split(":", 1)[1] if ":" in key else key


def main(argv):
  del argv  # absl's, without the flags: the results record sys.argv
  store = chunk_store_lib.ChunkStore.open(FLAGS.db)
  held = ev.load_heldout(store, FLAGS.db)
  C = len(held.chunk_ids_C)
  given = ev.given_neighbours(held, 1)[:, 0]
  docs = np.asarray(store.heldout_doc_ids, np.int64)
  own = np.repeat([store.doc_key(int(d)) for d in docs], np.asarray(store.doc_num_chunks)[docs])
  nbr = [store.doc_key(int(d)) for d in store.doc_ids(np.maximum(given, 0))]
  twin = np.array([g >= 0 and _path(a) == _path(b) and a != b
                   for g, a, b in zip(given, own, nbr)])
  groups = {"all": np.ones(C, bool), "r<=12.5%": held.leakage_C <= 0.125 + 1e-9}
  for over, m_over in (("r<=12.5%", held.leakage_C <= 0.125 + 1e-9),
                       ("r>=50%", held.leakage_C >= 0.5 - 1e-9)):
    for who, m_who in (("twin", twin), ("other", ~twin & (given >= 0))):
      groups[f"{over}, {who}"] = m_over & m_who
  res = {**figures.provenance(" ".join(["python -m bench.copy_alignment"] + sys.argv[1:])),
         "db": FLAGS.db, "chunks": {g: int(m.sum()) for g, m in groups.items()}, "bpb": {}}
  b = held.chunk_bytes_C
  for item in FLAGS.evals:
    label, path = item.split(":", 1)
    with open(path) as f:
      losses = {m: np.asarray(v) for m, v in json.load(f)["chunk_loss_nats"].items()}
    if any(len(v) != C for v in losses.values()):
      raise SystemExit(f"{path} scored {len(next(iter(losses.values())))} chunks, not the {C} "
                       f"held-out chunks of {FLAGS.db}")
    res["bpb"][label] = {g: {mode: controls.bpb(x, b, m) for mode, x in losses.items()}
                         for g, m in groups.items()}
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
  for label, by in res["bpb"].items():
    for g, v in by.items():
      print(f"{label:10s} {g:18s} ({res['chunks'][g]:5d} chunks) " +
            "  ".join(f"{m} {x:.4f}" for m, x in v.items()))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
