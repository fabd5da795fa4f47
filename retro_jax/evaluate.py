r"""Bits-per-byte on held-out documents, retrieval on / off / shuffled, with the leakage filter.

    python -m retro_jax.evaluate --workdir=runs/demo/retro [--seq_len=2048 --stride=1024] \
        [--num_neighbours=2 --retrieval=on,off,shuffled --baseline=runs/demo/baseline] \
        [--db_fraction=1.0 --out=EVAL.json --plot=EVAL.png] [--mesh=-1,1,1]

The model is restored straight into its sharded layout on --mesh (data, fsdp, model; default every
device data-parallel; --mesh=1,-1,1 shards the weights FSDP, for a model one chip cannot hold) and
each batch of windows is split over data and fsdp.

How documents, windows, retrieval and the filter work: retro_jax.evaluation.bpb; the shuffled
control, overlap bins and bootstrap intervals: retro_jax.evaluation.controls.
"""
import json
import os

from absl import app, flags
from etils import epath

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import bpb, controls

FLAGS = flags.FLAGS
shared.define("workdir", required=True, note="the model to score")
shared.define("step")
shared.define("db", note="retrieved from (default: the one the model trained on)")
flags.DEFINE_integer("seq_len", 2048, "window length in tokens")
flags.DEFINE_integer("stride", 1024, "window stride in tokens (0: seq_len - chunk size, so every "
                     "scored chunk gets its preceding chunk's neighbours)")
shared.define("num_neighbours", note="fed to the model (default: the model's)")
shared.define("retrieval", note="all = on,off,shuffled; shuffled: another document's neighbours, "
              "shuffled_source: another document of the same source, same_document: another "
              "chunk of the same document")
flags.DEFINE_string("baseline", None, "a baseline workdir scored on the same chunks (differences "
                    "RETRO - baseline with intervals)")
flags.DEFINE_integer("shuffle_seed", 0, "seed of the shuffled control's chunk pairing")
flags.DEFINE_enum("retriever", "exact", list(bpb.RETRIEVERS),
                  "who finds the neighbours: exact search, the database's ANN index in-process, "
                  "or the gRPC retrieval service")
shared.define("service", note="with --retriever=service")
shared.define("service_timeout_s", note="with --retriever=service")
shared.define("backend", note="with --retriever=index (default: the one built)")
flags.DEFINE_float("db_fraction", 1.0, "fraction of training documents to retrieve from")
flags.DEFINE_integer("batch_size", 8, "windows per forward pass (rounded up to a multiple of the "
                     "mesh's data x fsdp devices)")
shared.define("mesh", note="the model is restored sharded on it")
shared.define("max_docs", note="held-out documents")
flags.DEFINE_string("out", None, "results JSON (default WORKDIR/eval.json)")
flags.DEFINE_string("plot", None, "PNG path (default next to the JSON)")


def main(argv):
  del argv
  f = FLAGS
  try:
    modes = bpb.parse_modes(f.retrieval)
  except bpb.EvalError as e:
    raise app.UsageError(str(e)) from None
  res = bpb.evaluate(f.workdir, step=f.step, db=f.db, seq_len=f.seq_len, stride=f.stride,
                     num_neighbours=f.num_neighbours, retrieval=modes,
                     db_fraction=f.db_fraction, batch_size=f.batch_size, max_docs=f.max_docs,
                     retriever=f.retriever, service=f.service or (), backend=f.backend,
                     service_timeout_s=f.service_timeout_s,
                     baseline=f.baseline, shuffle_seed=f.shuffle_seed,
                     mesh=shared.mesh_from_flag(f.mesh))
  out = f.out or str(epath.Path(f.workdir) / "eval.json")  # local or gs://
  epath.Path(out).write_text(json.dumps(res, indent=1))
  plot_path = f.plot or os.path.splitext(out)[0] + ".png"
  bpb.plot({f"retrieval {m}": r for m, r in res["results"].items()}, plot_path,
           title=epath.Path(f.workdir).name)
  for m, r in res["results"].items():
    bins = "  ".join(f"{b} {v['bpb']:.4f}" for b, v in r["bins"].items() if v["bpb"] is not None)
    print(f"{m:9s} bpb {r['bpb']:.4f}   bpb(alpha=12.5%) {bpb.bpb_at(r, 0.125):.4f}   {bins}")
  for name, d in res["differences"].items():
    print(f"{name:18s} {controls.format_diff(d['all'])} (95% interval, documents resampled)")
  print(f"wrote {out} and {plot_path}")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
