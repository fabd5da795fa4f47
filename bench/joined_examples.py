r"""Training input from the database (random reads) against the joined examples, side by side:
requests per example against a GCS emulator, and examples/s per host on gs:// and local disk.

    python -m bench.joined_examples
    # -> bench/results/joined_examples.json, docs/joined_examples.md

The tests' corpus (tests/data/corpus: 12 kernel docs + 24 Wikipedia leads, ~480 chunks; vocab
1000, the default global index, k=2) is built into a temporary directory with
`retro_jax.build.stages.build`, then its training examples at `--seq_len` with 2 neighbours of 128
tokens are written by the examples stage (`retro_jax.training.examples_stage`, DirectRunner,
`--epochs` epochs). The database, examples included, is uploaded to a fresh bucket of a local GCS
emulator (tests/gcs_emulator.py) behind a counting HTTP proxy: every request of every client
(tensorstore's ranged reads of the database path, array_record's reads of the examples, gcsfs's
metadata reads) passes through it and is counted.

For each storage (local, gs://) and input path (random: `--config.input=random`, joined), two
"hosts" run at once as two processes (process_index 0 and 1 of 2, `--batch_size` rows each of a
global batch twice that): each opens the loader as training does (`input_pipeline.make_iterator`,
4 read threads), reads one batch, waits until both are ready, then reads `--steps` batches.
Reported per host: examples/s over the batches after grain's prefetch buffer drains (the first
SKIP), reading on past `--steps` until that window lasts `--min_seconds`. Per run: GCS requests
per example over the steps (both hosts' requests / both hosts' examples) and the requests before
them (open, first batch, prefetch); read() system calls per example (/proc/self/io syscr of the
host process; the database path's local reads are memory-mapped page faults, not calls). The
first `--steps` batches of each host are checked equal between the two paths (sha256 of every
array), so the figures compare the same work.
An emulator on localhost has no network latency: a real bucket adds a round trip per request,
which is what the request counts show.
"""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import corpus_path  # noqa: E402
import gcs_emulator  # noqa: E402

from array_record.python import array_record_module  # noqa: E402

from bench.common import run_provenance, write_page  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq_len", 512, "tokens per sequence (8 chunks of 64)")
flags.DEFINE_integer("batch_size", 4, "rows per host per step")
flags.DEFINE_integer("steps", 64, "batches per host after the first (the rate: those after the "
                     "prefetch buffer drains)")
flags.DEFINE_float("min_seconds", 3.0, "each host keeps reading batches (past --steps) until the "
                   "rate's window is this long")
flags.DEFINE_integer("epochs", 12, "epochs of the training order written as examples (enough "
                     "for every batch read: past them the two paths differ)")
flags.DEFINE_string("out", "bench/results/joined_examples.json", "results file")
flags.DEFINE_string("doc", "docs/joined_examples.md", "the page written from the results")
flags.DEFINE_bool("page_only", False, "only write the page again from the results file")
flags.DEFINE_string("host", None, "(internal) DB:PATH:PROCESS_INDEX to run as one host")

SETTINGS = dict(corpus=corpus_path.spec(kernel=12, wiki=24), vocab_size=1000,
                heldout_fraction=0.1, k=2, docs_per_shard=20)
NUM_NEIGHBOURS, SEED, HOSTS, READ_THREADS = 2, 0, 2, 4
# grain's prefetch buffer (input_pipeline.make_iterator: 2 x read threads batches) fills while a
# host waits for the other; the rate is taken over the batches after twice that many.
SKIP = 4 * READ_THREADS
PATHS = ("random", "joined")


class CountingProxy:
  """An HTTP reverse proxy in front of the emulator that counts the requests it forwards."""

  def __init__(self, target: str):
    u = urllib.parse.urlparse(target)
    self.count, self._lock = 0, threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        del args

      def handle(self):
        try:
          super().handle()
        except ConnectionError:  # a client that closed its connection (after a range read)
          pass

      def _forward(self):
        with proxy._lock:
          proxy.count += 1
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        try:
          conn.request(self.command, self.path, body=body,
                       headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
          r = conn.getresponse()
          data = r.read()
        finally:
          conn.close()
        self.send_response(r.status)
        for k, v in r.getheaders():
          if k.lower() not in ("transfer-encoding", "content-length", "connection"):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def _do(self):
        try:
          self._forward()
        except (ConnectionError, BrokenPipeError):  # a client that closed early (range reads)
          pass

      do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _do

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def stop(self) -> None:
    self.server.shutdown()


def _syscr() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("syscr:")).split()[1])


