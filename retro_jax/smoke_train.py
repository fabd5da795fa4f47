r"""A short CPU training of the tiny config on synthetic tokens (the interim `make demo`).

    python -m retro_jax.smoke_train --steps=600

Sequences are random tokens; the first neighbour of chunk u holds chunk u+1 (its continuation),
the second is noise. A decoder cannot predict random tokens (loss stays near log V), but RETRO
can copy them from the retrieved continuation, so its loss falls below the baseline's.
"""
from __future__ import annotations

import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from retro_jax import optim  # noqa: E402
from retro_jax.model import PAPER_SIZES  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.train_step import TrainStep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 600, "training steps per model")
flags.DEFINE_integer("batch", 8, "sequences per batch")
flags.DEFINE_integer("seq_len", 64, "tokens per sequence")
flags.DEFINE_integer("seed", 0, "data and init seed")


def synthetic_batch(rng: np.random.Generator, cfg, batch: int, seq_len: int) -> dict:
  m, r, v = cfg.chunk_size, cfg.neighbour_len, cfg.vocab_size
  toks = rng.integers(1, v, (batch, seq_len + m + r)).astype(np.int32)
  l = cfg.num_chunks(seq_len)
  nbrs = np.empty((batch, l, cfg.num_neighbours, r), np.int32)
  for u in range(l):
    nbrs[:, u, 0] = toks[:, (u + 1) * m:(u + 1) * m + r]  # the true continuation of chunk u
  nbrs[:, :, 1:] = rng.integers(1, v, nbrs[:, :, 1:].shape)  # distractors
  return {"inputs": toks[:, :seq_len], "targets": toks[:, 1:seq_len + 1], "neighbours": nbrs}


def main(argv):
  del argv
  cfg = PAPER_SIZES["tiny"]
  mesh = make_mesh((-1, 1, 1))
  print(f"tiny RETRO (d={cfg.d_model}, {cfg.num_layers} layers, CCA at {cfg.cca_layers}) and its "
        f"baseline, {FLAGS.steps} steps of {FLAGS.batch} x {FLAGS.seq_len} synthetic tokens on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); log V = "
        f"{math.log(cfg.vocab_size):.2f}")
  final = {}
  for name, model_cfg in (("RETRO", cfg), ("baseline", cfg.baseline())):
    train = TrainStep(model_cfg, optim.adamw(3e-3, warmup_steps=10, total_steps=FLAGS.steps),
                      mesh, seed=FLAGS.seed)
    state = train.init()
    rng = np.random.default_rng(FLAGS.seed)
    t0 = time.time()
    bar = tqdm(range(FLAGS.steps), desc=name, unit="step")
    losses = []
    for _ in bar:
      batch = synthetic_batch(rng, cfg, FLAGS.batch, FLAGS.seq_len)
      if not model_cfg.retrieval:
        batch.pop("neighbours")
      state, metrics = train.step(state, batch)
      losses.append(float(metrics["loss"]))
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
    final[name] = float(np.mean(losses[-10:]))
    print(f"{name}: final loss (mean of last 10 steps) {final[name]:.3f} in "
          f"{time.time() - t0:.1f} s")
  print(f"RETRO - baseline: {final['RETRO'] - final['baseline']:+.3f} nats/token")


if __name__ == "__main__":
  app.run(main)
