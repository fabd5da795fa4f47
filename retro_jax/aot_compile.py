r"""Ahead-of-time compile of an experiment's training step for a TPU topology, on this machine (no
TPU needed).

    python -m retro_jax.aot_compile --config=experiments/retro_172m.py --topology=v5e:4x4 \
        --per_chip_batch=4
    python -m retro_jax.aot_compile --config=experiments/retro_7p5b.py --topology=v5p:4x4x4 \
        --num_slices=2 --per_chip_batch=1 --config.grad_accum_steps=8 \
        --config.model_overrides.attention_q_block=0     # the paper's batch 1,024

The model, sequence length, mesh, dtype, remat, attention query block and micro-batches are the
experiment file's (override any with --config.FIELD=VALUE; the baseline: --config.retrieval=false);
the per-chip batch defaults to the experiment's global batch over the topology's chips. Prints the
per-chip memory against the chip's HBM and XLA's FLOPs per step against the analytic count
(retro_jax.training.aot).
"""
import json

from absl import app, flags

from retro_jax import flags as shared
from retro_jax.errors import guard
from retro_jax.training import aot, experiment

FLAGS = flags.FLAGS
shared.define("config", required=True, note="the model and recipe to compile")
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x4, v4:2x2x2")
flags.DEFINE_integer("per_chip_batch", None, "sequences per chip in one micro-batch (default: the "
                     "experiment's global_batch / (chips x grad_accum_steps))")
flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice: hybrid mesh, the data "
                     "axis over slices)")
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
    res = aot.compile_step(experiment.model_config(c), FLAGS.topology, c.seq_len, tuple(c.mesh),
                           per_chip_batch=FLAGS.per_chip_batch, global_batch=c.global_batch,
                           num_slices=FLAGS.num_slices, grad_accum_steps=c.grad_accum_steps,
                           size=c.model_size)
  except aot.DoesNotFit as e:
    print(f"DOES NOT FIT: {e}")
    raise SystemExit(2)
  fits = "fits" if res["per_chip_gib"] <= res["hbm_gib"] else "DOES NOT FIT"
  slices = f" x {res['num_slices']} slices" if res["num_slices"] > 1 else ""
  accum = f" x {res['grad_accum_steps']} micro-batches" if res["grad_accum_steps"] > 1 else ""
  print(f"{res['size']} {'RETRO' if res['retrieval'] else 'baseline'} on {res['topology']}{slices} "
        f"({res['chips']} chips, mesh {res['mesh']}), batch {res['per_chip_batch']}/chip{accum} "
        f"(global {res['global_batch']}) x {res['seq_len']} tokens, {res['dtype']}, "
        f"remat={res['remat']}")
  print(f"  params {res['params'] / 1e6:,.1f}M, compiled in {res['compile_s']} s")
  print(f"  per-chip memory {res['per_chip_gib']:.2f} GiB of {res['hbm_gib']} GiB HBM: {fits} "
        f"(arguments {res['argument_gib']:.2f}, temporaries {res['temp_gib']:.2f})")
  print(f"  XLA FLOPs/step {res['xla_tflops_per_step']:.1f} T vs 6*params*tokens "
        f"{res['six_n_d_tflops']:.1f} T (ratio "
        f"{res['xla_tflops_per_step'] / res['six_n_d_tflops']:.2f}); "
        f"analytic incl. attention+encoder {res['analytic_tflops']:.1f} T")
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
