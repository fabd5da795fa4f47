"""Evaluation and sampling sharded over 8 fake CPU devices give what one device gives.

A tiny RETRO checkpoint on the tiny real database, evaluated (retrieval on and off) and sampled
greedily on one device and on meshes of all 8 devices (tests/sharded_serving_worker.py): the same
bpb (only the order of float32 reductions differs: 1e-5 relative), the same per-chunk losses
(1e-4 nats), the same greedy tokens from `generate` and from a batch of 8 through the `Decoder`;
the weights restored sharded by the training rules and the decode caches sharded.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

from retro_jax.db.chunk_store import ChunkStore  # noqa: E402
from retro_jax.model import SIZES, Retro  # noqa: E402
from retro_jax.training import checkpoint as ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir_and_db(tmp_path_factory):
  db = tiny_db.get(tmp_path_factory)[0]
  store = ChunkStore.open(db)
  m = store.chunk_size
  config = SIZES["test"].replace(vocab_size=int(store.manifest["tokenizer"]["vocab_size"]),
                                 chunk_size=m, neighbour_len=2 * m)
  model = Retro(config, rngs=nnx.Rngs(0))
  workdir = tmp_path_factory.mktemp("sharded_model")
  mngr = ckpt.manager(workdir / ckpt.CHECKPOINTS, async_save=False)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  ckpt.save(mngr, 3, nnx.state((model, optimizer)), None,
            {"model_config": config.to_dict(), "db": str(db), "step": 3})
  mngr.wait_until_finished()
  return str(workdir), str(db)


# 2x2x2 splits over every axis at once (make test); 8x1x1, data parallel only, is `make test-slow`.
@pytest.mark.parametrize("shapes", [
    ("2x2x2",), pytest.param(("2x2x2", "8x1x1"), marks=pytest.mark.slow)], ids=["2x2x2", "both"])
def test_sharded_evaluation_and_sampling_match_one_device(workdir_and_db, shapes):
  workdir, db = workdir_and_db
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_serving_worker.py"),
                         workdir, db, *shapes], capture_output=True, text=True,
                        timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["mesh"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines()
                                                  if line.startswith("{")))}
  assert set(rows) == {"1x1x1", *shapes}
  one = rows["1x1x1"]
  assert one["result_mesh"] == {"data": 1, "fsdp": 1, "model": 1}
  assert one["embed_devices"] == 1 and set(one["bpb"]) == {"on", "off"}
  for shape in shapes:
    r = rows[shape]
    d, f, m = (int(x) for x in shape.split("x"))
    assert r["result_mesh"] == {"data": d, "fsdp": f, "model": m}
    for mode, want in one["bpb"].items():
      assert abs(r["bpb"][mode] - want) <= 1e-5 * want, (shape, mode, r["bpb"], one["bpb"])
      np.testing.assert_allclose(r["chunk_loss_nats"][mode], one["chunk_loss_nats"][mode],
                                 atol=1e-4)
    assert r["generate_ids"] == one["generate_ids"], shape
    assert r["decoder_ids"] == one["decoder_ids"], shape
    # The weights live on all 8 devices, by the training rules: the embedding table [V, D] is
    # split over "model" on its vocabulary and over "fsdp" on d_model.
    assert r["embed_devices"] == 8
    assert r["embed_spec"] == ["model", "fsdp"]
    assert r["embed_shard_shape"] == [r["embed_shape"][0] // m, r["embed_shape"][1] // f]
    # The caches and logits of the batch of 8 on all 8 devices: batch over data and fsdp, heads
    # over model ([B, S, H, K] self-attention keys, [B, N, R, H, K] CCA slot keys, [B, V] logits).
    b_, h_ = r["cache_k"]["shape"][0], r["cache_k"]["shape"][2]
    assert r["cache_k"]["devices"] == r["cache_slot"]["devices"] == r["logits"]["devices"] == 8
    assert r["cache_k"]["shard"] == [b_ // (d * f), r["cache_k"]["shape"][1], h_ // m,
                                     r["cache_k"]["shape"][3]]
    assert r["cache_slot"]["shard"] == [b_ // (d * f), *r["cache_slot"]["shape"][1:3], h_ // m,
                                        r["cache_slot"]["shape"][4]]
    assert r["logits"]["shard"] == [b_ // (d * f), r["logits"]["shape"][1]]
  assert rows["2x2x2"]["embed_shard_shape"] != rows["2x2x2"]["embed_shape"]  # really split
