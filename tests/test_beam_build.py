"""The database build as a Beam pipeline (retro_jax/build/pipeline.py) against the plain stage
functions (the global index built in process, neighbours searched in process), killed with
SIGKILL while embedding then started again, and the index and routed neighbours resumed after a
partial run."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import apache_beam as beam_lib
import corpus_path  # tests/corpus_path.py
import numpy as np
import pytest

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.build import pipeline as pipeline_lib
from retro_jax.build import stages as build_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, prepare, provenance
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.embedder import Embedder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = corpus_path.spec(kernel=12, wiki=24)
SETTINGS = dict(corpus=SPEC, vocab_size=500, docs_per_shard=4, heldout_fraction=0.1)


def _digests(root) -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(root):
    for f in files:
      p = os.path.join(base, f)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """Tokenizer, chunk store and embeddings by the stage functions themselves (no Beam)."""
  db = tmp_path_factory.mktemp("plain")
  tok = prepare.build_tokenizer(SPEC, db, vocab_size=500, heldout_fraction=0.1)
  chunk_store_lib.build_chunk_store(SPEC, db / layout.CHUNKS_DIR, tok, docs_per_shard=4,
                                    heldout_fraction=0.1, progress=False)
  embed_lib.embed_chunk_store(db, Embedder.load(dtype="bfloat16", batch_size=32))
  build_index_lib.build_global_index(str(db))  # global_index.build, in process
  neighbours_lib.compute_neighbours(db, k=2)  # the whole Retriever, in process
  return db


@pytest.fixture(scope="module")
def beam(plain, tmp_path_factory):
  """Every stage by the Beam pipeline (in-process runner), uninterrupted, the same tokenizer."""
  db = tmp_path_factory.mktemp("beam")
  record = build_lib.build(db, **{**SETTINGS, "tokenizer": str(plain / layout.TOKENIZER_PATH)})
  assert not any(record["stages"][s]["skipped"] for s in build_lib.STAGES)
  return db


def test_beam_build_gives_the_stage_functions_bytes(plain, beam):
  db = beam
  want, got = _digests(plain / layout.CHUNKS_DIR), _digests(db / layout.CHUNKS_DIR)
  assert len(want) > 9 * 5 and got == want  # every shard file, marker and the manifest
  want, got = _digests(plain / layout.EMBEDDINGS_DIR), _digests(db / layout.EMBEDDINGS_DIR)
  assert got == want  # the .npy and its progress record; no part file left behind
  _same_index(plain, db)
  # The routed neighbours job: the in-process search's bytes and progress records.
  want, got = _digests(plain / layout.NEIGHBOURS_DIR), _digests(db / layout.NEIGHBOURS_DIR)
  assert len(want) == 2 * 9 and got == want


def test_outputs_record_reads_shard_groups_in_parallel(beam, tmp_path, monkeypatch):
  """The outputs record's checksum: with one group (today's databases) the format-1 checksum
  over every shard's; with several, the pipeline's groups (read in parallel) give the serial
  read's record, which differs from the one-group one."""
  db = tmp_path / "db"
  for sub in (layout.CHUNKS_DIR, layout.EMBEDDINGS_DIR, layout.NEIGHBOURS_DIR, "provenance"):
    shutil.copytree(beam / sub, db / sub)
  num_shards = chunk_store_lib.ChunkStore.open(db).num_shards
  for stage, path in (("embeddings", layout.embeddings_path),
                      ("neighbours", layout.neighbours_path)):
    flat = layout.sha256_bytes(json.dumps([
        json.loads(layout.progress_path(path(db, s)).read_text())["sha256"]
        for s in range(num_shards)]).encode())
    assert provenance.read_outputs(beam, stage)["sha256"] == flat
    monkeypatch.setattr(provenance, "OUTPUTS_GROUP_SHARDS", 2)
    provenance.outputs_path(db, stage).unlink()
    with beam_lib.Pipeline() as p:
      pipeline_lib._outputs_record(p | beam_lib.Create([0]), str(db), stage)
    grouped = provenance.read_outputs(db, stage)
    assert provenance.outputs_groups(num_shards) == -(-num_shards // 2) >= 4
    assert grouped == provenance.write_outputs(db, stage, num_shards) and grouped["sha256"] != flat
    monkeypatch.undo()


def _same_index(a, b) -> None:
  """Every file of the two global indexes by sha256; the manifests but for their build times."""
  want, got = _digests(global_lib.index_dir(a)), _digests(global_lib.index_dir(b))
  assert sorted(got) == sorted(want) and len(got) >= 7
  assert not [k for k in got if k.startswith(global_lib.PARTS)]  # no parts/ left behind
  assert {k: v for k, v in got.items() if k != layout.MANIFEST} == {
      k: v for k, v in want.items() if k != layout.MANIFEST}
  manifests = [global_lib.read_manifest(global_lib.index_dir(d)) for d in (a, b)]
  for m in manifests:
    del m["build_seconds"]
  assert manifests[0] == manifests[1]


def _copy_through_embeddings(src, dst):
  for sub in ("tokenizer", layout.CHUNKS_DIR, layout.EMBEDDINGS_DIR):
    shutil.copytree(src / sub, dst / sub)
  return dst


def test_index_and_routed_neighbours_resume_after_a_partial_run(plain, tmp_path, capsys,
                                                               monkeypatch):
  """Three serving shards (queries routed to some of them), encode groups of one embeddings
  shard: after a run that trained, encoded one group and finished two neighbours blocks, the
  stages do only the rest, and the bytes are the in-process build's."""
  config = global_lib.GlobalIndexConfig(serving_shards=3, nprobe=4)
  ref = _copy_through_embeddings(plain, tmp_path / "ref")
  build_index_lib.build_global_index(str(ref), config)  # one encode group: the same bytes
  neighbours_lib.compute_neighbours(ref, k=2)
  monkeypatch.setattr(global_lib, "ENCODE_GROUP_SOURCES", 1)

  db = _copy_through_embeddings(plain, tmp_path / "db")
  sources = retriever_lib.db_global_sources(str(db))
  root = global_lib.index_dir(db)
  c = global_lib.prepare_build(sources, root, config)
  assert global_lib.train_step(sources, root, c)
  assert global_lib.encode_step(1, [sources[1]], root)
  kept = {p: os.stat(root / p).st_ino for p in ("trained.faiss", "scale.npy")}
  capsys.readouterr()
  cfg = {**build_lib.DEFAULTS, "backend": "global", "global_index_config": config}
  pipeline_lib.run_stage("index", db, cfg)
  _same_index(ref, db)
  assert {p: os.stat(root / p).st_ino for p in kept} == kept  # not written again
  out = capsys.readouterr().out
  assert "[build_db] index: kept the trained partitioner and quantizer" in out
  assert "embeddings shards 1..1 kept" in out and "embeddings shards 0..0 encoded" in out

  g = global_lib.GlobalIndex(root)
  emb = np.concatenate([np.asarray(e, np.float32) for _, e, _ in sources])
  parts, _ = g.route(emb, neighbours_lib.first_fetch(2, len(emb), True) * retriever_lib.OVERFETCH)
  reach = np.stack([g.reaches(parts, [s]) for s in range(3)], axis=1)
  assert (~reach).any() and reach.any(axis=1).all()  # routed: not every query to every shard

  finished = [0, 3]  # one block each, from an earlier run
  for shard in finished:
    part = layout.neighbours_part_path(db, shard, 0)
    part.parent.mkdir(parents=True, exist_ok=True)
    np.save(part, np.load(layout.neighbours_path(ref, shard)))
  pipeline_lib.run_stage("neighbours", db, cfg)
  out = capsys.readouterr().out
  num_shards = len(chunk_store_lib.ChunkStore.open(db).shard_spans())
  searched = {int(s) for s in re.findall(r"neighbours: shard (\d+) rows 0\.\.\d+ searched", out)}
  assert searched == set(range(num_shards)) - set(finished), out
  assert out.count("assembled") == num_shards
  want, got = _digests(ref / layout.NEIGHBOURS_DIR), _digests(db / layout.NEIGHBOURS_DIR)
  assert got == want and len(want) == 2 * num_shards  # no parts/ left behind


def _build_cmd(db) -> list[str]:
  return [sys.executable, "-m", "retro_jax.build_db", f"--db={db}",
          *(f"--{k}={v}" for k, v in SETTINGS.items()), "--runner=DirectRunner"]


def test_killed_while_embedding_resumes_without_redoing_blocks(plain, beam, tmp_path):
  db = tmp_path / "killed"
  parts = db / layout.EMBEDDINGS_DIR / layout.EMBEDDING_PARTS_DIR
  cmd = _build_cmd(db) + [f"--tokenizer={plain / layout.TOKENIZER_PATH}"]
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)  # its own group: SIGKILL reaches any worker
  deadline = time.monotonic() + 240
  finished: dict[str, tuple[int, int]] = {}
  while time.monotonic() < deadline and proc.poll() is None:
    found = sorted(parts.glob("shard-*/rows-*.npy")) if parts.exists() else []
    if len(found) >= 2:
      os.killpg(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, open(tmp_path / "killed.log").read()[-3000:]
  for p in sorted(parts.glob("shard-*/rows-*.npy")):
    st = p.stat()
    finished[p.parent.name] = (st.st_ino, st.st_mtime_ns)
  num_shards = len(chunk_store_lib.ChunkStore.open(db).shard_spans())
  assert 2 <= len(finished) < num_shards  # killed in the middle of the embedding stage
  assert not (db / "neighbours").exists()

  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
  out = rerun.stdout + rerun.stderr
  for shard in finished:  # its finished block was kept, not embedded again
    n = layout.shard_number(shard)
    assert f"shard {n} assembled (0 blocks embedded, 1 kept)" in out, out[-3000:]
    assert f"embeddings: shard {n} rows 0.." not in out
  assert "[build_db] chunks: already done, skipped" in out
  assert not parts.exists() or not any(parts.rglob("*.npy"))

  # The uninterrupted build's bytes, every stage (chunks, embeddings, index, neighbours, records);
  # the global index's manifest differs only in its build times.
  index_manifest = os.path.join("index", "global", "manifest.json")
  skip = {layout.BUILD_TIMES, index_manifest}
  want = {k: v for k, v in _digests(beam).items() if k not in skip}
  got = {k: v for k, v in _digests(db).items() if k not in skip}
  assert sorted(got) == sorted(want) and len(got) > 40
  assert got == want
  manifests = [json.loads((d / index_manifest).read_text()) for d in (beam, db)]
  for m in manifests:
    del m["build_seconds"]
  assert manifests[0] == manifests[1]


def test_routed_neighbours_keep_their_searches_across_a_crash(plain, tmp_path, monkeypatch):
  """A run killed after round 0's searches (its per-block combine fails) keeps them; the next
  run searches none of them again, writes the in-process bytes and removes what it kept."""
  db = _copy_through_embeddings(plain, tmp_path / "db")
  shutil.copytree(plain / layout.INDEX_DIR, db / layout.INDEX_DIR)
  cfg = {**build_lib.DEFAULTS, "backend": "global"}

  def killed(self, item):
    raise RuntimeError("killed in the combine")

  with monkeypatch.context() as m:
    m.setattr(pipeline_lib._CombineRound, "process", killed)
    with pytest.raises(Exception, match="killed in the combine"):
      pipeline_lib.run_stage("neighbours", db, cfg)
  cache = db / layout.NEIGHBOURS_DIR / pipeline_lib.SEARCH_CACHE
  kept = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_ino
          for d, _, fs in os.walk(cache) for f in fs if f.startswith("round00-")}
  assert kept
  searched = []
  real = pipeline_lib._SearchServingShard.process

  def counted(self, item):
    out = list(real(self, item))
    path = str(pipeline_lib._search_cache_path(str(db), self._round, item[0]))
    searched.append((self._round, item[0],
                     self._round > 0 or os.stat(path).st_ino == kept[path]))
    return out

  monkeypatch.setattr(pipeline_lib._SearchServingShard, "process", counted)
  pipeline_lib.run_stage("neighbours", db, cfg)
  round0 = [ok for r, _, ok in searched if r == 0]
  assert len(round0) == len(kept) and all(round0)  # every kept search read back, none rewritten
  assert not cache.exists()  # removed once the stage finished
  want, got = _digests(plain / layout.NEIGHBOURS_DIR), _digests(db / layout.NEIGHBOURS_DIR)
  assert got == want


def test_a_kept_search_is_not_searched_again(plain, tmp_path, monkeypatch):
  """The kept search of a key is read back, not recomputed (the retriever is never asked)."""
  db = _copy_through_embeddings(plain, tmp_path / "db")
  shutil.copytree(plain / layout.INDEX_DIR, db / layout.INDEX_DIR)
  pipeline_lib._clear_caches()
  store = chunk_store_lib.ChunkStore.open(db)
  n = store.shard_span(0)[2]
  item = ((0, 0), [((0, 0), np.arange(min(n, 8), dtype=np.int64), 8)])
  first = list(pipeline_lib._SearchServingShard(str(db), 0).process(item))
  monkeypatch.setattr(retriever_lib.Retriever, "search",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("searched again")))
  again = list(pipeline_lib._SearchServingShard(str(db), 0).process(item))
  assert [b for b, _ in again] == [b for b, _ in first]
  for (_, a), (_, b) in zip(first, again):
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
  pipeline_lib._clear_caches()
