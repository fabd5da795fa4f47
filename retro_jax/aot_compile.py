r"""Ahead-of-time compile of the training step for a TPU topology, on a machine without a TPU.

    python -m retro_jax.aot_compile --size=172m --topology=v5e:4x4 --per_chip_batch=4

libtpu (the `tpu` extra) compiles for the named topology on this CPU; nothing runs. Prints the
per-chip memory from `memory_analysis()` against the chip's HBM and XLA's FLOPs per step against
the analytic 6 * params * tokens (+ attention, encoder). As MaxText's train_compile.py.
"""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")  # quiets libtpu's host probing
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only: no device to share

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from retro_jax import optim  # noqa: E402
from retro_jax.model import PAPER_SIZES, count_params  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.train_step import TrainStep  # noqa: E402

# Per-chip HBM (GiB) and bf16 peak (TFLOP/s), from Google's TPU documentation.
CHIPS = {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "172m", f"one of {sorted(PAPER_SIZES)}")
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology, e.g. v5e:4x4, v5p:2x2x4, v4:2x2x2")
flags.DEFINE_integer("per_chip_batch", 1, "sequences per chip (global batch = this x chips)")
flags.DEFINE_integer("seq_len", 2048, "training sequence length (paper: 2048)")
flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,model mesh shape (-1: the rest)")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "compute dtype (params fp32)")
flags.DEFINE_bool("remat", True, "rematerialise each block in the backward pass")
flags.DEFINE_integer("q_block", 512, "self-attention query block (0: whole sequence at once)")
flags.DEFINE_bool("retrieval", True, "RETRO (True) or the baseline decoder (False)")
flags.DEFINE_string("json_out", None, "append the result as one JSON line to this file")


class DoesNotFit(RuntimeError):
  pass


def topology_devices(name: str):
  generation, shape = name.split(":")
  dims = tuple(int(x) for x in shape.split("x"))
  del dims
  host = (2, 2, 1)  # 4 chips per host, as on v4 / v5p / v5e-16+ hosts
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chip_config_name="default", chips_per_host_bounds=host,
                                      num_slices=1)
  return generation, topo.devices


def compile_step(size: str, topology: str, per_chip_batch: int, seq_len: int, mesh_shape,
                 dtype: str, remat: bool, retrieval: bool, q_block: int = 512) -> dict:
  generation, devices = topology_devices(topology)
  cfg = PAPER_SIZES[size].replace(dtype=dtype, remat=remat, attention_q_block=q_block,
                                 cpu_matmul_forms=False)  # compiled for a TPU, not this CPU
  if not retrieval:
    cfg = cfg.baseline()
  mesh = make_mesh(mesh_shape, devices)
  train = TrainStep(cfg, optim.adamw(), mesh)
  chips = len(devices)
  b, t = per_chip_batch * chips, seq_len
  l, n, r = cfg.num_chunks(t), cfg.num_neighbours, cfg.neighbour_len
  batch = {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "targets": jax.ShapeDtypeStruct((b, t), jnp.int32)}
  if retrieval:
    batch["neighbours"] = jax.ShapeDtypeStruct((b, l, n, r), jnp.int32)
  batch_sh = train.batch_sharding(batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
           for k, v in batch.items()}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       train.abstract_state, train.state_sharding)
  t0 = time.time()
  lowered = train.lower(state, batch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA refuses a program that cannot fit in HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(f"{size} on {topology} at {per_chip_batch}/chip: {e}") from None
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  per_chip_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) * chips  # cost is per chip (SPMD module)
  abstract_model, _ = train.merge(train.abstract_state)
  params = count_params(abstract_model, non_embedding=False)
  hbm_gib, peak_tflops = CHIPS[generation]
  analytic = cfg.flops_per_token(t) * b * t
  return {
      "size": size, "retrieval": retrieval, "topology": topology, "chips": chips,
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)), "per_chip_batch": per_chip_batch,
      "global_batch": b, "seq_len": t, "dtype": dtype, "remat": remat, "q_block": q_block,
      "params": params, "compile_s": round(seconds, 1),
      "per_chip_gib": per_chip_bytes / 2**30, "hbm_gib": hbm_gib,
      "temp_gib": mem.temp_size_in_bytes / 2**30,
      "argument_gib": mem.argument_size_in_bytes / 2**30,
      "xla_tflops_per_step": xla_flops / 1e12,
      "six_n_d_tflops": 6 * params * b * t / 1e12,
      "analytic_tflops": analytic / 1e12,
      "ideal_step_s_at_peak": analytic / (chips * peak_tflops * 1e12),
  }


def main(argv):
  del argv
  mesh_shape = tuple(int(x) for x in FLAGS.mesh.split(","))
  try:
    res = compile_step(FLAGS.size, FLAGS.topology, FLAGS.per_chip_batch, FLAGS.seq_len,
                       mesh_shape, FLAGS.dtype, FLAGS.remat, FLAGS.retrieval, FLAGS.q_block)
  except DoesNotFit as e:
    print(f"DOES NOT FIT: {e}")
    raise SystemExit(2)
  fits = "fits" if res["per_chip_gib"] <= res["hbm_gib"] else "DOES NOT FIT"
  print(f"{res['size']} {'RETRO' if res['retrieval'] else 'baseline'} on {res['topology']} "
        f"({res['chips']} chips, mesh {res['mesh']}), batch {res['per_chip_batch']}/chip x "
        f"{res['seq_len']} tokens, {res['dtype']}, remat={res['remat']}")
  print(f"  params {res['params'] / 1e6:,.1f}M, compiled in {res['compile_s']} s")
  print(f"  per-chip memory {res['per_chip_gib']:.2f} GiB of {res['hbm_gib']} GiB HBM: {fits} "
        f"(arguments {res['argument_gib']:.2f}, temporaries {res['temp_gib']:.2f})")
  print(f"  XLA FLOPs/step {res['xla_tflops_per_step']:.1f} T vs 6*params*tokens "
        f"{res['six_n_d_tflops']:.1f} T (ratio {res['xla_tflops_per_step'] / res['six_n_d_tflops']:.2f}); "
        f"analytic incl. attention+encoder {res['analytic_tflops']:.1f} T")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "a") as f:
      f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
  app.run(main)
