r"""Train any experiment.

    python -m retro_jax.train --config=experiments/tiny.py --workdir=runs/tiny_retro \
        [--config.total_steps=200 --config.retrieval=false ...]

Running the same command again resumes from the latest checkpoint. What WORKDIR holds:
retro_jax.training.loop. On a pod every host runs the same command (launch/tpu_run.sh). Several
processes on one machine (a multi-process CPU test):
    python -m retro_jax.train ... --coordinator_address=localhost:12345 --num_processes=2 \
        --process_id=0     # and --process_id=1 in a second process
"""
import sys

from absl import app, flags, logging

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.training import loop

FLAGS = flags.FLAGS
shared.define("config", required=True, note="the run to train")
shared.define("workdir", required=True, note="written; the same WORKDIR again resumes")
flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                  "call jax.distributed.initialize() (auto: when TPU_WORKER_HOSTNAMES lists >1 host "
                  "or --num_processes > 1)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (default: "
                    "auto-detected on TPU; needed for a multi-process CPU/GPU run)")
flags.DEFINE_integer("num_processes", None, "processes in the run (default: auto-detected on TPU)")
flags.DEFINE_integer("process_id", None, "this process's index (default: auto-detected on TPU)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    distributed = loop.want_distributed(FLAGS.distributed, FLAGS.num_processes)
    if distributed:
      distributed = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes",
                                                 "process_id") if FLAGS[k].value is not None}
      distributed = distributed or True
    loop.run(FLAGS.config, FLAGS.workdir, distributed=distributed)
  except loop.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
