r"""The MiniLM embedder's forward pass compiled ahead of time for a TPU topology (nothing runs).

  python -m bench.embed_aot [--topology=v5e:2x2 --per_chip_batch=1024 --seq_len=128 --mfu=0.3]

libtpu compiles the data-parallel embedder forward (retro_jax/retrieval/bert.py: BERT-6L-384,
mean pooling, L2 norm; bf16 matmul weights as `Embedder.load(dtype="bfloat16")`) for the named
topology on this CPU. XLA's `cost_analysis()` FLOPs per chip per batch, with the chip's bf16 peak
(retro_jax/training/aot.py: CHIPS) and an assumed model-FLOPs utilisation `--mfu`, give chunks/s per
chip; the analytic count (2 FLOPs per multiply-add of every matmul, attention included) is printed
beside it. Writes bench/results/embed_aot.json (the WORKSPACE.md cost model reads it).
"""
from __future__ import annotations

import os

# As retro_jax/training/aot.py: libtpu compiles for a topology without a TPU here.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from retro_jax.retrieval import bert  # noqa: E402
from retro_jax.training import aot  # noqa: E402
from bench.common import run_provenance  # noqa: E402

_TOPO = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology to compile for.")
_BATCH = flags.DEFINE_integer("per_chip_batch", 1024, "Chunks per chip per forward call.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "WordPiece tokens per chunk (the embedder's "
                            "max_length; the build's 64-token chunks use its buckets up to it).")
_MFU = flags.DEFINE_float("mfu", 0.3, "Assumed model-FLOPs utilisation on the TPU.")
_OUT = flags.DEFINE_string("out", "bench/results/embed_aot.json", "Results file.")


def analytic_flops_per_chunk(cfg: bert.BertConfig, t: int) -> float:
  d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  per_token = layers * 2 * (4 * d * d + 2 * d * f)  # q, k, v, o projections and the MLP
  attention = layers * 2 * 2 * t * d  # scores and the weighted sum, per token
  return t * (per_token + attention)


def main(argv):
  del argv
  generation, devices = aot.topology_devices(_TOPO.value)
  chips = len(devices)
  cfg = bert.BertConfig()
  model = nnx.eval_shape(lambda: bert.BertEncoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(  # bf16 matmul kernels (Dense.w_DxF), fp32 elsewhere, as the embedder
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16 if a.ndim == 2 and a.shape[0] in (
          cfg.hidden_size, cfg.intermediate_size) and a.shape[0] != cfg.vocab_size else a.dtype),
      state)
  mesh = Mesh(np.array(devices), ("data",))
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  b, t = _BATCH.value * chips, _SEQ.value
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows)
  mask = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)

  @jax.jit
  def forward(state, ids_BxT, mask_BxT):
    return nnx.merge(graphdef, state)(ids_BxT, mask_BxT)

  t0 = time.time()
  compiled = forward.lower(state, ids, mask).compile()
  compile_s = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_chip = float(cost["flops"])  # per chip: the SPMD module
  _, peak = aot.CHIPS[generation]
  analytic = analytic_flops_per_chunk(cfg, t)
  step_s = flops_chip / (peak * 1e12 * _MFU.value)
  per_chip = _BATCH.value / step_s
  mem = compiled.memory_analysis()
  report = {
      "topology": _TOPO.value, "chips": chips, "per_chip_batch": _BATCH.value, "seq_len": t,
      "compile_s": round(compile_s, 1),
      "xla_flops_per_chip_per_call": flops_chip,
      "xla_flops_per_chunk": flops_chip / _BATCH.value,
      "analytic_flops_per_chunk": analytic,
      "chip_bf16_peak_tflops": peak, "assumed_mfu": _MFU.value,
      "chunks_per_s_per_chip": per_chip,
      "chunks_per_s_per_chip_at_mfu": {str(m): _BATCH.value / (flops_chip / (peak * 1e12 * m))
                                       for m in (0.2, 0.3, 0.5)},
      "per_chip_temp_gib": mem.temp_size_in_bytes / 2**30,
      "date_utc": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
  report["provenance"] = run_provenance("bench.embed_aot")
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
