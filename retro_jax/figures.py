r"""The paper's figures at CPU scale: seeds, controls, overlap bins, database size, retrofit.

    python -m retro_jax.figures --config=experiments/figures_dup.py --out=runs/figures_dup
    python -m retro_jax.figures --config=experiments/figures_default.py --out=runs/figures_default

The config names an experiment (`train`) and what to measure (`figures`; retro_jax.evaluation.figures).
Finished training runs and evaluations are reused, so a killed run resumes. `--publish=NAME` also
copies the results to bench/results/NAME.json and the plots to docs/NAME_*.png.
"""
import os
import shutil
import sys

from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import figures

FLAGS = flags.FLAGS
shared.define("config", required=True, note="a figures file (experiments/figures_*.py): its "
              "experiment (`train`) and what to measure (`figures`)")
flags.DEFINE_string("out", "runs/figures_dup", "output directory")
flags.DEFINE_string("publish", None, "also write bench/results/NAME.json and docs/NAME_*.png")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  del argv  # absl's, without the flags: the results record the whole command line
  res = figures.run(FLAGS.config, FLAGS.out, argv=sys.argv)
  print(figures.table(res))
  print(f"wrote {FLAGS.out}/figures.json, figures.md, " +
        ", ".join(os.path.basename(p) for p in res["plots"]))
  if FLAGS.publish:
    shutil.copy(os.path.join(FLAGS.out, "figures.json"),
                os.path.join("bench", "results", f"{FLAGS.publish}.json"))
    for p in res["plots"]:
      shutil.copy(p, os.path.join("docs", f"{FLAGS.publish}_{os.path.basename(p)}"))
    print(f"published bench/results/{FLAGS.publish}.json and docs/{FLAGS.publish}_*.png")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
