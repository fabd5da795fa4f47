r"""A fact only the database holds: completed with retrieval on, not off, and gone after removal.

    python -m retro_jax.fact_recall --workdir=runs/copy [--db=runs/default_db] --scratch=runs/fact \
        [--new_tokens=64 --out=bench/results/fact_recall.json]

The steps (the database is copied to SCRATCH/db first, never edited): retro_jax.evaluation.fact_recall.
"""
import json
import os
import sys

from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import fact_recall
from retro_jax.evaluation.figures import provenance

FLAGS = flags.FLAGS
shared.define("workdir", required=True, note="a trained RETRO (`make example`: runs/copy)")
shared.define("db", note="copied to SCRATCH/db, never edited (default: the one the model trained "
              "on)")
flags.DEFINE_string("scratch", "runs/fact", "scratch directory (replaced)")
flags.DEFINE_string("fact_file", None, "a text file to add instead of the built-in fact")
flags.DEFINE_integer("new_tokens", 64, "tokens to generate")
flags.DEFINE_string("out", "bench/results/fact_recall.json", "results JSON")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  fact, name = fact_recall.FACT, fact_recall.FACT_FILE
  if FLAGS.fact_file:
    with open(FLAGS.fact_file) as f:
      fact, name = f.read(), os.path.basename(FLAGS.fact_file)
  report = fact_recall.run(FLAGS.workdir, FLAGS.db, FLAGS.scratch, fact=fact, name=name,
                           new_tokens=FLAGS.new_tokens)
  report["provenance"] = provenance(" ".join(["python -m retro_jax.fact_recall"] + sys.argv[1:]))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
