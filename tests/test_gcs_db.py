"""A retrieval database built straight into gs:// on the local GCS emulator, then trained on,
evaluated and sampled from there: no local copy, no local directory named `gs:`.

The build (`retro_jax.build.stages.build`, every stage) writes gs://BUCKET/db through
retro_jax.db.layout (epath/gcsfs, tensorstore ranged reads, staged local files for faiss and
np.memmap); `retro_jax.train` (3 steps) reads it with its workdir in gs://BUCKET/run;
`retro_jax.evaluate` and `retro_jax.sample` (live retrieval: the global index and embeddings read
from the bucket) read both from there; the slow test retrofits a gs:// baseline into gs://. The
emulator: tests/gcs_emulator.py.
"""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from flax import nnx

from retro_jax.build import stages as build_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, verify
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.retrieval import build_index, embed
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.embedder import Embedder
from retro_jax.training import checkpoint as ckpt_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/data/tiny_db.py's corpus and settings (~480 chunks, 2 store shards), the default index.
SETTINGS = {**tiny_db.SETTINGS, "backend": index_lib.GLOBAL_BACKEND}
STEPS = 3


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _run(module, *args, cwd, timeout=600):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, f"{module} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
  return p


@pytest.fixture(scope="module")
def gs_db(gcs_emulator, tmp_path_factory):
  """(emulator, bucket, gs:// database, the build's record): built once for this file."""
  bucket = gcs_emulator.new_bucket()
  db = f"gs://{bucket}/db"
  record = build_lib.build(db, **SETTINGS)
  return gcs_emulator, bucket, db, record


def _train(workdir, db, cwd, **extra):
  """`retro_jax.train` of experiments/tiny.py shrunk to the tiny database, STEPS steps."""
  overrides = {"db": db, "model_overrides.vocab_size": 1000, "model_overrides.d_model": 32,
               "model_overrides.num_heads": 2, "model_overrides.num_layers": 2,
               "model_overrides.ffw_size": 64, "model_overrides.cca_layers": "(2,)",
               "model_overrides.encoder_d_model": 16, "model_overrides.encoder_num_heads": 1,
               "seq_len": 128, "global_batch": 4, "total_steps": STEPS, "warmup_steps": 1,
               "checkpoint_every": STEPS, "log_every": 1, "read_threads": 1,
               "metrics_upload_every_s": 0.0, **extra}
  _run("retro_jax.train", f"--config={ROOT}/experiments/tiny.py", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in overrides.items()], cwd=cwd)
  assert os.listdir(cwd) == []  # nothing local, least of all a directory named "gs:"


@pytest.fixture(scope="module")
def gs_run(gs_db, tmp_path_factory):
  """A tiny RETRO trained 3 steps from the gs:// database, its workdir in gs://BUCKET/run."""
  _, bucket, db, _ = gs_db
  workdir = f"gs://{bucket}/run"
  _train(workdir, db, tmp_path_factory.mktemp("train_cwd"))
  return workdir


@pytest.fixture(scope="module")
def gs_baseline(gs_db, tmp_path_factory):
  """Its baseline (the same widths, no CCA layers), trained the same way into gs://BUCKET/base."""
  _, bucket, db, _ = gs_db
  workdir = f"gs://{bucket}/base"
  _train(workdir, db, tmp_path_factory.mktemp("train_cwd"), retrieval="false")
  return workdir


def test_build_into_gs_writes_every_stage_there_and_a_rerun_skips_them(gs_db, tmp_path):
  emulator, bucket, db, record = gs_db
  assert all(not s["skipped"] for s in record["stages"].values()), record["stages"]
  names = emulator.names("db/", bucket)
  for want in ("db/tokenizer/spm.model", "db/chunks/manifest.json",
               "db/chunks/shard-00001/tokens.npy", "db/embeddings/shard-00001.npy",
               "db/index/global/manifest.json", "db/index/global/serving/shard-00000.rerank.npy",
               "db/neighbours/shard-00001.npy", "db/build_times.json"):
    assert want in names, names
  # Unfinished-block objects and temporary names are all gone once the stages finish.
  assert not [n for n in names if ".parts/" in n or ".tmp" in n], names
  # The files are what they claim: ~480 chunks, 384-d embeddings, k=2 neighbours in range.
  manifest = json.loads(emulator.read("db/chunks/manifest.json", bucket))
  manifest["shards"] = [json.loads(emulator.read(f"db/chunks/records/shard-0000{s}.json", bucket))
                        for s in range(manifest["num_shards"])]
  assert 300 <= manifest["num_chunks"] <= 1000 and len(manifest["shards"]) == 2
  emb = embed.load_embeddings(db, 1)
  assert emb.shape == (manifest["shards"][1]["num_chunks"], 384) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb[:5], axis=1), 1.0, atol=1e-3)
  rows = np.load(io.BytesIO(emulator.read("db/neighbours/shard-00000.npy", bucket)))
  assert rows.shape == (manifest["shards"][0]["num_chunks"], 2) and rows.dtype == np.int64
  assert rows.min() >= 0 and rows.max() < manifest["num_chunks"]
  # A rerun finds every stage finished (progress records and provenance read from the bucket).
  again = build_lib.build(db, **SETTINGS)
  assert all(s["skipped"] for s in again["stages"].values()), again["stages"]
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")


