r"""Ahead-of-time compile of an experiment's training step, evaluation step or sampling steps for a
TPU topology, on this machine (no TPU needed).

    python -m retro_jax.aot_compile --config=experiments/retro_172m.py --topology=v5e:4x4 \
        --per_chip_batch=4
    python -m retro_jax.aot_compile --config=experiments/retro_7p5b.py --topology=v5p:4x4x4 \
        --num_slices=2 --per_chip_batch=1 --config.grad_accum_steps=8 \
        --config.model_overrides.attention_q_block=0     # the paper's batch 1,024
    python -m retro_jax.aot_compile --program=evaluate --config=experiments/retro_7p5b.py \
        --topology=v5e:4x4 --per_chip_batch=1              # evaluate's step, windows of seq_len
    python -m retro_jax.aot_compile --program=sample --config=experiments/retro_172m.py \
        --topology=v5e:4x4 --config.mesh=-1,1,1           # sample's prefill and decode step

The model, sequence length, mesh, dtype, remat, attention query block and micro-batches are the
experiment file's (override any with --config.FIELD=VALUE; the baseline: --config.retrieval=false);
the per-chip batch defaults to the experiment's global batch over the topology's chips. Prints the
per-chip memory against the chip's HBM and XLA's FLOPs per step against the analytic count
(retro_jax.training.aot). `--program=evaluate` compiles the evaluation step (the per-token loss of
seq_len-token windows, as `evaluate --mesh` runs it); `--program=sample` the sampling programs (the
prefill of a --prompt_len prompt and one decode step over a seq_len-token cache, per_chip_batch
sequences per batch shard, as `sample --mesh` runs them; default one per shard); both with the
experiment's float32 weights in its mesh's training layout.
"""
import json
import os
import sys

from absl import app, flags

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.evaluation import figures
from retro_jax.training import aot, experiment

FLAGS = flags.FLAGS
shared.define("config", required=True, note="the model and recipe to compile")
flags.DEFINE_enum("program", "train", list(aot.PROGRAMS), "what to compile: the training step, the "
                  "evaluation step, or the sampling prefill and decode step")
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x4, v4:2x2x2")
flags.DEFINE_integer("per_chip_batch", None, "sequences per chip in one micro-batch (default: the "
                     "experiment's global_batch / (chips x grad_accum_steps))")
flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice: hybrid mesh, the data "
                     "axis over slices)")
flags.DEFINE_integer("prompt_len", None, "with --program=sample: prompt tokens of the prefill "
                     "(default: half of seq_len)")
flags.DEFINE_string("out", None, "append the result as one JSON line to this file")
# The model flags this command had, now the experiment's fields.
shared.renamed("size", how="use --config=experiments/retro_<size>.py (or baseline_<size>.py)")
shared.renamed("seq_len", how="use --config.seq_len")
shared.renamed("mesh", how="use --config.mesh")
shared.renamed("dtype", how="use --config.model_overrides.dtype")
shared.renamed("remat", how="use --config.model_overrides.remat", boolean=True)
shared.renamed("q_block", how="use --config.model_overrides.attention_q_block")
shared.renamed("retrieval", how="use --config.retrieval (or a baseline_<size>.py experiment)",
               boolean=True)
shared.renamed("grad_accum_steps", how="use --config.grad_accum_steps")


def main(argv):
  del argv
  c = experiment.with_defaults(FLAGS.config)
  try:
    res = aot.compile_program(FLAGS.program, experiment.model_config(c), FLAGS.topology,
                              c.seq_len, tuple(c.mesh), per_chip_batch=FLAGS.per_chip_batch,
                              global_batch=c.global_batch, num_slices=FLAGS.num_slices,
                              grad_accum_steps=c.grad_accum_steps, prompt_len=FLAGS.prompt_len,
                              size=c.model_size)
  except aot.DoesNotFit as e:
    print(f"DOES NOT FIT: {e}")
    raise SystemExit(2)
  print(aot.summary(res))
  if FLAGS.out:  # the row names the command that wrote it (bench/aot_all.sh sets AOT_COMMAND)
    command = os.environ.get("AOT_COMMAND") or " ".join(
        ["python -m retro_jax.aot_compile"] + sys.argv[1:])
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps({**res, "provenance": figures.provenance(command)}) + "\n")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
