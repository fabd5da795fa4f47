r"""RETROfit a frozen baseline: train only chunked cross-attention and the neighbour encoder.

    python -m retro_jax.retrofit --config=experiments/retrofit_tiny.py --workdir=runs/demo/retrofit \
        [--config.init_from=runs/demo/baseline]

`python -m retro_jax.train` with the experiment's `init_from` (the baseline's model directory),
`train_only="retrieval"` and `retrieval=True` enforced (retro_jax.training.retrofit).
"""
from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.training import loop

FLAGS = flags.FLAGS
shared.define("config", required=True, note="a retrofit experiment (experiments/retrofit_*.py)")
shared.define("workdir", required=True, note="written; the same WORKDIR again resumes")


def main(argv):
  del argv
  c = FLAGS.config
  if not c.get("init_from"):
    raise app.UsageError("the experiment names no baseline: pass --config.init_from=BASELINE_WORKDIR")
  if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  c.train_only = "retrieval"
  c.retrieval = True
  loop.run(c, FLAGS.workdir)


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