@pytest.mark.slow
def test_a_gs_build_is_byte_identical_to_a_local_one(gs_db, tmp_path):
  """Every file of the gs:// build equals the local build's (build times aside)."""
  emulator, bucket, _, _ = gs_db
  local = tmp_path / "db"
  build_lib.build(local, **SETTINGS)
  want = tiny_db.digests(local, skip=("build_times.json", "index/global/manifest.json"))
  skip = ("db/build_times.json", "db/index/global/manifest.json", "db/index/scann/")
  got = {n[len("db/"):]: hashlib.sha256(emulator.read(n, bucket)).hexdigest()
         for n in emulator.names("db/", bucket) if not n.startswith(skip)}
  assert got == want
  a = json.loads((local / "index/global/manifest.json").read_text())
  b = json.loads(emulator.read("db/index/global/manifest.json", bucket))
  assert {k: v for k, v in a.items() if k != "build_seconds"} == \
      {k: v for k, v in b.items() if k != "build_seconds"}


def test_train_three_steps_then_evaluate_from_gs(gs_db, gs_run, gs_baseline, tmp_path):
  """`retro_jax.evaluate` end to end (retrieval on / off / shuffled and the baseline, held-out
  neighbours from the gs:// index): every chunk loss, bpb and bootstrap interval it writes is
  what the library functions (retro_jax/evaluation) compute here from the same checkpoints."""
  emulator, bucket, db, _ = gs_db
  losses = [json.loads(line)["loss"]
            for line in emulator.read("run/metrics.jsonl", bucket).decode().splitlines()]
  assert len(losses) == STEPS and all(np.isfinite(losses))
  assert any(n.startswith(f"run/checkpoints/{STEPS}/") for n in emulator.names("run/", bucket))
  p = _run("retro_jax.evaluate", f"--workdir={gs_run}", f"--db={db}", "--seq_len=128",
           "--stride=64", "--retrieval=on,off,shuffled", f"--baseline={gs_baseline}",
           "--retriever=index", "--max_docs=3", "--batch_size=4", cwd=tmp_path)
  assert f"wrote {gs_run}/eval.json" in p.stdout, p.stdout[-2000:]
  res = json.loads(emulator.read("run/eval.json", bucket))
  assert emulator.read("run/eval.png", bucket)[:4] == b"\x89PNG"
  assert os.listdir(tmp_path) == []

  # The same numbers from the library, in this process.
  model, cfg, _ = ckpt_lib.load_model(gs_run)
  base_model, base_cfg, _ = ckpt_lib.load_model(gs_baseline)
  assert cfg.retrieval and not base_cfg.retrieval and not base_cfg.cca_layers
  store = chunk_store_lib.ChunkStore.open(db)
  with ev.open_searcher("index", db) as searcher:
    held = ev.load_heldout(store, db, k=max(ev.FILTER_NEIGHBOURS, cfg.num_neighbours),
                           neighbour_len=cfg.neighbour_len, max_docs=3, searcher=searcher)
  assert (res["num_docs"], res["num_chunks"], res["num_bytes"]) == (
      3, len(held.chunk_ids_C), int(held.chunk_bytes_C.sum()))
  common = dict(seq_len=128, stride=64, num_neighbours=cfg.num_neighbours, batch_size=4,
                progress=False)
  want = {m: ev.chunk_losses(model, cfg, held, store, retrieval=m != "off",
                             neighbours_CxN=ev.mode_neighbours(held, m), **common)
          for m in ("on", "off", "shuffled")}
  want["baseline"] = ev.chunk_losses(base_model, base_cfg, held, store, retrieval=False, **common)
  assert sorted(res["results"]) == sorted(want)
  for mode, loss_C in want.items():
    np.testing.assert_allclose(res["chunk_loss_nats"][mode], loss_C, rtol=1e-5, atol=1e-4,
                               err_msg=mode)
    assert res["results"][mode]["bpb"] == pytest.approx(
        controls.bpb(loss_C, held.chunk_bytes_C), rel=1e-5), mode
  # Retrieval changes the loss; another document's neighbours are not this one's; the baseline
  # is another model.
  for a, b in (("on", "off"), ("on", "shuffled"), ("off", "baseline")):
    assert np.abs(want[a] - want[b]).max() > 1e-4, (a, b)
  doc_C = controls.doc_of_row(held.doc_first_row, len(held.chunk_ids_C))
  for a, b in (("on", "off"), ("on", "shuffled"), ("shuffled", "off"), ("on", "baseline"),
               ("off", "baseline"), ("shuffled", "baseline")):
    got = res["differences"][f"{a}-{b}"]["all"]
    d = controls.paired_bootstrap(want[a], want[b], held.chunk_bytes_C, doc_C)
    assert got["docs"] == d["docs"] == 3 and got["chunks"] == d["chunks"] == len(doc_C)
    assert got["diff"] == pytest.approx(d["diff"], rel=1e-4, abs=1e-6), (a, b)
    assert got["diff"] == pytest.approx(res["results"][a]["bpb"] - res["results"][b]["bpb"],
                                        rel=1e-6, abs=1e-9), (a, b)
    assert got["ci95"] == pytest.approx(d["ci95"], rel=1e-4, abs=1e-6), (a, b)
    lo, hi = got["ci95"]
    assert lo <= got["diff"] <= hi and lo < hi, (a, b, got)


