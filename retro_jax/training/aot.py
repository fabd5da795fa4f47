r"""Ahead-of-time compiles for a TPU topology, on a machine without a TPU: the training step,
the evaluation step and the sampling steps.

libtpu (the `tpu` extra) compiles for the named topology on this CPU; nothing runs. Reports the
per-chip memory from `memory_analysis()` (arguments + outputs - donated aliases + temporaries)
against the chip's HBM and XLA's FLOPs per step; for training also against the analytic
6 * params * tokens (+ attention, encoder). As MaxText's train_compile.py.

  compile_step       TrainStep (training/step.py): forward, backward, AdamW update
  compile_eval_step  EvalStep (training/eval_step.py): the per-token loss of a batch of windows,
                     as `evaluate` scores them, float32 weights in the training layout
  compile_sample_step  Decoder (model/decode.py): the prefill of a prompt and one decode step
                     (the chunk-completing one, which also encodes the neighbours) over a cache
                     of `max_len` positions, sharded as `sample --mesh` shards it
"""
from __future__ import annotations

import math
import os
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")  # quiets libtpu's host probing
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only: no device to share

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from flax import nnx  # noqa: E402

from retro_jax.errors import UserError  # noqa: E402
from retro_jax.training.eval_step import EvalStep  # noqa: E402
from retro_jax.model import Retro, RetroConfig, count_params, placement  # noqa: E402
from retro_jax.model.decode import Decoder  # noqa: E402
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
  compiled, mem, per_chip_bytes, cost = _compile(
      lambda: train.lower(state, batch), f"{size} on {topology} at {per_chip_batch}/chip")
  seconds = time.time() - t0
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


def _compile(lower, what: str):
  """(compiled, memory_analysis, per-chip bytes, cost_analysis) of `lower()`'s program."""
  lowered = lower()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA refuses a program that cannot fit in HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(f"{what}: {e}") from None
  mem = compiled.memory_analysis()
  per_chip_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, mem, per_chip_bytes, cost


def _abstract_model(cfg: RetroConfig):
  """(graphdef, abstract weights, parameter count) of model `cfg`: nothing is allocated."""
  abstract = nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return abstract, graphdef, state, count_params(abstract, non_embedding=False)


def _batch_ways(mesh, rules: str) -> int:
  """How many shards the batch axes split a batch into."""
  spec = placement.batch_sharding(mesh, (0,), rules).spec[0]
  names = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[n] for n in names]))


def _serve_row(program, cfg, size, topology, num_slices, chips, mesh, per_chip_batch, b, t,
               params, seconds, per_chip_bytes, mem, xla_flops) -> dict:
  hbm_gib, _ = CHIPS[topology.split(":")[0]]
  return {
      "program": program, "size": size, "retrieval": cfg.retrieval, "topology": topology,
      "num_slices": num_slices, "grad_accum_steps": 1, "chips": chips,
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)), "per_chip_batch": per_chip_batch,
      "global_batch": b, "seq_len": t, "dtype": cfg.dtype, "remat": cfg.remat,
      "q_block": cfg.attention_q_block, "params": params, "compile_s": round(seconds, 1),
      "per_chip_gib": per_chip_bytes / 2**30, "hbm_gib": hbm_gib,
      "temp_gib": mem.temp_size_in_bytes / 2**30,
      "argument_gib": mem.argument_size_in_bytes / 2**30,
      "xla_tflops_per_step": xla_flops / 1e12}


def _per_chip_batch(per_chip_batch, global_batch, ways: int) -> int:
  if per_chip_batch is None:
    if global_batch is None or global_batch % ways:
      raise BatchError(f"global batch {global_batch} is not a multiple of the {ways} batch "
                       "shards; pass --per_chip_batch")
    per_chip_batch = global_batch // ways
  return per_chip_batch


