r"""Training-step throughput on this CPU: RETRO vs the same decoder without retrieval.

    make bench        # = LD_PRELOAD=<libtcmalloc_minimal.so.4> python -m bench.train_step

The reference configuration (docs/benchmarks.md): d_model 512, 8 heads, 12 layers, ffw 4x,
CCA at 6, 9, 12, encoder 2 x 512, sequence 512, batch 4, k = 2 neighbours of r = 128, vocabulary
32,000, AdamW, float32, random token ids. RETRO and baseline steps alternate; medians are quoted.
MFU = analytic model FLOPs per step (RetroConfig.flops_per_token) / step time / the float32
matmul peak measured by JAX in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench.common import matmul_gflops, run_provenance  # noqa: E402
from retro_jax.model import SIZES, RetroConfig  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.training import optim  # noqa: E402
from retro_jax.training.step import TrainStep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 8, "timed steps per model (after one compile+warm-up step)")
flags.DEFINE_string("out", "bench/results/train_step.json", "where the results go")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_enum("size", "reference", sorted(SIZES), "model size (retro_jax.model.config.SIZES); "
                  "reference: the reference configuration of docs/benchmarks.md")
flags.DEFINE_integer("batch", 4, "sequences per step")
flags.DEFINE_integer("seq_len", 512, "tokens per sequence")
flags.DEFINE_integer("q_block", 0, "self-attention query block (0: whole sequence)")
flags.DEFINE_enum("positions", "relative", ["relative", "rope"],
                  "decoder self-attention positions (CCA and the encoder stay relative)")


def matmul_peak(dtype=jnp.float32, sizes=(1024, 2048)) -> dict:
  return {n: matmul_gflops(dtype, n) for n in sizes}


def make_batch(cfg: RetroConfig, retrieval: bool, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  BATCH, SEQ = FLAGS.batch, FLAGS.seq_len
  toks = rng.integers(1, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  if retrieval:
    batch["neighbours"] = rng.integers(
        1, cfg.vocab_size, (BATCH, cfg.num_chunks(SEQ), cfg.num_neighbours, cfg.neighbour_len)
    ).astype(np.int32)
  return batch


def main(argv):
  del argv
  BATCH, SEQ = FLAGS.batch, FLAGS.seq_len
  on_cpu = jax.devices()[0].platform == "cpu"
  peak_dtype = jnp.float32 if FLAGS.dtype == "float32" else jnp.bfloat16
  peak = matmul_peak(peak_dtype, (1024, 2048) if on_cpu else (4096, 8192))
  peak_gflops = max(peak.values())
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  base_cfg = SIZES[FLAGS.size]
  base_cfg = base_cfg.replace(dtype=FLAGS.dtype, attention_q_block=FLAGS.q_block,
                              positions=FLAGS.positions)
  runs = {}
  for name, cfg in (("retro", base_cfg), ("baseline", base_cfg.baseline())):
    train = TrainStep(cfg, optim.adamw(), mesh)
    state = train.init()
    batch = make_batch(cfg, name == "retro")
    t0 = time.perf_counter()
    state, metrics = train.step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    cost = train.jitted(batch).lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    runs[name] = {"train": train, "state": state, "batch": batch, "times": [], "cfg": cfg,
                  "compile_s": compile_s, "xla_flops": float(cost.get("flops", float("nan")))}
  for _ in range(FLAGS.steps):  # alternate so that machine noise hits both alike
    for name, r in runs.items():
      t0 = time.perf_counter()
      r["state"], metrics = r["train"].step(r["state"], r["batch"])
      jax.block_until_ready(metrics)
      r["times"].append(time.perf_counter() - t0)
  results = {
      "config": {"size": FLAGS.size, "d_model": base_cfg.d_model, "heads": base_cfg.num_heads,
                 "layers": base_cfg.num_layers, "cca_layers": list(base_cfg.cca_layers),
                 "encoder": f"{base_cfg.encoder_layers} x {base_cfg.enc_d_model}",
                 "seq_len": SEQ, "batch": BATCH, "neighbours": base_cfg.num_neighbours,
                 "neighbour_len": base_cfg.neighbour_len, "vocab": base_cfg.vocab_size,
                 "dtype": FLAGS.dtype, "q_block": FLAGS.q_block,
                 "positions": FLAGS.positions},
      "machine": {"device": str(jax.devices()[0].device_kind),
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "jax": jax.__version__,
                  "malloc": {k: os.environ.get(k) for k in
                             ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")},
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
      f"matmul_peak_gflops_{jnp.dtype(peak_dtype).name}": peak, "steps": FLAGS.steps,
  }
  for name, r in runs.items():
    med = statistics.median(r["times"])
    flops = r["cfg"].flops_per_token(SEQ) * BATCH * SEQ
    results[name] = {
        "step_s_median": med, "step_s_all": r["times"], "tokens_per_s": BATCH * SEQ / med,
        "analytic_gflop_per_step": flops / 1e9, "xla_gflop_per_step": r["xla_flops"] / 1e9,
        "achieved_gflops": flops / med / 1e9, "mfu": flops / med / 1e9 / peak_gflops,
        "compile_s": r["compile_s"]}
  results["retrieval_overhead"] = (results["retro"]["step_s_median"]
                                   / results["baseline"]["step_s_median"] - 1)
  results["flop_ratio_retro_over_baseline"] = (results["retro"]["analytic_gflop_per_step"]
                                               / results["baseline"]["analytic_gflop_per_step"])
  if FLAGS.size == "reference" and on_cpu:
    results["speedup_vs_pytorch_peers_280_tok_s"] = results["retro"]["tokens_per_s"] / 280.0
  Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  results["provenance"] = run_provenance("bench.train_step")
  Path(FLAGS.out).write_text(json.dumps(results, indent=2))
  for name in ("retro", "baseline"):
    r = results[name]
    print(f"{name:8s}: {r['step_s_median']:.2f} s/step = {r['tokens_per_s']:.0f} tokens/s, "
          f"{r['analytic_gflop_per_step']:.0f} GFLOP/step (XLA {r['xla_gflop_per_step']:.0f}), "
          f"{r['achieved_gflops']:.0f} GFLOP/s, MFU {r['mfu']:.1%}")
  print(f"matmul peak (JAX {jnp.dtype(peak_dtype).name}): {peak_gflops:.0f} GFLOP/s; retrieval overhead "
        f"{results['retrieval_overhead']:+.1%} (FLOP ratio "
        f"{results['flop_ratio_retro_over_baseline']:.2f})")
  if "speedup_vs_pytorch_peers_280_tok_s" in results:
    print(f"vs PyTorch peers (280 tokens/s): {results['speedup_vs_pytorch_peers_280_tok_s']:.2f}x")
  print(f"written to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
