"""Run in a subprocess with 8 fake CPU devices: one training step on several meshes vs 1 device.

Prints one JSON line per mesh with the max differences against the single-device run.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +  # the run's flags (conftest.py)
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from retro_jax.model import SIZES  # noqa: E402
from retro_jax.model.partitioning import make_mesh  # noqa: E402
from retro_jax.training.step import TrainStep  # noqa: E402


def run(mesh_shape, devices, batches):
  cfg = SIZES["test"]
  train = TrainStep(cfg, optax.adamw(1e-3, weight_decay=0.1), make_mesh(mesh_shape, devices))
  state = train.init()
  init = jax.tree.map(np.array, state)  # copied: the step donates `state`
  losses = []
  for batch in batches:
    state, metrics = train.step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, init, jax.tree.map(np.asarray, state)


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = SIZES["test"]
  rng = np.random.default_rng(0)
  b, t = 8, 32
  batches = []
  for _ in range(2):
    toks = rng.integers(1, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    toks[:, -3:] = cfg.pad_id  # padded targets are masked out of the loss
    batches.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                    "neighbours": rng.integers(1, cfg.vocab_size, (b, t // cfg.chunk_size,
                                               cfg.num_neighbours, cfg.neighbour_len)
                                               ).astype(np.int32)})
  ref_losses, ref_init, ref_state = run((1, 1, 1), jax.devices()[:1], batches)
  sq = lambda tree: sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(tree))
  ref_update = sq(jax.tree.map(np.subtract, ref_state, ref_init))
  for shape in [tuple(int(x) for x in s.split("x")) for s in sys.argv[1:]]:
    losses, init, state = run(shape, jax.devices(), batches)
    diff = jax.tree.map(np.subtract, state, ref_state)
    print(json.dumps({
        "mesh": shape, "losses": losses, "ref_losses": ref_losses,
        "init_max_diff": max(float(np.max(np.abs(a - b), initial=0.0))
                             for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(ref_init))),
        "state_max_diff": max(float(np.max(np.abs(x), initial=0.0)) for x in jax.tree.leaves(diff)),
        "update_rel_err": (sq(diff) / ref_update) ** 0.5}), flush=True)


if __name__ == "__main__":
  main()
