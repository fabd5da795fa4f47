r"""The CPU demo (`make demo`): a tiny RETRO and its baseline, trained and evaluated.

    python -m retro_jax.demo [--db=runs/dup_db --out=runs/demo --steps=N]

Trains experiments/dup_tiny.py with and without retrieval on the database (by default the
duplication database of `make dup-db`, where held-out text recurs in other documents), scores both on its held-out
documents (retrieval on, off and shuffled, with 95% intervals) and writes OUT/results.{md,json}, OUT/leakage.png and OUT/loss.png
(retro_jax.evaluation.demo). Finished runs are reused; a killed one resumes.
"""
from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import demo

FLAGS = flags.FLAGS
shared.define("db", note="default: experiments/dup_tiny.py's, built by `make dup-db`")
flags.DEFINE_string("out", "runs/demo", "output directory")
flags.DEFINE_integer("steps", None, "training steps per model (default: experiments/dup_tiny.py)")
shared.define("max_docs", note="held-out documents evaluated")
flags.DEFINE_integer("stride", None, "evaluation stride (default: the sequence length - 64, so "
                     "every scored chunk gets its preceding chunk's neighbours)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  summary = demo.run(FLAGS.db, FLAGS.out, steps=FLAGS.steps, max_docs=FLAGS.max_docs,
                     stride=FLAGS.stride)
  print("\n" + summary["header"] + "\n\n" + summary["markdown"])
  print(f"\nwrote {FLAGS.out}/results.md, results.json, leakage.png, loss.png "
        f"({summary['timings']['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