def compile_eval_step(cfg: RetroConfig, topology: str, seq_len: int, mesh_shape, *,
                      per_chip_batch: int | None = None, global_batch: int | None = None,
                      num_slices: int = 1, size: str = "") -> dict:
  """The evaluation step (`EvalStep`: the per-token loss of `per_chip_batch` windows of `seq_len`
  tokens per batch shard, with their neighbours when `cfg` retrieves) compiled for `topology`:
  float32 weights in the training layout of `mesh_shape`, the batch over the batch axes."""
  _, devices = topology_devices(topology, num_slices)
  cfg = cfg.replace(cpu_matmul_forms=False)
  mesh = make_mesh(mesh_shape, devices)
  rules = cfg.sharding_rules
  ways = _batch_ways(mesh, rules)
  per_chip_batch = _per_chip_batch(per_chip_batch, global_batch, ways)
  _, graphdef, state, params = _abstract_model(cfg)
  step = EvalStep(graphdef, mesh, rules)
  b, t = per_chip_batch * ways, seq_len
  arg = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
      shape, jnp.int32, sharding=placement.batch_sharding(mesh, shape, rules))
  nbrs = arg((b, cfg.num_chunks(t), cfg.num_neighbours, cfg.neighbour_len)) \
      if cfg.retrieval else None
  t0 = time.time()
  _, mem, per_chip_bytes, cost = _compile(
      lambda: step.lower(placement.place(state, mesh, rules), arg((b, t)), arg((b, t)), nbrs),
      f"{size} evaluation on {topology} at {per_chip_batch}/chip")
  seconds = time.time() - t0
  return _serve_row("evaluate", cfg, size, topology, num_slices, len(devices), mesh,
                    per_chip_batch, b, t, params, seconds, per_chip_bytes, mem,
                    float(cost.get("flops", float("nan"))) * len(devices))


def compile_sample_step(cfg: RetroConfig, topology: str, max_len: int, mesh_shape, *,
                        per_chip_batch: int = 1, prompt_len: int | None = None,
                        num_slices: int = 1, size: str = "") -> dict:
  """The sampling programs of `sample --mesh` (`Decoder` on the mesh) compiled for `topology`:
  the prefill of a `prompt_len`-token prompt (default max_len / 2) and one chunk-completing
  decode step over a cache of `max_len` positions, for `per_chip_batch` sequences per batch
  shard, with retrieval when `cfg` retrieves. The per-chip memory is the larger program's."""
  _, devices = topology_devices(topology, num_slices)
  cfg = cfg.replace(cpu_matmul_forms=False)
  mesh = make_mesh(mesh_shape, devices)
  ways = _batch_ways(mesh, cfg.sharding_rules)
  b = per_chip_batch * ways
  prompt_len = prompt_len or max_len // 2
  abstract, _, _, params = _abstract_model(cfg)
  decoder = Decoder(abstract, max_len, mesh=mesh)
  retrieval = cfg.retrieval
  t0 = time.time()
  _, mem_s, bytes_s, cost_s = _compile(
      lambda: decoder.lower_step(b, retrieval=retrieval, completes=True),
      f"{size} decode step on {topology} at {per_chip_batch}/chip")
  step_seconds = time.time() - t0
  _, mem_p, bytes_p, cost_p = _compile(
      lambda: decoder.lower_prefill(b, prompt_len, retrieval=retrieval),
      f"{size} prefill on {topology} at {per_chip_batch}/chip")
  seconds = time.time() - t0
  mem = mem_s if bytes_s >= bytes_p else mem_p
  row = _serve_row("sample", cfg, size, topology, num_slices, len(devices), mesh, per_chip_batch,
                   b, decoder.max_len, params, seconds, max(bytes_s, bytes_p), mem,
                   float(cost_s.get("flops", float("nan"))) * len(devices))
  cache = decoder.abstract_cache(b, retrieval)
  row.update({
      "prompt_len": prompt_len, "step_gib": bytes_s / 2**30, "prefill_gib": bytes_p / 2**30,
      "step_compile_s": round(step_seconds, 1),
      "cache_gib": sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                       for x in jax.tree.leaves(cache)) / 2**30,
      "prefill_xla_tflops": float(cost_p.get("flops", float("nan"))) * len(devices) / 1e12})
  return row


