"""Nothing silently wrong: one test per attack of a careless or unlucky user (issue 16).

Each attack gets its clear error (the message checked) or the correct result, and the database,
checkpoint or workdir it touched is left as it was (or repaired). Everything is real: the tiny
database of tests/data/tiny_db.py (copied before any damage), a tiny model trained here for two
steps, real orbax checkpoints, a real gRPC shard server, and the commands as subprocesses where
the one-line error itself is the point.
"""
import json
import logging
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import grpc
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import corpus_path  # noqa: E402
import tiny_db  # noqa: E402

from experiments import tiny as tiny_experiment  # noqa: E402
from retro_jax import errors  # noqa: E402
from retro_jax import sample as sample_cmd  # noqa: E402
from retro_jax.build import edit as edit_lib  # noqa: E402
from retro_jax.build import neighbours as neighbours_lib  # noqa: E402
from retro_jax.build import stages as build_lib  # noqa: E402
from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402
from retro_jax.db import corpus as corpus_lib  # noqa: E402
from retro_jax.db import layout, provenance, verify  # noqa: E402
from retro_jax.db.tokenizer import TokenizerMismatchError  # noqa: E402
from retro_jax.evaluation import bpb  # noqa: E402
from retro_jax.retrieval import retriever as retriever_lib  # noqa: E402
from retro_jax.retrieval import (  # noqa: E402
  service_pb2,
  service_pb2_grpc,
  shard_server,  # noqa: E402
)
from retro_jax.training import (
  loop,  # noqa: E402
  workdir_lock,  # noqa: E402
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
MODEL = dict(vocab_size=1024, d_model=32, num_heads=2, num_layers=2, ffw_size=64, cca_layers=(2,),
             encoder_d_model=16, encoder_num_heads=1)
TRAIN = dict(seq_len=128, global_batch=2, total_steps=2, warmup_steps=1, checkpoint_every=2,
             log_every=1, peak_lr=3e-3, read_threads=1)


# ------------------------------------------------------------------------------------------------
# Helpers and fixtures.


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return str(tiny_db.get(tmp_path_factory)[0])


def copy_db(db, tmp_path, name="db") -> str:
  dst = tmp_path / name
  shutil.copytree(db, dst)
  return str(dst)


def experiment(db, model=(), **kw) -> ml_collections.ConfigDict:
  """experiments/tiny.py shrunk to the tiny database, as tests/test_train.py runs it."""
  c = tiny_experiment.get_config()
  c.model_overrides = ml_collections.ConfigDict(
      {**c.model_overrides.to_dict(), **MODEL, **dict(model)})
  for k, v in {**TRAIN, "db": str(db), **kw}.items():
    setattr(c, k, v)
  return c


def train_cmd(workdir, db, **kw):
  over = {**{f"model_overrides.{k}": (str(v).replace(" ", "") if isinstance(v, tuple) else v)
             for k, v in MODEL.items()}, **TRAIN, "db": db, **kw}
  return [sys.executable, "-m", "retro_jax.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in over.items()]


def cli(args, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit code 2, no traceback, exactly one `error:` line holding every needle."""
  assert p.returncode == errors.EXIT_USER_ERROR, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, p.stderr[-3000:]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def two_trainers(db, tmp_path_factory):
  """A first trainer (4 steps, a second each, checkpoints at 2 and 4) and, while it runs, a
  second one on the same workdir: (workdir, the first's exit code and stderr, the second's
  CompletedProcess)."""
  wd = tmp_path_factory.mktemp("ckpt") / "wd"
  first = subprocess.Popen(train_cmd(wd, db, total_steps=4, debug_step_delay_s=1.0), cwd=ROOT,
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (wd / workdir_lock.LOCK).exists() and first.poll() is None:
      assert time.time() < deadline
      time.sleep(0.1)
    second = cli(train_cmd(wd, db, total_steps=4))
    still_running = first.poll() is None
    _, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  return wd, first.pid, first.returncode, err, second, still_running


@pytest.fixture(scope="module")
def ckpt(two_trainers) -> str:
  """The first trainer's workdir: a tiny model trained 4 steps on the tiny database."""
  return str(two_trainers[0])


@pytest.fixture(scope="module")
def other_tokenizer_db(db, tmp_path_factory) -> str:
  """A database of the same corpus and vocabulary size with another tokenizer (another seed)."""
  other = str(tmp_path_factory.mktemp("other") / "db")
  build_lib.build(other, stages=("tokenizer", "chunks"), **{**tiny_db.SETTINGS, "seed": 1})
  return other


def _flip_rows(path, rows=slice(0, 4)):
  """Overwrites rows in place with other valid values of the same file (a silent corruption)."""
  arr = np.load(path, mmap_mode="r+")
  old = np.asarray(arr[rows]).copy()
  arr[rows] = old[::-1, ::-1]
  arr.flush()
  assert not np.array_equal(np.asarray(arr[rows]), old)
  del arr


# ------------------------------------------------------------------------------------------------
# Build: stage provenance.


def test_build_skips_a_stage_only_when_its_record_matches(db, tmp_path):
  d = copy_db(db, tmp_path)
  before = tiny_db.digests(d)
  cases = [({"vocab_size": 900}, "vocab_size: built with 1000, now 900"),
           ({"heldout_fraction": 0.2}, "heldout_fraction: built with 0.1, now 0.2"),
           ({"corpus": corpus_path.spec(kernel=12, wiki=25)}, "corpus: built with")]
  for change, needle in cases:
    with pytest.raises(provenance.ProvenanceMismatchError, match="--rebuild") as e:
      build_lib.build(d, **{**tiny_db.SETTINGS, **change})
    assert needle in str(e.value)
  assert tiny_db.digests(d) == before  # refused before anything was written

  p = cli([sys.executable, "-m", "retro_jax.build_db", f"--db={d}",
           f"--corpus={tiny_db.CORPUS}", "--vocab_size=900", "--heldout_fraction=0.1",
           "--docs_per_shard=20", "--backend=scann"])
  assert_one_line_error(p, "vocab_size: built with 1000, now 900", "--rebuild")
  assert tiny_db.digests(d) == before

  # --rebuild rebuilds the tokenizer and the chunks; the embeddings, built from the old chunks,
  # are then refused by name.
  build_lib.build(d, stages=("tokenizer", "chunks"), rebuild=True,
                  **{**tiny_db.SETTINGS, "vocab_size": 900})
  assert chunk_store_lib.ChunkStore.open(d).vocab_size == 900
  with pytest.raises(provenance.ProvenanceMismatchError,
                     match="embeddings stage .* input chunks: built from sha256"):
    build_lib.build(d, **{**tiny_db.SETTINGS, "vocab_size": 900})


def test_missing_or_damaged_outputs_are_rebuilt(db, tmp_path):
  d = copy_db(db, tmp_path)
  want = tiny_db.digests(d, skip=("build_times.json",))
  os.remove(layout.neighbours_path(d, 1))  # its progress file (done) remains
  _flip_rows(str(layout.neighbours_path(d, 0)))
  # A plain rerun reads a few small files per stage; --audit reads every output.
  record = build_lib.build(d, audit=True, **tiny_db.SETTINGS)
  assert not record["stages"]["neighbours"]["skipped"]
  assert all(record["stages"][s]["skipped"] for s in ("tokenizer", "chunks", "embeddings", "index"))
  assert tiny_db.digests(d, skip=("build_times.json",)) == want  # byte-identical to the original build


# ------------------------------------------------------------------------------------------------
# Verify on read.


def test_manifest_counts_are_checked_at_open(db, tmp_path):
  d = copy_db(db, tmp_path)
  path = os.path.join(d, "chunks", "manifest.json")
  m = json.load(open(path))
  m["num_chunks"] += 1
  json.dump(m, open(path, "w"))
  with pytest.raises(chunk_store_lib.ChunkStoreError, match="num_chunks .* the manifest is damaged"):
    chunk_store_lib.ChunkStore.open(d).tokens([0])  # checked with the shard list, on first read
  m["num_chunks"] -= 1
  json.dump(m, open(path, "w"))
  record_path = chunk_store_lib.record_path(pathlib.Path(d) / "chunks", 0)
  record = json.loads(record_path.read_text())
  record["files"]["tokens.npy"]["bytes"] += 8
  record_path.write_text(json.dumps(record))
  with pytest.raises(chunk_store_lib.ChunkStoreError,
                     match="tokens.npy has .* bytes, its manifest says"):
    chunk_store_lib.ChunkStore.open(d).tokens([0])


def test_damaged_chunk_tokens_stop_training_and_evaluation_first(db, ckpt, tmp_path):
  d = copy_db(db, tmp_path)
  for s in range(2):  # valid ids, other tokens: only the checksum can tell
    _flip_rows(os.path.join(d, "chunks", f"shard-{s:05d}", "tokens.npy"))
  wd = tmp_path / "train"
  with pytest.raises(chunk_store_lib.ChunkStoreError, match="tokens.npy is damaged"):
    loop.run(experiment(d), str(wd), progress=False)
  metrics = wd / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text()  # no training step ran
  assert not [p for p in os.listdir(wd / "checkpoints") if p.isdigit()]
  with pytest.raises(chunk_store_lib.ChunkStoreError, match="tokens.npy is damaged"):
    bpb.evaluate(ckpt, db=d, seq_len=128, stride=64, max_docs=2, progress=False)


def test_damaged_embeddings_stop_the_exact_retriever(db, tmp_path):
  d = copy_db(db, tmp_path)
  emb = str(layout.embeddings_path(d, 1))
  arr = np.load(emb, mmap_mode="r+")
  arr[:3] = -np.asarray(arr[:3])
  arr.flush()
  del arr
  store = chunk_store_lib.ChunkStore.open(d)
  allowed = bpb.training_doc_mask(store, 1.0)
  with pytest.raises(verify.DamagedDataError, match="embeddings/shard-00001.npy is damaged"):
    bpb.exact_neighbours(store, d, np.array([0]), 2, allowed)
  with pytest.raises(verify.DamagedDataError):
    retriever_lib.db_embedding_rows(d, np.array([0]))


def _small_neighbour_blocks(db, shard: int, rows: int) -> None:
  """Rewrites neighbours shard `shard`'s progress record with checksums of `rows`-row blocks,
  computed from its file (the tiny shards hold fewer rows than one default block)."""
  path = layout.neighbours_path(db, shard)
  rec = verify.progress_record(path)
  rec.update({verify.CHECKSUM_BLOCK_ROWS: rows,
              "block_sha256": verify.file_block_digests(path, rows)})
  layout.write_json_atomic(layout.progress_path(path), rec)


def test_damaged_neighbours_block_fails_only_the_reads_that_touch_it(db, tmp_path):
  d = copy_db(db, tmp_path)
  want = np.load(layout.neighbours_path(db, 0))
  _small_neighbour_blocks(d, 0, 8)
  _flip_rows(str(layout.neighbours_path(d, 0)), slice(8, 12))  # valid ids: only a checksum tells
  shards, _ = neighbours_lib.open_neighbours(d)  # opening hashes nothing
  ok = np.r_[0:8, 16:len(want)]
  np.testing.assert_array_equal(shards.rows(0, ok), want[ok])
  with pytest.raises(verify.DamagedDataError,
                     match=r"neighbours/shard-00000.npy is damaged: rows 8\.\.15 have sha256"):
    shards.rows(0, [14])  # row 14 itself is intact: its block is not
  with pytest.raises(verify.DamagedDataError, match="shard-00000.npy is damaged: rows 8"):
    neighbours_lib.open_neighbours(d)[0][0]  # a whole-shard read checks every block
  # Training, on a fresh copy whose shards are damaged in their one (default) block each: the
  # first batch's neighbour rows stop it with one line before any step.
  d2 = copy_db(db, tmp_path, "db2")
  for s in range(2):
    _flip_rows(str(layout.neighbours_path(d2, s)))
  p = cli(train_cmd(tmp_path / "wd", d2))
  assert_one_line_error(p, "neighbours/shard-0000", ".npy is damaged: rows 0..")
  assert not (tmp_path / "wd" / "metrics.jsonl").exists() or not (
      tmp_path / "wd" / "metrics.jsonl").read_text()


def test_neighbours_written_before_block_checksums_are_checked_whole(db, tmp_path):
  d = copy_db(db, tmp_path)
  path = layout.neighbours_path(d, 0)
  rec = verify.progress_record(path)
  del rec[verify.CHECKSUM_BLOCK_ROWS], rec["block_sha256"]
  layout.write_json_atomic(layout.progress_path(path), rec)
  _flip_rows(str(path), slice(100, 104))
  shards, _ = neighbours_lib.open_neighbours(d)
  with pytest.raises(verify.DamagedDataError, match="neighbours/shard-00000.npy is damaged: sha256"):
    shards.rows(0, [0])  # far from the damage: the whole file is hashed


# ------------------------------------------------------------------------------------------------
# Checkpoint against database, and the workdir.


def test_checkpoint_refuses_a_database_with_another_tokenizer(ckpt, other_tokenizer_db, tmp_path):
  have = verify.db_tokenizer(other_tokenizer_db)["fingerprint"][:12]
  want = json.load(open(os.path.join(ckpt, "config.json")))["db_tokenizer"]["fingerprint"][:12]
  assert have != want
  ckpts = sorted(os.listdir(os.path.join(ckpt, "checkpoints")))
  with pytest.raises(TokenizerMismatchError, match=f"{want}.*{have}"):  # evaluate
    bpb.evaluate(ckpt, db=other_tokenizer_db, progress=False)
  with pytest.raises(TokenizerMismatchError, match=f"{want}.*{have}"):  # resume
    loop.run(experiment(other_tokenizer_db, total_steps=4), ckpt, progress=False)
  with pytest.raises(TokenizerMismatchError, match=f"{want}.*{have}"):  # retrofit
    loop.run(experiment(other_tokenizer_db, init_from=ckpt, train_only="retrieval"),
             str(tmp_path / "retrofit"), progress=False)
  p = cli([sys.executable, "-m", "retro_jax.sample", f"--workdir={ckpt}",
           f"--db={other_tokenizer_db}", "--prompt=The kernel", "--max_new_tokens=2"])
  assert_one_line_error(p, want, have)
  assert sorted(os.listdir(os.path.join(ckpt, "checkpoints"))) == ckpts


def test_resume_with_another_d_model_is_refused(db, ckpt):
  before = tiny_db.digests(os.path.join(ckpt, "checkpoints"))
  with pytest.raises(loop.TrainSetupError, match="d_model 32 -> 64"):
    loop.run(experiment(db, model={"d_model": 64}, total_steps=4), ckpt, progress=False)
  assert tiny_db.digests(os.path.join(ckpt, "checkpoints")) == before
  assert not os.path.exists(os.path.join(ckpt, workdir_lock.LOCK))  # released on the error


def test_two_trainers_on_one_workdir(two_trainers):
  wd, pid, rc, err, second, first_was_running = two_trainers
  line = assert_one_line_error(second, "is in use by another run", f"pid {pid}",
                               socket.gethostname())
  assert "started" in line and first_was_running, line
  assert rc == 0, err[-3000:]
  assert sorted(os.listdir(wd / "checkpoints"), key=int) == ["2", "4"]
  steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4]  # the first run's lines, once each
  assert not (wd / workdir_lock.LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait(timeout=60)
  (tmp_path / workdir_lock.LOCK).write_text(json.dumps(
      {"pid": gone.pid, "host": socket.gethostname(), "start_time": "then", "command": "killed"}))
  with workdir_lock.acquire(tmp_path):
    assert "no longer running; taking it over" in capsys.readouterr().err
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.acquire(tmp_path)  # held by a live process (this one)
  assert not (tmp_path / workdir_lock.LOCK).exists()


def test_an_empty_lock_is_taken_over_once_old(tmp_path, capsys):
  lock = tmp_path / workdir_lock.LOCK
  lock.write_bytes(b"")  # e.g. a disk that filled while the lock was written
  with pytest.raises(workdir_lock.WorkdirLockedError, match="no readable record"):
    workdir_lock.acquire(tmp_path)  # just written: perhaps a run taking it right now
  old = time.time() - workdir_lock.UNREADABLE_STALE_S - 1
  os.utime(lock, (old, old))
  with workdir_lock.acquire(tmp_path) as held:
    assert "holds no readable record" in capsys.readouterr().err
    assert json.loads(lock.read_text()) == held.record
  assert not lock.exists()


# A disk too small for the tiny model's first checkpoint (~1.7 MiB with its optimizer state).
SMALL_DISK = "size=400k"
# Mounts a SMALL_DISK tmpfs on $0 and runs "$@" there; then lists what is left under $0/wd into
# $0.left (the tmpfs goes with the namespace).
IN_SMALL_DISK = ('mount -t tmpfs -o ' + SMALL_DISK + ' tmpfs "$0" || exit 97; "$@"; rc=$?; '
                 'find "$0/wd" -mindepth 1 > "$0.left"; exit $rc')
# A user namespace of the test's own: root in it may mount a tmpfs, where unprivileged user
# namespaces are allowed (and for root).
USERNS = ["unshare", "--user", "--map-root-user", "--mount"]


def can_mount_a_small_disk(tmp_path) -> bool:
  probe = tmp_path / "probe"
  probe.mkdir()
  return shutil.which("unshare") is not None and subprocess.run(
      [*USERNS, "sh", "-c", 'mount -t tmpfs -o ' + SMALL_DISK + ' tmpfs "$0"', str(probe)],
      capture_output=True, timeout=60).returncode == 0


def train_on_a_small_disk(db, tmp_path) -> tuple[subprocess.CompletedProcess, list[str]]:
  """The trainer run with its workdir on a 400 KiB tmpfs: (the process, what it left in the
  workdir, as paths relative to it)."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  p = cli([*USERNS, "sh", "-c", IN_SMALL_DISK, str(mnt), *train_cmd(mnt / "wd", db)])
  assert p.returncode != 97, "the tmpfs mount failed: " + p.stderr[-2000:]
  left = (tmp_path / "small.left").read_text().split()
  return p, sorted(os.path.relpath(x, mnt / "wd") for x in left)


def train_under_a_file_size_limit(db, tmp_path, limit=200_000
                                  ) -> tuple[subprocess.CompletedProcess, list[str]]:
  """The trainer run with RLIMIT_FSIZE of `limit` bytes (no privilege needed): the checkpoint's
  largest files (~285 and ~500 kB) fail to write (EFBIG), its small ones are written."""
  wd = tmp_path / "wd"

  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  p = subprocess.run(train_cmd(wd, db), cwd=ROOT, env=ENV, capture_output=True, text=True,
                     timeout=300, preexec_fn=limit_file_size)
  left = [os.path.relpath(os.path.join(d, f), wd) for d, dirs, files in os.walk(wd)
          for f in dirs + files]
  return p, sorted(left)


def test_full_disk_during_a_checkpoint(db, tmp_path):
  """A disk that cannot hold the first checkpoint: one clear error, no partial checkpoint left,
  the workdir's lock released. The small disk is a real one (a 400 KiB tmpfs, in a user
  namespace of the trainer's own: no root needed where unprivileged user namespaces are
  allowed); where no tmpfs can be mounted, a file size limit makes the checkpoint's writes fail
  with EFBIG instead, which the trainer must report the same way."""
  if can_mount_a_small_disk(tmp_path):
    p, left = train_on_a_small_disk(db, tmp_path)
    assert_one_line_error(p, "no room for a first checkpoint")
  else:
    p, left = train_under_a_file_size_limit(db, tmp_path)
    assert_one_line_error(p, "filled up near step 2", "the last good checkpoint is none")
  assert "checkpoints" in left, left
  assert not [x for x in left if "orbax-checkpoint-tmp" in x], left
  assert workdir_lock.LOCK not in left, left


def test_a_checkpoint_write_failing_midway(db, tmp_path):
  """The checkpoint's largest files fail to write (EFBIG under a file size limit: what a disk
  that fills during the write looks like to the trainer): one clear error and a few lines, not
  a screen of background writers' tracebacks; no partial checkpoint; the lock released."""
  p, left = train_under_a_file_size_limit(db, tmp_path)
  assert_one_line_error(p, "filled up near step 2", "the last good checkpoint is none")
  assert p.stderr.count("Traceback") == 0 and len(p.stderr.splitlines()) <= 20, p.stderr[-3000:]
  assert not [x for x in left if "orbax-checkpoint-tmp" in x], left
  assert workdir_lock.LOCK not in left, left


def test_writer_noise_after_a_failed_write_stays_quiet():
  """What a failed write's writers report after its temporary directories are removed (they
  fail to find them) is dropped, but only once a write failed: before, such an error shows."""
  quiet = loop._QuietDiskFull()
  gone = ('NOT_FOUND: Error writing local file "wd/checkpoints/2.orbax-checkpoint-tmp/'
          'optimizer.orbax-checkpoint-tmp/_sharding": No such file or directory')

  def record(msg):
    return logging.LogRecord("orbax", logging.ERROR, __file__, 1, msg, (), None)
  assert quiet.filter(record(gone)) and not quiet.is_noise(ValueError(gone))
  assert not quiet.filter(record("OUT_OF_RANGE: File too large"))  # a disk-full text
  assert not quiet.filter(record(gone)) and quiet.is_noise(ValueError(gone))
  fresh = loop._QuietDiskFull()
  fresh.write_failed = True
  assert not fresh.filter(record(gone)) and fresh.filter(record("an unrelated error"))


# ------------------------------------------------------------------------------------------------
# The retrieval service.


def test_service_bounds_every_request(db, tmp_path):
  port_file, stop = str(tmp_path / "port.json"), threading.Event()
  t = threading.Thread(target=shard_server.serve, args=(db, 0), daemon=True,
                       kwargs=dict(port_file=port_file, stop_event=stop))
  t.start()
  try:
    deadline = time.time() + 120
    while not os.path.exists(port_file):
      assert time.time() < deadline and t.is_alive()
      time.sleep(0.05)
    address = json.load(open(port_file))["address"]
    stub = service_pb2_grpc.ShardSearchStub(grpc.insecure_channel(
        address, options=shard_server.CHANNEL_OPTIONS))
    dim = 384

    def search(q, k, fill=0.1):
      queries = np.full((q, dim), fill, np.float32)
      return stub.Search(service_pb2.SearchRequest(num_queries=q, dim=dim, k=k,
                                                   queries=queries.tobytes()), timeout=60)

    assert len(search(1, 2).ids) == 16  # a normal request
    limits = shard_server.Limits()
    cases = [((1, 1_000_000), grpc.StatusCode.INVALID_ARGUMENT, "k=1000000"),
             ((limits.max_queries + 1, 2), grpc.StatusCode.INVALID_ARGUMENT, "queries in one"),
             ((30_000, 2), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # request bytes
             ((4096, 4096), grpc.StatusCode.RESOURCE_EXHAUSTED, "search memory"),
             ((1, 2, float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
             ((1, 2, float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "infinite")]
    for args, code, needle in cases:
      with pytest.raises(grpc.RpcError) as e:
        search(*args)
      assert e.value.code() == code and needle in e.value.details(), (args, e.value)
    assert len(search(1, 2).ids) == 16  # still serving

    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(shard_server.ServeError, match="could not bind"):
      shard_server.serve(db, 1, port=port, stop_event=threading.Event())
  finally:
    stop.set()
    t.join(30)


# ------------------------------------------------------------------------------------------------
# Inputs and flags.


def test_corpus_of_only_binary_and_blank_files(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.bin").write_bytes(b"\x7fELF\x00\x01\x02")
  (corpus / "blank.txt").write_text("  \n\t\n")
  (corpus / "empty.txt").write_text("")
  p = cli([sys.executable, "-m", "retro_jax.build_db", f"--db={tmp_path / 'db'}",
           f"--corpus={corpus}", "--vocab_size=100"])
  assert_one_line_error(p, "no usable training document", "2 empty or blank, 1 binary")


def test_symlinked_directories_are_not_followed_into_cycles(tmp_path):
  root = tmp_path / "corpus"
  (root / "a").mkdir(parents=True)
  (root / "a" / "doc.txt").write_text("one document\n")
  os.symlink(root / "a", root / "a" / "self")
  os.symlink(root, root / "a" / "up")
  docs = list(corpus_lib.iter_documents(str(root)))
  assert [d.key for d in docs] == ["a/doc.txt"]


def test_num_neighbours_below_one_and_a_missing_prompt_file(ckpt, tmp_path):
  for k in (0, -1):
    with pytest.raises(bpb.EvalError, match=f"--num_neighbours={k} must be >= 1"):
      bpb.evaluate(ckpt, num_neighbours=k, progress=False)
    flags = types.SimpleNamespace(prompt="x", prompt_file=None, num_neighbours=k)
    with pytest.raises(sample_cmd.SampleError, match=f"--num_neighbours={k} must be >= 1"):
      sample_cmd.run(flags)
  p = cli([sys.executable, "-m", "retro_jax.sample", f"--workdir={ckpt}",
           f"--prompt_file={tmp_path / 'nope.txt'}"])
  assert_one_line_error(p, "--prompt_file", "does not exist")


def test_a_removed_document_can_be_added_again(db, tmp_path):
  d = copy_db(db, tmp_path)
  spec = corpus_path.spec(python=1)
  first = edit_lib.add_documents(d, spec)
  key = chunk_store_lib.ChunkStore.open(d).doc_key(first["first_doc_id"])
  edit_lib.remove_documents(d, [], [key])
  again = edit_lib.add_documents(d, spec)
  assert not again["resumed"] and again["first_doc_id"] != first["first_doc_id"]
  store = chunk_store_lib.ChunkStore.open(d)
  assert store.doc_key(again["first_doc_id"]) == key
  assert again["first_doc_id"] not in store.deleted_doc_ids()
  a, b = store.doc_range(again["first_doc_id"])
  r = retriever_lib.Retriever.from_db(d)
  ids, _ = r.search(retriever_lib.db_embedding_rows(d, np.arange(a, b)), 1)
  assert ((ids >= a) & (ids < b)).all()  # its chunks are retrievable again


def test_guard_prints_one_line_and_exits_2(capsys):
  def main(argv):
    raise verify.DamagedDataError("x is damaged; rebuild it")
  with pytest.raises(SystemExit) as e:
    errors.guard(main)([])
  assert e.value.code == 2 and capsys.readouterr().err == "error: x is damaged; rebuild it\n"


def test_evaluate_with_one_held_out_document_scores_on_and_off(ckpt, capfd):
  res = bpb.evaluate(ckpt, seq_len=128, stride=64, max_docs=1, progress=False)
  assert res["num_docs"] == 1
  assert set(res["results"]) == {"on", "off"}  # the defaults' shuffled control cannot run
  assert "another held-out document" in res["skipped_modes"]["shuffled"]
  assert "the shuffled control is skipped" in capfd.readouterr().err
  assert np.isfinite(res["results"]["on"]["bpb"]) and np.isfinite(res["results"]["off"]["bpb"])
  assert "on-off" in res["differences"]


def test_unknown_build_db_flags_are_refused_before_anything_is_written(tmp_path):
  d = tmp_path / "db"
  for flag, hint in (("--heldout_fraktion=0.5", "did you mean --heldout_fraction?"),
                     ("--vocab_sise=1000", "did you mean --vocab_size?")):
    p = cli([sys.executable, "-m", "retro_jax.build_db", f"--db={d}",
             f"--corpus={corpus_path.spec(wiki=2)}", flag, "--runner=DirectRunner"])
    assert_one_line_error(p, flag, "neither build_db's nor Beam's", hint)
    assert not d.exists()
  # Beam's own flags pass (parsed as Beam parses them).
  assert build_lib.pipeline_lib.unknown_options(
      ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
       "--project=p", "--region=r", "--temp_location=gs://b/t", "--setup_file=./setup.py"]) == []


def _one_document(d):
  (d / "one.jsonl").write_text(
      '{"key": "one:1", "text": "The Moon is Earth\'s only natural satellite."}\n')
  return d / "one.jsonl"


def _bad_utf8(d):
  (d / "corpus").mkdir()
  (d / "corpus" / "a.txt").write_bytes(b"ok text \xff\xfe more\n")
  return d / "corpus"


def _duplicate_keys(d):
  line = '{"key": "same", "text": "line %d: the quick brown fox jumps over the lazy dog\\n"}\n'
  (d / "dup.jsonl").write_text("".join(line % i for i in range(40)))
  return d / "dup.jsonl"


def _symlink_loop(d):
  (d / "corpus" / "sub").mkdir(parents=True)
  (d / "corpus" / "sub" / "up").symlink_to("..")
  (d / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
  return d / "corpus"


def _one_long_line(d):
  (d / "long.jsonl").write_text('{"key": "a", "text": "%s"}\n' % ("the cat sat " * 800))
  return d / "long.jsonl"


@pytest.mark.parametrize("make_corpus,vocab,needles", [
    (_one_document, None, ["too small for a 8192-piece tokenizer", "--vocab_size="]),
    (_bad_utf8, None, ["too small for a 8192-piece tokenizer"]),
    (_duplicate_keys, 300, ["duplicate document keys", "same"]),
    (_symlink_loop, None, ["too small for a 8192-piece tokenizer"]),
    (_one_long_line, 300, ["no line SentencePiece can train on", "4192 bytes"]),
], ids=["one-document", "bad-utf8", "duplicate-keys", "symlink-loop", "one-long-line"])
def test_a_corpus_sentencepiece_cannot_train_on_is_one_line(tmp_path, make_corpus, vocab,
                                                            needles):
  """Each corpus here once ended in a SentencePiece or Beam traceback (the default vocabulary,
  8192, unless `vocab`)."""
  corpus = make_corpus(tmp_path)
  p = cli([sys.executable, "-m", "retro_jax.build_db", f"--db={tmp_path / 'db'}",
           f"--corpus={corpus}", *([f"--vocab_size={vocab}"] if vocab else [])])
  assert_one_line_error(p, *needles)


def test_a_read_only_workdir_is_one_line(db, tmp_path):
  """A workdir on a read-only file system (a read-only tmpfs in a user namespace of the trainer's
  own: root ignores file modes, so a chmod would not do)."""
  mnt = tmp_path / "ro"
  mnt.mkdir()
  p = cli([*USERNS, "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" || exit 97; "$@"', str(mnt),
           *train_cmd(mnt / "wd", db)])
  assert p.returncode != 97, "the tmpfs mount failed: " + p.stderr[-2000:]
  assert_one_line_error(p, f"--workdir={mnt / 'wd'}: cannot create it", "Read-only file system")


def test_a_file_or_unreachable_storage_for_a_directory_is_one_line(db, ckpt, tmp_path,
                                                                   monkeypatch):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  with pytest.raises(layout.StorageError, match=f"--workdir={a_file} is a file, not a directory"):
    loop.run(experiment(db), str(a_file), progress=False)
  with pytest.raises(layout.StorageError, match=f"--workdir={a_file}/run: cannot create it"):
    loop.run(experiment(db), str(a_file / "run"), progress=False)
  with pytest.raises(layout.StorageError, match=f"--db={a_file} is a file, not a directory"):
    bpb.evaluate(ckpt, db=str(a_file), progress=False)
  assert_one_line_error(cli([sys.executable, "-m", "retro_jax.build_db", f"--db={a_file}"]),
                        f"--db={a_file} is a file, not a directory")
  # gs:// where no storage answers: one line at once, not minutes of retries.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
  env = {**ENV, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed}"}
  p = subprocess.run([sys.executable, "-m", "retro_jax.train", "--config=experiments/tiny.py",
                      f"--config.db={db}", "--workdir=gs://some-bucket/run"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert_one_line_error(p, "--workdir=gs://some-bucket/run", "cannot reach Cloud Storage")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
  with pytest.raises(layout.StorageError, match="--db=gs://some-bucket/db: cannot reach"):
    bpb.evaluate(ckpt, db="gs://some-bucket/db", progress=False)
