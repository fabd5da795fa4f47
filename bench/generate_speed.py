r"""Generation speed: the incremental decoder (KV cache + cached encoded neighbours) against a full
recompute of every position at every new token, with retrieval at every chunk boundary (this CPU).

    python -m bench.generate_speed [--db=runs/default_db --lengths=64,128,256,512,1024 \
        --full_measure_max=256 --out=bench/results/generate_speed.json]

Model: a randomly initialised RETRO (speed does not depend on the weights): d_model 256, 4 heads of
64, 4 layers, d_ffw 1024, CCA at layers 2 and 4, encoder 2 layers of width 256, vocabulary = the
database tokenizer's (8,192 for runs/default_db, `make db`), chunk m = 64, k = 2 neighbours of r = 128, fp32.
Prompt: the first 64 tokens of a fixed text (one complete chunk). Decoding is greedy.

Retrieval is real: `retro_jax.sampling.generate.DatabaseRetrieval` on the database (MiniLM embedding of the
chunk text, in-process ScaNN `Retriever` over all shards, exact rescoring, gather of chunk +
continuation from the chunk store), once per completed chunk, in both modes.

  * cached: `retro_jax.sampling.generate.generate` with a `Decoder` of max_len = prompt + N (compiled in a
    warm-up run of the same length, then timed).
  * full recompute: at every token, the jitted `model(tokens, neighbours)` over all tokens so far,
    padded to the next multiple of m (one compile per padded length, all compiled before timing),
    logits of the last real position, argmax. Run end to end for N <= --full_measure_max; for
    longer N the time is MODELLED as the sum over steps of the median time of one forward at that
    step's padded length (measured per length) plus the measured retrieval time of the cached run
    (same boundaries); both figures are given for the measured lengths so the model can be checked.
tokens/s = N / wall time of the generation loop (prefill and retrieval included, compile excluded).
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import matmul_gflops, run_provenance  # noqa: E402
from retro_jax.model import SIZES, Retro, RetroConfig  # noqa: E402
from retro_jax.model.decode import Decoder  # noqa: E402
from retro_jax.sampling import generate as gen  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("db", "runs/default_db", "retrieval database (chunk size must be 64)")
flags.DEFINE_list("lengths", ["64", "128", "256", "512", "1024"], "generated tokens per run")
flags.DEFINE_integer("full_measure_max", 256, "run the full recompute end to end up to this N; "
                     "model it from per-length forward timings beyond")
flags.DEFINE_integer("forward_reps", 3, "timed forwards per padded length (median)")
flags.DEFINE_string("out", "bench/results/generate_speed.json", "where the results go")

PROMPT_TEXT = (
    "The page cache is the main disk cache used by the Linux kernel. In most cases, the kernel "
    "refers to the page cache when reading from or writing to disk. New pages are added to the "
    "page cache to satisfy user mode processes' read requests. If the page is not already in the "
    "cache, a new entry is added to the cache and filled with the data read from the disk. If "
    "there is enough free memory, the page is kept in the cache for an indefinite period of time "
    "and can then be reused by other processes without accessing the disk.")


def bench_config(vocab_size: int) -> RetroConfig:
  """The registry's tiny RETRO with the database's vocabulary and a 256-wide encoder."""
  return SIZES["tiny"].replace(vocab_size=vocab_size, encoder_d_model=256, encoder_num_heads=4)


def loadavg() -> list[float]:
  with open("/proc/loadavg") as f:
    return [float(x) for x in f.read().split()[:3]]


class TimedFullRecompute(gen.FullRecompute):
  """`retro_jax.sampling.generate.FullRecompute` plus the per-length forward timing the model rows use."""

  def time_forward(self, t: int, k: int, reps: int) -> float:
    """Median seconds of one forward over t tokens (neighbours present), after a compile call."""
    ids = list(np.random.default_rng(t).integers(4, self.config.vocab_size, t))
    nbrs = self.padded_nbrs(t, k)
    nbrs[:] = np.random.default_rng(t + 1).integers(4, self.config.vocab_size, nbrs.shape)
    self.forward(ids, nbrs).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      self.forward(ids, nbrs).block_until_ready()
      times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
  del argv
  lengths = sorted(int(x) for x in FLAGS.lengths)
  load_start = loadavg()
  gflops = matmul_gflops(jnp.float32)
  t_setup = time.perf_counter()
  retrieval = gen.DatabaseRetrieval.from_db(FLAGS.db, num_neighbours=2, neighbour_len=128)
  config = bench_config(retrieval.tokenizer.vocab_size)
  retrieval.check_model(config)
  k, m = config.num_neighbours, config.chunk_size
  model = Retro(config, rngs=nnx.Rngs(0))
  prompt = retrieval.tokenizer.encode(PROMPT_TEXT)[:m]
  if len(prompt) != m:
    raise ValueError(f"prompt text gives {len(prompt)} < {m} tokens")
  setup_s = time.perf_counter() - t_setup
  print(f"setup (db, embedder, index, model) {setup_s:.1f}s; matmul {gflops:.0f} GFLOP/s; "
        f"load {load_start}", flush=True)

  rows = {}
  # Cached decoding: one warm-up (compile) and one timed run per length.
  for n in reversed(lengths):  # longest first: its queries warm every embedder bucket
    dec = Decoder(model, max_len=len(prompt) + n)
    kw = dict(max_new_tokens=n, temperature=0.0, decoder=dec)
    t0 = time.perf_counter()
    gen.generate(model, config, prompt, retrieval, **kw)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = gen.generate(model, config, prompt, retrieval, **kw)
    wall = time.perf_counter() - t0
    rows[n] = {"new_tokens": n, "cached": {
        "seconds": wall, "tokens_per_s": n / wall, "first_run_with_compile_s": warm,
        "retrievals": len(out.retrievals), "retrieval_seconds": out.seconds["retrieval"],
        "prefill_seconds": out.seconds["prefill"], "decode_seconds": out.seconds["decode"]}}
    rows[n]["_ids"] = out.new_ids
    print(f"cached  N={n:5d}: {n / wall:8.1f} tok/s ({wall:.2f}s, {len(out.retrievals)} "
          f"retrievals {out.seconds['retrieval']:.2f}s; first run {warm:.1f}s)", flush=True)

  # Full recompute: per padded length, the forward's median time (compiles every length).
  full = TimedFullRecompute(model, config)
  max_t = len(prompt) + max(lengths) - 1
  per_len = {}
  t0 = time.perf_counter()
  for l in range(1, math.ceil(max_t / m) + 1):
    per_len[l * m] = full.time_forward(l * m, k, FLAGS.forward_reps)
    print(f"full forward T={l * m:5d}: {per_len[l * m] * 1e3:8.1f} ms", flush=True)
  forward_timing_s = time.perf_counter() - t0

  for n in lengths:
    ret_s = rows[n]["cached"]["retrieval_seconds"]
    steps = sum(per_len[math.ceil(t / m) * m] for t in range(len(prompt), len(prompt) + n))
    model_s = steps + ret_s
    entry = {"modelled_seconds": model_s, "modelled_tokens_per_s": n / model_s}
    if n <= FLAGS.full_measure_max:
      out = full.generate(prompt, retrieval, n, k)
      entry.update(seconds=out["seconds"], tokens_per_s=n / out["seconds"],
                   retrieval_seconds=out["retrieval_seconds"], measured=True,
                   same_tokens_as_cached=out["new_ids"] == rows[n]["_ids"])
      print(f"full    N={n:5d}: {n / out['seconds']:8.1f} tok/s measured, "
            f"{n / model_s:8.1f} modelled", flush=True)
    else:
      entry.update(seconds=model_s, tokens_per_s=n / model_s, measured=False)
      print(f"full    N={n:5d}: {n / model_s:8.1f} tok/s modelled", flush=True)
    rows[n]["full_recompute"] = entry
    rows[n]["speedup"] = rows[n]["cached"]["tokens_per_s"] / entry["tokens_per_s"]
    del rows[n]["_ids"]

  result = {
      "what": "greedy generation tokens/s: incremental decoder (KV cache + cached encoded "
              "neighbours) vs full recompute per token; retrieval at every chunk boundary with a "
              "real MiniLM + ScaNN Retriever on the database, included in both",
      "command": "python -m bench.generate_speed " + " ".join(
          f"--{f}={getattr(FLAGS, f) if not isinstance(getattr(FLAGS, f), list) else ','.join(getattr(FLAGS, f))}"
          for f in ("db", "lengths", "full_measure_max", "forward_reps")),
      "model": {"d_model": 256, "heads": 4, "head_size": 64, "layers": 4, "ffw": 1024,
                "cca_layers": list(config.cca_layers), "encoder_layers": 2, "encoder_width": 256,
                "vocab": config.vocab_size, "chunk": m, "k": k, "r": config.neighbour_len,
                "dtype": "float32", "weights": "random init (speed only)"},
      "prompt_tokens": len(prompt),
      "db": FLAGS.db, "retriever": "in-process Retriever.from_db (ScaNN), MiniLM bf16 embedder",
      "full_recompute_method": "jitted model(tokens, neighbours) over all tokens so far padded to "
                               "a multiple of m, every token; measured end to end for N <= "
                               f"{FLAGS.full_measure_max}, modelled beyond from per-length "
                               "forward timings + the cached run's retrieval time",
      "full_forward_ms_by_padded_length": {str(t): s * 1e3 for t, s in per_len.items()},
      "rows": [rows[n] for n in lengths],
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "jax": jax.__version__, "matmul_fp32_gflops": gflops,
                  "loadavg_start": load_start, "loadavg_end": loadavg(),
                  "note": "2 CPU cores shared with other processes"},
      "setup_seconds": setup_s, "forward_timing_seconds": forward_timing_s,
  }
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  result["provenance"] = run_provenance("bench.generate_speed")
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