def test_sample_retrieves_live_from_the_gs_index(gs_db, gs_run, tmp_path):
  _, _, db, _ = gs_db
  p = _run("retro_jax.sample", f"--workdir={gs_run}", f"--db={db}", "--max_new_tokens=70",
           "--prompt=The filesystem locks the directory before it renames a file in it, so",
           "--temperature=0", "--show_neighbours", "--stop_at_eos=false", cwd=tmp_path)
  assert "retrieval on, 70 tokens" in p.stdout, p.stdout[-2000:]
  section = p.stdout.split("=== neighbours ===")[1]
  assert "chunk 0 (tokens 0-63)" in section and section.count("  [2] score") >= 1
  assert os.listdir(tmp_path) == []


def test_per_shard_scann_index_on_gs_searches_as_a_local_one(gs_db, tmp_path, monkeypatch):
  """The per-shard backends' files are made locally and uploaded (manifest last); ScaNN reads its
  searcher from a local cache copy (one per index shard), the embeddings by ranged reads. Each
  shard answers as the same searcher built from a local copy of its embeddings."""
  emulator, bucket, db, _ = gs_db
  monkeypatch.setenv("RETRO_JAX_CACHE", str(tmp_path / "cache"))
  config = index_lib.IndexConfig(backend="scann")
  dirs = build_index.build_index(db, config)
  assert dirs == [f"{db}/index/scann/shard-00000", f"{db}/index/scann/shard-00001"]
  assert "db/index/scann/shard-00001/manifest.json" in emulator.names("db/index/scann/", bucket)
  remote = retriever_lib.Retriever.from_db(db, backend="scann")
  assert len(os.listdir(tmp_path / "cache" / "gcs")) == 2  # the two searchers, staged once
  queries = retriever_lib.db_embedding_rows(db, np.arange(0, remote.size, 10))
  for (shard, path, offset), got in zip(retriever_lib.db_embedding_shards(db), remote.shards):
    local_path = tmp_path / f"shard-{shard}.npy"
    local_path.write_bytes(emulator.read(path.split(f"{bucket}/", 1)[1], bucket))
    want = index_lib.build_shard(str(local_path), offset, config)
    ids_got, scores_got = got.search(queries, 3)
    ids_want, scores_want = want.search(queries, 3)
    np.testing.assert_array_equal(ids_got, ids_want)
    np.testing.assert_allclose(scores_got, scores_want, rtol=1e-6)


def test_the_global_retriever_on_gs_downloads_no_embeddings(gs_db):
  """The global index searches its own codes and int8 copy: opening it from the bucket verifies
  its files, not the embeddings (which on gs:// would be a download of every vector)."""
  _, _, db, _ = gs_db
  verify._verified.clear()  # the per-process record of verified files
  r = retriever_lib.Retriever.from_db(db)
  assert not [k for k in verify._verified if "/embeddings/" in str(k[0])]
  q_QxD = retriever_lib.db_embedding_rows(db, np.arange(0, 40, 8))  # (this reads, and verifies)
  _, scores = r.search(q_QxD, 2)
  assert (scores[:, 0] > 0.98).all()  # each finds itself (or an identical chunk) first


