r"""Ahead-of-time compile of the training step for a TPU topology, on this machine (no TPU needed).

    python -m retro_jax.aot_compile --size=172m --topology=v5e:4x4 --per_chip_batch=4
    python -m retro_jax.aot_compile --size=7.5b --topology=v5p:4x4x4 --num_slices=2 \
        --per_chip_batch=2 --grad_accum_steps=4 --q_block=0     # the paper's batch 1,024

Prints the per-chip memory against the chip's HBM and XLA's FLOPs per step against the analytic
count (retro_jax.training.aot).
"""
import json

from absl import app, flags

from retro_jax.errors import guard
from retro_jax.model import PAPER_SIZES
from retro_jax.training import aot

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "172m", sorted(PAPER_SIZES), "model size")
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x4, v4:2x2x2")
flags.DEFINE_integer("per_chip_batch", 1, "sequences per chip (global batch = this x chips)")
flags.DEFINE_integer("seq_len", 2048, "training sequence length (paper: 2048)")
flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,model mesh shape (-1: the rest)")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "compute dtype (params fp32)")
flags.DEFINE_bool("remat", True, "rematerialise each block in the backward pass")
flags.DEFINE_integer("q_block", 512, "self-attention query block (0: whole sequence at once)")
flags.DEFINE_bool("retrieval", True, "RETRO (True) or the baseline decoder (False)")
flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (multi-slice: hybrid mesh, the data "
                     "axis over slices)")
flags.DEFINE_integer("grad_accum_steps", 1, "micro-batches per step (global batch = per_chip_batch "
                     "x chips x this)")
flags.DEFINE_string("out", None, "append the result as one JSON line to this file")


def main(argv):
  del argv
  mesh_shape = tuple(int(x) for x in FLAGS.mesh.split(","))
  try:
    res = aot.compile_step(FLAGS.size, FLAGS.topology, FLAGS.per_chip_batch, FLAGS.seq_len,
                           mesh_shape, FLAGS.dtype, FLAGS.remat, FLAGS.retrieval, FLAGS.q_block,
                           num_slices=FLAGS.num_slices, grad_accum_steps=FLAGS.grad_accum_steps)
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
  app.run(guard(main))
