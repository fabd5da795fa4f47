"""Run in a subprocess with 8 fake CPU devices: evaluation and greedy sampling of one checkpoint on
one device and on meshes of all 8, as `evaluate --mesh` and `sample --mesh` run them.

    python tests/sharded_serving_worker.py WORKDIR DB 2x2x2 8x1x1

Prints one JSON line per mesh (the single-device run first, mesh 1x1x1): the bpb per mode and the
per-chunk losses, the greedy tokens of `generate` (one prompt, retrieval on), the greedy tokens of a
batch of 8 prompts through the `Decoder`, and where the weights and the caches were placed.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +  # the run's flags (conftest.py)
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from retro_jax import flags as shared  # noqa: E402
from retro_jax.evaluation import bpb  # noqa: E402
from retro_jax.model.decode import Decoder  # noqa: E402
from retro_jax.sampling import generate as gen  # noqa: E402
from retro_jax.training.checkpoint import load_model  # noqa: E402

PROMPT = ("The page cache keeps file data in memory so that reads and writes of recently used "
          "pages do not have to go to the disk.")


def spec(x) -> list:
  """The PartitionSpec of x's sharding, one entry per dimension (JSON-able)."""
  entries = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return [list(e) if isinstance(e, tuple) else e for e in entries]


def shards(x) -> dict:
  """x's shape, one device's shard shape, and on how many devices it lives."""
  return {"shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape),
          "devices": len(x.sharding.device_set)}


def run(workdir: str, db: str, shape: str, retrieval) -> dict:
  devices = jax.devices() if shape != "1x1x1" else jax.devices()[:1]
  mesh = shared.mesh_from_flag(shape.split("x"), devices)
  res = bpb.evaluate(workdir, db=db, seq_len=128, stride=64, max_docs=3, retrieval="both",
                     batch_size=4, progress=False, mesh=mesh)
  model, config, _ = load_model(workdir, mesh=mesh)
  table = model.embed.table.value
  prompt = retrieval.tokenizer.encode(PROMPT)
  out = gen.generate(model, config, prompt, retrieval, max_new_tokens=40, temperature=0.0,
                     mesh=mesh)
  # A batch of 8 prompts (64 tokens: one complete chunk) decoded greedily for 72 tokens, which
  # complete two more chunks; neighbours: fixed random tokens.
  rng = np.random.default_rng(0)
  m, k, r = config.chunk_size, config.num_neighbours, config.neighbour_len
  prompts = rng.integers(1, config.vocab_size, (8, m)).astype(np.int32)
  nbrs = rng.integers(1, config.vocab_size, (8, 3, k, r)).astype(np.int32)
  dec = Decoder(model, max_len=3 * m + 8, mesh=mesh)
  logits, state = dec.prefill(prompts, nbrs[:, :1])
  toks = []
  for _ in range(2 * m + 8):
    tok = np.asarray(jax.numpy.argmax(logits, -1), np.int32)
    toks.append(tok.tolist())
    step_nbrs = nbrs[:, (state.length + 1) // m - 1] if dec.completes_chunk(state) else None
    logits, state = dec.step(state, tok, step_nbrs)
  return {
      "mesh": shape, "result_mesh": res["mesh"],
      "bpb": {mode: r["bpb"] for mode, r in res["results"].items()},
      "chunk_loss_nats": res["chunk_loss_nats"],
      "generate_ids": out.new_ids, "decoder_ids": toks,
      "embed_spec": spec(table), "embed_devices": len(table.sharding.device_set),
      "embed_shard_shape": list(table.addressable_shards[0].data.shape),
      "embed_shape": list(table.shape),
      "cache_k": shards(state.arrays["self"][0]["k"]),
      "cache_slot": shards(state.arrays["cca"][0]["k"]),
      "logits": shards(logits)}


def main():
  assert jax.device_count() == 8, jax.devices()
  workdir, db, *meshes = sys.argv[1:]
  _, config, _ = load_model(workdir)
  retrieval = gen.DatabaseRetrieval.from_db(db, config.num_neighbours, config.neighbour_len)
  for shape in ["1x1x1", *meshes]:
    print(json.dumps(run(workdir, db, shape, retrieval)), flush=True)


if __name__ == "__main__":
  main()
