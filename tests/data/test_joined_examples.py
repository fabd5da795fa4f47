"""Examples joined with their neighbours ahead of time (the `examples` stage, a real Beam pipeline
on the DirectRunner, and real ArrayRecord shards): the same batches as the database path, on one
host and split over two, a resume that continues identically, and stale sets refused."""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_jax.build import plan as plan_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.training import examples_stage
from retro_jax.training import input_pipeline as loader
from retro_jax.training import joined_examples as joined

import tiny_db  # noqa: E402

T = 256  # 4 chunks per sequence
SETTINGS = joined.Settings(split="train", seq_len=T, retrieval=True, num_neighbours=2,
                           neighbour_len=128, seed=3)
KW = dict(seq_len=T, num_neighbours=2, seed=3)


@pytest.fixture(scope="module")
def joined_db(db, tmp_path_factory):
  """A copy of the tiny database (the shared one stays without examples) with the examples of
  SETTINGS: 2 epochs in shards of 16 records (several shards, the last one short)."""
  copy = tmp_path_factory.mktemp("joined") / "db"
  shutil.copytree(db, copy)
  examples_stage.run(copy, SETTINGS, epochs=2, examples_per_shard=16)
  return copy


take = tiny_db.take
# Both input paths give int32 arrays.
assert_batches_equal = functools.partial(tiny_db.assert_batches_equal, dtype=np.int32)


def test_the_stage_writes_shards_and_a_manifest(joined_db):
  directory = joined.examples_dir(joined_db, SETTINGS)
  manifest = json.loads((directory / joined.MANIFEST).read_text())
  n = len(loader.SequenceSource(joined_db, T, num_neighbours=2, seed=3))
  assert manifest["num_sequences"] == n and manifest["num_records"] == 2 * n
  assert manifest["num_shards"] == -(-2 * n // 16) > 2
  assert sorted(p.name for p in directory.glob("shard-*.arr")) == [
      f"shard-{s:05d}.arr" for s in range(manifest["num_shards"])]
  assert manifest["token_dtype"] == "uint16"  # vocabulary 1000
  # A second run finds it finished and writes nothing.
  before = {p.name: os.stat(os.fspath(p)).st_mtime_ns for p in directory.iterdir()}
  examples_stage.run(joined_db, SETTINGS, epochs=2, examples_per_shard=16)
  assert {p.name: os.stat(os.fspath(p)).st_mtime_ns for p in directory.iterdir()} == before


def test_joined_batches_are_the_database_paths_byte_for_byte(joined_db):
  n = json.loads((joined.examples_dir(joined_db, SETTINGS) / joined.MANIFEST).read_text())[
      "num_sequences"]
  steps = 2 * n // 4 + 3  # through both written epochs and past them (read again from the start)
  kw = dict(batch_size=4, process_index=0, process_count=1, **KW)
  random = take(loader.make_iterator(joined_db, input="random", **kw), 2 * n // 4)
  assert str(loader.make_dataset(joined_db, input="joined", **kw)) == (
      "SourceMapDataset(source=JoinedBatches)")
  both = take(loader.make_iterator(joined_db, input="joined", **kw), steps)
  assert_batches_equal(both[:len(random)], random)
  assert_batches_equal(both[len(random):], both[:steps - len(random)])
  # "auto" finds the finished set: the same batches.
  assert_batches_equal(take(loader.make_iterator(joined_db, **kw), 5), random[:5])


def test_two_hosts_read_their_rows_of_the_same_global_batches(joined_db):
  random = take(loader.make_iterator(joined_db, batch_size=4, process_index=0, process_count=1,
                                     input="random", **KW), 6)
  parts = [take(loader.make_iterator(joined_db, batch_size=2, process_index=p, process_count=2,
                                     input="joined", **KW), 6) for p in range(2)]
  for step, whole in enumerate(random):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[key])


def test_resume_from_the_iterator_state_continues_identically(joined_db):
  kw = dict(batch_size=3, process_index=0, process_count=1, input="joined", **KW)
  it = loader.make_iterator(joined_db, **kw)
  take(it, 7)
  state = it.get_state()
  expected = take(it, 6)
  fresh = loader.make_iterator(joined_db, **kw)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 6), expected)
  # The state is the database path's too: a run may change paths at a checkpoint.
  other = loader.make_iterator(joined_db, **{**kw, "input": "random"})
  other.set_state(state)
  assert_batches_equal(take(other, 6), expected)


