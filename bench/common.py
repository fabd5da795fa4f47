"""Shared by the benchmarks: JAX's own matmul rate on this machine, measured in the same run."""
import statistics
import time

import jax


def matmul_gflops(dtype, n: int = 2048, reps: int = 10) -> float:
  """GFLOP/s of a jitted n x n x n matmul, median of `reps` timed calls after one warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9