def test_embeddings_resume_on_gs_after_a_kill_mid_shard(gs_db, tmp_path):
  """A killed embedding run on gs:// resumes from its progress record and block objects and
  gives the bytes of an uninterrupted local run."""
  emulator, bucket, _, _ = gs_db
  embedder = Embedder.load(batch_size=16)
  texts = [f"chunk number {i} of a test document about directory locking" for i in range(40)]

  def batches(fail_after=None):
    for b in range(0, len(texts), 8):
      if fail_after is not None and b >= fail_after:
        raise KeyboardInterrupt("killed")
      yield np.arange(b, b + 8, dtype=np.int64), texts[b:b + 8]

  remote = f"gs://{bucket}/resume/shard-00000.npy"
  with pytest.raises(KeyboardInterrupt):
    embed.embed_to_npy(embedder, batches(fail_after=24), remote, num_rows=40, block_rows=16)
  prog = json.loads(emulator.read("resume/shard-00000.progress.json", bucket))
  assert prog["rows_done"] == 16 and not prog["done"]
  assert emulator.names("resume/shard-00000.parts/", bucket) == [
      "resume/shard-00000.parts/rows-000000000000.npy"]
  stats = embed.embed_to_npy(embedder, batches(), remote, num_rows=40, block_rows=16)
  assert stats["rows"] == 24  # the first block was not embedded again
  local = tmp_path / "shard-00000.npy"
  embed.embed_to_npy(embedder, batches(), local, num_rows=40, block_rows=16)
  assert emulator.read("resume/shard-00000.npy", bucket) == local.read_bytes()
  assert layout.is_finished(remote) and not emulator.names("resume/shard-00000.parts/", bucket)


@pytest.mark.slow
def test_retrofit_reads_its_baseline_and_database_from_gs(gs_db, tmp_path):
  """A baseline trained into gs://, retrofitted by `retro_jax.retrofit` into gs:// from the gs://
  database: every baseline weight reaches the retrofit checkpoint bit for bit."""
  emulator, bucket, db, _ = gs_db
  base, ret = f"gs://{bucket}/baseline", f"gs://{bucket}/retrofit"
  tiny = {"db": db, "model_overrides.vocab_size": 1000, "model_overrides.d_model": 32,
          "model_overrides.num_heads": 2, "model_overrides.num_layers": 3,
          "model_overrides.ffw_size": 64, "model_overrides.cca_layers": "(2,3)",
          "model_overrides.encoder_d_model": 16, "model_overrides.encoder_num_heads": 1,
          "seq_len": 128, "global_batch": 2, "warmup_steps": 1, "total_steps": 2,
          "checkpoint_every": 100, "log_every": 1, "read_threads": 1, "peak_lr": 1e-2}
  flags = [f"--config.{k}={v}" for k, v in tiny.items()]
  _run("retro_jax.train", f"--config={ROOT}/experiments/retrofit_tiny.py", f"--workdir={base}",
       "--config.retrieval=false", "--config.train_only=all", "--config.init_from=", *flags,
       cwd=tmp_path)
  _run("retro_jax.retrofit", f"--config={ROOT}/experiments/retrofit_tiny.py", f"--workdir={ret}",
       f"--config.init_from={base}", *flags, cwd=tmp_path)
  base_model, _, _ = ckpt_lib.load_model(base)
  ret_model, ret_cfg, info = ckpt_lib.load_model(ret)
  assert ret_cfg.retrieval and info["step"] == 2 and info["db"] == db
  base_w = dict(nnx.to_flat_state(nnx.state(base_model, nnx.Param)))
  ret_w = dict(nnx.to_flat_state(nnx.state(ret_model, nnx.Param)))
  assert set(base_w) < set(ret_w)
  for path, v in base_w.items():
    assert np.array_equal(np.asarray(ret_w[path].get_value()), np.asarray(v.get_value())), path
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["local", "gs"])
def test_rows_writer_gives_np_save_bytes_and_refuses_short_parts(where, tmp_path, gcs_emulator):
  root = str(tmp_path) if where == "local" else f"gs://{gcs_emulator.new_bucket()}/x"
  a_NxK = np.arange(50 * 3, dtype=np.int64).reshape(50, 3)
  w = layout.NpyRowsWriter(f"{root}/a.npy", a_NxK.shape, a_NxK.dtype)
  for s in range(0, 50, 16):
    w.write(s, a_NxK[s:s + 16])
  w.finish(16)
  buf = io.BytesIO()
  np.save(buf, a_NxK)
  assert epath.Path(f"{root}/a.npy").read_bytes() == buf.getvalue()
  assert not layout.parts_dir(f"{root}/a.npy").exists()
  with pytest.raises(layout.StorageError, match="hold 50 of 60 rows"):
    layout.assemble_npy(f"{root}/b.npy", (60, 3), np.int64, [f"{root}/a.npy"])
  assert not epath.Path(f"{root}/b.npy").exists()