def _digest(batch) -> str:
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode() + batch[k].tobytes())
  return h.hexdigest()


def host(db: str, path: str, p: int) -> None:
  """One host: open the loader, read one batch, READY; on 'go', the timed batches; DONE json."""
  from retro_jax.training import input_pipeline as loader
  it = loader.make_iterator(db, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                            num_neighbours=NUM_NEIGHBOURS, seed=SEED, process_index=p,
                            process_count=HOSTS, read_threads=READ_THREADS, input=path)
  digests = [_digest(next(it))]
  print("READY", flush=True)
  sys.stdin.readline()
  r0, times = _syscr(), [time.perf_counter()]
  while len(times) <= FLAGS.steps or times[-1] - times[SKIP] < FLAGS.min_seconds:
    batch = next(it)
    times.append(time.perf_counter())
    if len(times) <= FLAGS.steps + 1:  # (past the written epochs the two paths differ)
      digests.append(_digest(batch))
  steps = len(times) - 1
  print("DONE " + json.dumps({
      "seconds": times[-1] - times[SKIP], "examples": (steps - SKIP) * FLAGS.batch_size,
      "read_syscalls": _syscr() - r0, "read_examples": steps * FLAGS.batch_size,
      "digests": digests}), flush=True)


def run_hosts(db: str, path: str, env: dict, proxy: CountingProxy | None) -> dict:
  """Both hosts at once; requests counted from start to READY (open) and go to DONE (timed)."""
  c0 = proxy.count if proxy else 0
  procs = [subprocess.Popen([sys.executable, "-m", "bench.joined_examples",
                             f"--host={db}|{path}|{p}",
                             f"--seq_len={FLAGS.seq_len}", f"--batch_size={FLAGS.batch_size}",
                             f"--steps={FLAGS.steps}", f"--min_seconds={FLAGS.min_seconds}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT) for p in range(HOSTS)]
  for proc in procs:
    for line in proc.stdout:
      if line.startswith("READY"):
        break
    else:
      raise RuntimeError(f"host of {path} on {db} exited ({proc.wait()}) before its first batch")
  c1 = proxy.count if proxy else 0
  for proc in procs:
    proc.stdin.write("go\n")
    proc.stdin.flush()
  done = []
  for proc in procs:
    line = next(line for line in proc.stdout if line.startswith("DONE"))
    done.append(json.loads(line[len("DONE "):]))
    proc.wait(timeout=120)
  c2 = proxy.count if proxy else 0
  examples = sum(d["read_examples"] for d in done)
  out = {"hosts": [{"examples_per_s": d["examples"] / d["seconds"], "seconds": d["seconds"],
                    "examples": d["examples"], "read_examples": d["read_examples"],
                    "read_syscalls_per_example": d["read_syscalls"] / d["read_examples"]}
                   for d in done],
         "digests": [d["digests"] for d in done]}
  if proxy:
    out.update(requests_before=c1 - c0, requests_timed=c2 - c1,
               requests_per_example=(c2 - c1) / examples)
  return out


def upload(local: str, emulator, prefix: str) -> None:
  bucket = emulator.client.bucket(emulator.bucket)
  for d, _, files in os.walk(local):
    for f in files:
      p = os.path.join(d, f)
      bucket.blob(f"{prefix}/{os.path.relpath(p, local)}").upload_from_filename(p)


def measure() -> dict:
  from retro_jax.build import stages as build_lib
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.training import examples_stage
  from retro_jax.training import joined_examples as joined

  res = {**run_provenance("bench.joined_examples"), "seq_len": FLAGS.seq_len,
         "batch_size_per_host": FLAGS.batch_size, "hosts": HOSTS, "steps": FLAGS.steps,
         "min_seconds": FLAGS.min_seconds,
         "num_neighbours": NUM_NEIGHBOURS, "neighbour_len": 128, "read_threads": READ_THREADS,
         "rate_after_batches": SKIP,
         "cpus": os.cpu_count(), "storage": {}}
  with tempfile.TemporaryDirectory(prefix="joined-bench-") as tmp, \
      gcs_emulator.running() as emulator:
    db = os.path.join(tmp, "db")
    build_lib.build(db, **SETTINGS)
    settings = joined.Settings(split="train", seq_len=FLAGS.seq_len, retrieval=True,
                               num_neighbours=NUM_NEIGHBOURS, neighbour_len=128, seed=SEED)
    t0 = time.perf_counter()
    manifest = examples_stage.run(db, settings, epochs=FLAGS.epochs, examples_per_shard=64)
    res["examples_stage_seconds"] = time.perf_counter() - t0
    store = chunk_store_lib.ChunkStore.open(db)
    shard0 = os.fspath(joined.shard_path(joined.examples_dir(db, settings), 0))
    res.update(num_chunks=store.num_chunks, num_sequences=manifest["num_sequences"],
               examples_written=manifest["num_records"],
               example_bytes=os.path.getsize(shard0) // manifest["examples_per_shard"],
               writer_options=array_record_module.ArrayRecordReader(
                   shard0).writer_options_string())
    upload(db, emulator, "db")
    proxy = CountingProxy(emulator.url)
    env = {**os.environ, **emulator.env(), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.update({k: proxy.url for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                       "CLOUD_STORAGE_EMULATOR_ENDPOINT")})
    for storage, root, px in (("local", db, None), ("gs", f"gs://{emulator.bucket}/db", proxy)):
      runs = {path: run_hosts(root, path, env, px) for path in PATHS}
      same = runs["random"].pop("digests") == runs["joined"].pop("digests")
      res["storage"][storage] = {"same_batches": same, **runs}
      print(storage, json.dumps(res["storage"][storage]), flush=True)
    proxy.stop()
    shutil.rmtree(db, ignore_errors=True)
  return res


def page(res: dict) -> str:
  """docs/joined_examples.md from the results file (every figure read from it)."""
  lines = ["# Training input: the database path against the joined examples", "",
           f"Written by `{res['command']}` at commit {res['commit']} on {res['date']} from "
           "`bench/results/joined_examples.json`; how it is measured: `bench/joined_examples.py`. "
           f"{res['num_chunks']:,} chunks, sequences of {res['seq_len']} tokens "
           f"({res['seq_len'] // 64} chunks) with {res['num_neighbours']} neighbours of "
           f"{res['neighbour_len']} tokens; {res['hosts']} hosts at once (two processes on "
           f"{res['cpus']} cores), {res['batch_size_per_host']} rows each per step, "
           f"at least {res['steps']} steps after the first, {res['read_threads']} read "
           f"threads. Joined examples: {res['examples_written']:,} written (about {res['example_bytes']:,} bytes "
           f"each, ArrayRecord's zstd) by the examples stage in "
           f"{res['examples_stage_seconds']:.1f} s. The gs:// bucket is a local emulator (no "
           "network latency: a real bucket adds a round trip per request).", "",
           "| storage | input | same batches | requests per example | requests before the "
           "steps | read() calls per example | examples/s per host |",
           "|---|---|---|---|---|---|---|"]
  for storage, runs in res["storage"].items():
    for path in PATHS:
      r = runs[path]
      reqs = (f"{r['requests_per_example']:.2f}" if "requests_per_example" in r else "-")
      first = str(r["requests_before"]) if "requests_per_example" in r else "-"
      calls = " / ".join(f"{h['read_syscalls_per_example']:.1f}" for h in r["hosts"])
      rate = " / ".join(f"{h['examples_per_s']:.0f}" for h in r["hosts"])
      lines.append(f"| {storage} | {path} | {'yes' if runs['same_batches'] else 'NO'} | {reqs} | "
                   f"{first} | {calls} | {rate} |")
  lines += ["", "Requests are HTTP requests to the bucket (every client, counted by a proxy) "
            "during the steps, both hosts' together over both hosts' examples; requests before "
            "the steps: opening the loader, its first batch and what grain prefetched meanwhile. "
            "read() calls are the host process's system calls (/proc/self/io syscr); the "
            "database path's local reads are memory-mapped page faults, which they do not "
            f"count. Examples/s: over the steps after the first {res['rate_after_batches']} "
            "(grain's prefetch buffer filled while the hosts waited for each other), at least "
            f"{res['min_seconds']:g} s of them; same batches: the first {res['steps']} steps' "
            "arrays equal on both paths, host by host. Two "
            "figures in a cell: host 0 / host 1.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.host:
    db, path, p = FLAGS.host.split("|")
    host(db, path, int(p))
    return
  if FLAGS.page_only:
    write_page(FLAGS.doc, page, FLAGS.out)
    return
  res = measure()
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
    f.write("\n")
  with open(FLAGS.doc, "w") as f:
    f.write(page(res))


if __name__ == "__main__":
  app.run(main)
