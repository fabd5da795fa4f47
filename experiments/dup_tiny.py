"""The tiny RETRO on the duplication database (`make demo`): experiments/tiny.py on `runs/dup_db`.

    python -m retro_jax.build_db --corpus=dup --db=runs/dup_db --heldout_fraction=0.04
    python -m retro_jax.train --config=experiments/dup_tiny.py --workdir=runs/demo/retro
    python -m retro_jax.train --config=experiments/dup_tiny.py --config.retrieval=false \
        --workdir=runs/demo/baseline

The duplication corpus (retro_jax.db.corpus.DUP_SPEC) holds two versions of the kernel
documentation: a chunk's nearest neighbours from other documents are often its own text in the
other version, as text recurs across documents on the web, so the model learns to read them.
"""
from experiments import tiny


def get_config():
  c = tiny.get_config()
  c.db = "runs/dup_db"
  return c