PROGRAMS = ("train", "evaluate", "sample")


def compile_program(program: str, cfg: RetroConfig, topology: str, seq_len: int, mesh_shape, *,
                    per_chip_batch: int | None = None, global_batch: int | None = None,
                    num_slices: int = 1, grad_accum_steps: int = 1,
                    prompt_len: int | None = None, size: str = "") -> dict:
  """One of PROGRAMS compiled (`compile_step`, `compile_eval_step`, `compile_sample_step`: the
  sampling cache holds seq_len positions, per_chip_batch sequences per batch shard, default 1)."""
  if program == "evaluate":
    return compile_eval_step(cfg, topology, seq_len, mesh_shape, per_chip_batch=per_chip_batch,
                             global_batch=global_batch, num_slices=num_slices, size=size)
  if program == "sample":
    return compile_sample_step(cfg, topology, seq_len, mesh_shape,
                               per_chip_batch=per_chip_batch or 1, prompt_len=prompt_len,
                               num_slices=num_slices, size=size)
  if program != "train":
    raise ValueError(f"program={program!r}; expected one of {PROGRAMS}")
  return compile_step(cfg, topology, seq_len, mesh_shape, per_chip_batch=per_chip_batch,
                      global_batch=global_batch, num_slices=num_slices,
                      grad_accum_steps=grad_accum_steps, size=size)


def summary(res: dict) -> str:
  """The printed lines of one compile's result."""
  fits = "fits" if res["per_chip_gib"] <= res["hbm_gib"] else "DOES NOT FIT"
  slices = f" x {res['num_slices']} slices" if res["num_slices"] > 1 else ""
  model = f"{res['size']} {'RETRO' if res['retrieval'] else 'baseline'}"
  memory = (f"  per-chip memory {res['per_chip_gib']:.2f} GiB of {res['hbm_gib']} GiB HBM: {fits} "
            f"(arguments {res['argument_gib']:.2f}, temporaries {res['temp_gib']:.2f})")
  program = res.get("program", "train")
  if program == "train":
    accum = f" x {res['grad_accum_steps']} micro-batches" if res["grad_accum_steps"] > 1 else ""
    return "\n".join([
        f"{model} on {res['topology']}{slices} ({res['chips']} chips, mesh {res['mesh']}), batch "
        f"{res['per_chip_batch']}/chip{accum} (global {res['global_batch']}) x {res['seq_len']} "
        f"tokens, {res['dtype']}, remat={res['remat']}",
        f"  params {res['params'] / 1e6:,.1f}M, compiled in {res['compile_s']} s", memory,
        f"  XLA FLOPs/step {res['xla_tflops_per_step']:.1f} T vs 6*params*tokens "
        f"{res['six_n_d_tflops']:.1f} T (ratio "
        f"{res['xla_tflops_per_step'] / res['six_n_d_tflops']:.2f}); "
        f"analytic incl. attention+encoder {res['analytic_tflops']:.1f} T"])
  what = ("evaluation step" if program == "evaluate" else
          f"sampling (prefill of {res['prompt_len']} tokens, decode step over a "
          f"{res['seq_len']}-token cache)")
  lines = [
      f"{model} {what} on {res['topology']}{slices} ({res['chips']} chips, mesh {res['mesh']}), "
      f"{res['per_chip_batch']} sequences per batch shard (global {res['global_batch']})"
      + (f" x {res['seq_len']} tokens" if program == "evaluate" else "") + f", {res['dtype']}",
      f"  params {res['params'] / 1e6:,.1f}M (float32), compiled in {res['compile_s']} s", memory]
  if program == "sample":
    lines.append(f"  decode step {res['step_gib']:.2f} GiB (cache {res['cache_gib']:.2f} GiB per "
                 f"chip), prefill {res['prefill_gib']:.2f} GiB")
  lines.append(f"  XLA FLOPs/step {res['xla_tflops_per_step']:.3f} T")
  return "\n".join(lines)