def test_heldout_split_in_order_once(joined_db):
  heldout = dataclasses.replace(SETTINGS, split="heldout")
  examples_stage.run(joined_db, heldout, examples_per_shard=16)
  kw = dict(seq_len=T, batch_size=1, split="heldout", num_neighbours=2, seed=3, process_index=0,
            process_count=1)
  assert_batches_equal(list(loader.make_iterator(joined_db, input="joined", **kw)),
                       list(loader.make_iterator(joined_db, input="random", **kw)))


def test_stale_or_missing_examples_are_refused(joined_db, tmp_path):
  kw = dict(batch_size=2, process_index=0, process_count=1, input="joined")
  with pytest.raises(joined.JoinedExamplesError, match="no finished examples.*--stages=examples"):
    loader.make_dataset(joined_db, **{**KW, "seed": 4}, **kw)  # none built for this seed
  copy = tmp_path / "db"
  shutil.copytree(joined_db, copy)
  directory = joined.examples_dir(copy, SETTINGS)
  # An edit of the database (a document removed) makes the examples stale.
  store = chunk_store_lib.ChunkStore.open(copy)
  deletions = store.root / chunk_store_lib.DELETIONS
  assert not deletions.exists()
  subprocess.run([sys.executable, "-m", "retro_jax.edit_db", f"--db={copy}", "--remove_docs=0"],
                 check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                 timeout=600)
  with pytest.raises(joined.JoinedExamplesError, match="stale: the database changed"):
    loader.make_dataset(copy, **KW, **kw)
  # "auto" reads the database instead (and says so).
  assert "JoinedBatches" not in str(loader.make_dataset(copy, **KW, **{**kw, "input": "auto"}))
  # The stage refuses to overwrite them without --rebuild, and rewrites them with it.
  with pytest.raises(joined.JoinedExamplesError, match="--rebuild"):
    examples_stage.run(copy, SETTINGS, epochs=2, examples_per_shard=16)
  examples_stage.run(copy, SETTINGS, epochs=2, examples_per_shard=16, rebuild=True)
  a = take(loader.make_iterator(copy, **KW, **{**kw, "input": "joined"}), 3)
  b = take(loader.make_iterator(copy, **KW, **{**kw, "input": "random"}), 3)
  assert_batches_equal(a, b)
  assert (directory / joined.MANIFEST).exists()


def test_the_job_graph_does_not_grow_with_the_examples(joined_db):
  """At most plan.PLAN_RANGES shard ranges in the graph: 100,000 shards or 1,000,000, the same
  number of descriptors (each number a byte wider: at most 2 bytes more per range)."""
  many = examples_stage.plan_bytes(joined_db, SETTINGS, epochs=1000, examples_per_shard=1)
  more = examples_stage.plan_bytes(joined_db, SETTINGS, epochs=10000, examples_per_shard=1)
  assert more - many <= 2 * 2 * plan_lib.PLAN_RANGES


def test_on_gs_the_stage_uploads_shards_and_the_loader_reads_them(db, gcs, tmp_path):
  """A database in a (emulated) bucket: the stage writes each shard locally and uploads it whole;
  the loader reads the runs of records through array_record's own GCS reader."""
  bucket = gcs.client.bucket(gcs.bucket)
  for d, _, files in os.walk(db):
    for f in files:
      if "/examples/" not in os.path.join(d, f):
        p = os.path.join(d, f)
        bucket.blob(f"db/{os.path.relpath(p, db)}").upload_from_filename(p)
  gs_db = f"gs://{gcs.bucket}/db"
  examples_stage.run(gs_db, SETTINGS, epochs=1, examples_per_shard=32)
  name = SETTINGS.name()
  assert f"db/examples/{name}/{joined.MANIFEST}" in gcs.names("db/examples/")
  kw = dict(batch_size=2, process_index=1, process_count=2, **KW)
  assert_batches_equal(take(loader.make_iterator(gs_db, input="joined", **kw), 8),
                       take(loader.make_iterator(db, input="random", **kw), 8))
