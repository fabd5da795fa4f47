r"""Scaling curves: bpb against model size and against retrieval-database size.

    python -m retro_jax.scaling --config=experiments/sweep_tiny.py --out=runs/scaling

The sweep file names an experiment (`train`) and the sizes and database fractions to sweep
(retro_jax.evaluation.scaling). Finished runs are reused, so a killed sweep resumes.
"""
from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import scaling

FLAGS = flags.FLAGS
shared.define("config", required=True, note="a sweep file (experiments/sweep_*.py): its "
              "experiment (`train`) and the sizes and database fractions (`sweep`)")
shared.renamed("sweep")
flags.DEFINE_string("out", "runs/scaling", "output directory")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = scaling.run(FLAGS.config, FLAGS.out)
  print(scaling.table(results))
  print(f"wrote {FLAGS.out}/scaling.json, scaling.md, bpb_vs_params.png, bpb_vs_db.png")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
