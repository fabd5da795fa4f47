r"""Ahead-of-time compile of the training step for a TPU topology, on a machine without a TPU.

libtpu (the `tpu` extra) compiles for the named topology on this CPU; nothing runs. Prints the
per-chip memory from `memory_analysis()` against the chip's HBM and XLA's FLOPs per step against
the analytic 6 * params * tokens (+ attention, encoder). As MaxText's train_compile.py.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")  # quiets libtpu's host probing
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only: no device to share

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from retro_jax.errors import UserError  # noqa: E402
from retro_jax.model import RetroConfig, count_params  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.training import optim  # noqa: E402
from retro_jax.training.step import TrainStep  # noqa: E402

# Per-chip HBM (GiB) and bf16 peak (TFLOP/s), from Google's TPU documentation.
CHIPS = {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918)}

class DoesNotFit(RuntimeError):
  pass


class BatchError(UserError, ValueError):
  """The global batch does not split over the chips and micro-batches."""


def topology_devices(name: str, num_slices: int = 1):
  """The devices of `num_slices` slices of topology `name` (several: multi-slice over DCN)."""
  generation, shape = name.split(":")
  dims = tuple(int(x) for x in shape.split("x"))
  del dims
  host = (2, 2, 1)  # 4 chips per host, as on v4 / v5p / v5e-16+ hosts
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chip_config_name="default", chips_per_host_bounds=host,
                                      num_slices=num_slices)
  return generation, topo.devices


def compile_step(cfg: RetroConfig, topology: str, seq_len: int, mesh_shape, *,
                 per_chip_batch: int | None = None, global_batch: int | None = None,
                 num_slices: int = 1, grad_accum_steps: int = 1, size: str = "") -> dict:
  """The training step of model `cfg` (an experiment's, `experiment.model_config`: its dtype,
  remat, attention query block and retrieval) compiled for `num_slices` slices of `topology`.
  `mesh_shape` is one slice's; over several slices the hybrid mesh (partitioning.make_mesh).
  `per_chip_batch` is one micro-batch's: global batch = per_chip_batch x chips x grad_accum
  (default: from `global_batch`). `size` names the model in the result (SIZES key)."""
  generation, devices = topology_devices(topology, num_slices)
  chips = len(devices)
  if per_chip_batch is None:
    if global_batch is None or global_batch % (chips * grad_accum_steps):
      raise BatchError(f"global batch {global_batch} is not a multiple of {chips} chips x "
                       f"{grad_accum_steps} micro-batches; pass --per_chip_batch")
    per_chip_batch = global_batch // (chips * grad_accum_steps)
  retrieval = cfg.retrieval
  cfg = cfg.replace(cpu_matmul_forms=False)  # compiled for a TPU, not this CPU
  mesh = make_mesh(mesh_shape, devices)
  train = TrainStep(cfg, optim.adamw(), mesh, grad_accum_steps=grad_accum_steps)
  b, t = per_chip_batch * chips * grad_accum_steps, seq_len
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
  # cost is per chip (SPMD module); XLA counts a loop body once, so the micro-batch scan of
  # gradient accumulation is counted for one micro-batch: times its trip count (the optimizer
  # update outside the loop is then over-counted, a small fraction).
  xla_flops = float(cost.get("flops", float("nan"))) * chips * grad_accum_steps
  abstract_model, _ = train.merge(train.abstract_state)
  params = count_params(abstract_model, non_embedding=False)
  hbm_gib, peak_tflops = CHIPS[generation]
  analytic = cfg.flops_per_token(t) * b * t
  return {
      "size": size, "retrieval": retrieval, "topology": topology, "num_slices": num_slices,
      "grad_accum_steps": grad_accum_steps, "chips": chips,
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)), "per_chip_batch": per_chip_batch,
      "global_batch": b, "seq_len": t, "dtype": cfg.dtype, "remat": cfg.remat,
      "q_block": cfg.attention_q_block,
      "params": params, "compile_s": round(seconds, 1),
      "per_chip_gib": per_chip_bytes / 2**30, "hbm_gib": hbm_gib,
      "temp_gib": mem.temp_size_in_bytes / 2**30,
      "argument_gib": mem.argument_size_in_bytes / 2**30,
      "xla_tflops_per_step": xla_flops / 1e12,
      "six_n_d_tflops": 6 * params * b * t / 1e12,
      "analytic_tflops": analytic / 1e12,
      "ideal_step_s_at_peak": analytic / (chips * peak_tflops * 1e12),
  }
