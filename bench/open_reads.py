r"""What opening a database costs in reads, at several sizes: the store, the retriever, one serving
shard's server, and the start of training.

    python -m bench.synthetic_db --db=runs/synth_1m --num_chunks=1000000
    python -m retro_jax.build_db --db=runs/synth_1m --stages=index,neighbours
    for db in runs/default_db runs/synth_1m runs/synth_10m; do   # the joined examples
      python -m retro_jax.build_db --db=$db --stages=examples --config=experiments/tiny.py
    done
    python -m bench.open_reads --dbs=runs/default_db,runs/synth_1m,runs/synth_10m
                                                   # -> bench/results/open_reads.json

Each operation runs in a fresh process (nothing cached from another), after the database's files
are dropped from the page cache (posix_fadvise DONTNEED), while every filesystem call
under the database is counted (bench.plan_simulation.Counter: open, stat, listdir, and the size of
each file opened for reading). Operations:
  store_open           ChunkStore.open
  store_first_gather   then the tokens of one chunk (format 3: that shard's record, the offsets
                       and the blocks read; older stores: the whole shard list and file)
  retriever_open       Retriever.from_db (the global index: its trained file memory-mapped, its
                       two ends read, then every serving shard's faiss header and its lists
                       file's header and ends (an index without lists files: one count per
                       partition instead); its inverted lists are read when a query first
                       probes them)
  shard_server_open    ShardServicer for serving shard 0 (what one serving host loads)
  training_start       bytes_per_token, then SequenceSource (train split, 2 neighbours), then its
                       first example (what a training host reads before its first step, on the
                       random path: --config.input=random)
  training_start_joined  the same from the examples joined ahead of time (the pod path:
                       make_dataset(input="joined"), then its first batch of one); needs
                       `python -m retro_jax.build_db --db=DB --stages=examples
                       --config=experiments/tiny.py` first
  retriever_query      Retriever.from_db, then one query (2 neighbours): what routing and the
                       probed lists add to the open (not an open: a query's own cost)
Reported: requests (calls from Python; faiss's own open of a file it memory-maps is not seen),
read_bytes (bytes through read() calls, /proc/self/io rchar: the library files of a lazy import
included), read_calls (those calls, syscr), opened_file_bytes (the sizes of the files opened for
reading from Python; a memory-mapped file counts whole, though the kernel pages in only what is
used) and mapped_bytes (the pages of files under the database memory-mapped into the process and
present in its page tables at the end, each file page counted once however many mappings share
it, from /proc/self/maps and /proc/self/pagemap: an upper bound on what was touched, as the kernel
also maps the cached pages around a faulting one (64 KiB; whole large folios when the file's pages
were cached by a large read, hence the eviction first)).
`--operations=...` measures some operations only (the page is then not rewritten).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_DBS = flags.DEFINE_list("dbs", ["runs/default_db", "runs/synth_1m", "runs/synth_10m"],
                         "Databases to open.")
_OUT = flags.DEFINE_string("out", "bench/results/open_reads.json", "Results file.")
_ONE = flags.DEFINE_string("one", None, "(internal) DB:OPERATION to measure in this process.")
_DOC = flags.DEFINE_string("doc", "docs/open_reads.md", "The page written from the results.")
_OPS = flags.DEFINE_list("operations", None, "Only these operations (default: all); a partial "
                        "run writes no page.")

OPERATIONS = ("store_open", "store_first_gather", "retriever_open", "shard_server_open",
              "training_start", "training_start_joined", "retriever_query")
JOINED_SEQ_LEN = 256  # experiments/tiny.py's: the examples `build_db --stages=examples` wrote
INDEX_OPERATIONS = ("retriever_open", "shard_server_open", "retriever_query")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _io(field: str = "rchar") -> int:
  """This process's /proc/self/io `field`: rchar, the bytes it has read through read() calls
  (cached or not); syscr, those calls."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _mapped(root: str) -> dict[str, int]:
  """{path under `root`: bytes of its pages present in this process's mappings of it}, each file
  page once (/proc/self/maps: the mappings and their file offsets; /proc/self/pagemap: bit 63 of a
  page's entry, present)."""
  import numpy as np
  maps = []
  with open("/proc/self/maps") as f:
    for line in f:
      parts = line.split(maxsplit=5)
      if len(parts) == 6 and parts[5].strip().startswith(root + os.sep):
        a, b = (int(x, 16) for x in parts[0].split("-"))
        maps.append((a, b, int(parts[2], 16), os.path.relpath(parts[5].strip(), root)))
  pages: dict[str, set] = {}
  with open("/proc/self/pagemap", "rb", buffering=0) as pm:
    for a, b, offset, path in maps:
      entries = np.frombuffer(os.pread(pm.fileno(), 8 * ((b - a) // _PAGE), 8 * (a // _PAGE)),
                              np.uint64)
      present = np.flatnonzero(entries >> np.uint64(63)) + offset // _PAGE
      pages.setdefault(path, set()).update(present.tolist())
  return {p: len(v) * _PAGE for p, v in sorted(pages.items()) if v}


def _evict(root: str) -> None:
  """Drops the database's files from the page cache (POSIX_FADV_DONTNEED: clean pages only), so
  the next operation's mapped pages are those it faults in, not whole cached folios."""
  for top, _, names in os.walk(root):
    for name in names:
      fd = os.open(os.path.join(top, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _measure(db: str, op: str) -> dict:
  """Runs one operation in this process; returns the counted reads."""
  import numpy as np

  from bench.plan_simulation import Counter
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.retrieval import retriever as retriever_lib
  from retro_jax.retrieval import shard_server
  from retro_jax.training import input_pipeline, loop

  root = os.path.abspath(db)
  read0, calls0 = _io(), _io("syscr")
  counter = Counter(root).start()
  held = []  # what the operation opened, alive until its mappings are counted
  try:
    if op == "store_open":
      held.append(chunk_store_lib.ChunkStore.open(root))
    elif op == "store_first_gather":
      held.append(chunk_store_lib.ChunkStore.open(root))
      held[0].tokens(np.array([0]))
    elif op == "retriever_open":
      held.append(retriever_lib.Retriever.from_db(root))
    elif op == "shard_server_open":
      held.append(shard_server.ShardServicer(root, 0))
    elif op == "retriever_query":
      r = retriever_lib.Retriever.from_db(root)
      held.append(r)
      q_1xD = np.random.default_rng(0).normal(size=(1, r.dim)).astype(np.float32)
      r.search(q_1xD / np.linalg.norm(q_1xD), 2)
    elif op == "training_start_joined":
      ds = input_pipeline.make_dataset(root, seq_len=JOINED_SEQ_LEN, batch_size=1,
                                       input="joined", process_index=0, process_count=1)
      held.append(ds)
      ds[0]
    elif op == "training_start":
      store = chunk_store_lib.ChunkStore.open(root)
      loop.bytes_per_token(store)
      src = input_pipeline.SequenceSource(root, 128, "train", True, 2, 128, store=store)
      src[0]
      held += [store, src]
  finally:
    counter.stop()
  read_bytes, read_calls = _io() - read0, _io("syscr") - calls0
  mapped = _mapped(root)  # after the counts: reading pagemap is itself a read
  top = sorted(counter.paths.items(), key=lambda kv: -kv[1])
  out = {"requests": counter.requests, "read_bytes": read_bytes, "read_calls": read_calls,
         "opened_file_bytes": counter.bytes, "mapped_bytes": sum(mapped.values()),
         "mapped_files": mapped, "distinct_paths": len(counter.paths), "most_requested": top[:5]}
  if op == "training_start":  # the store shards its reads reached (records, blocks)
    out["store_shards_read"] = len({p.split("/")[1] for p in counter.paths
                                     if p.startswith("chunks/shard-")})
    out["neighbours_shards_read"] = len({p for p in counter.paths
                                         if p.startswith("neighbours/shard-")})
  if op in INDEX_OPERATIONS:  # what the index open reads whole: its trained files (~sqrt(N))
    from retro_jax.retrieval import global_index as global_lib
    m = global_lib.read_manifest(global_lib.index_dir(root))
    out["index"] = {"nlist": int(m["config"]["nlist"]), "factory": m["factory"],
                    "trained_bytes": int(m["files"][global_lib.TRAINED]["bytes"]),
                    "lists_files": "lists" in global_lib.read_serving_record(
                        global_lib.index_dir(root), 0)["files"]}
  return out


def main(argv):
  del argv
  if _ONE.value:
    db, op = _ONE.value.rsplit(":", 1)
    print(json.dumps(_measure(db, op)))
    return
  from retro_jax.db import chunk_store as chunk_store_lib
  from retro_jax.evaluation.figures import provenance
  res = {**provenance("python -m bench.open_reads " + " ".join(sys.argv[1:])), "databases": {}}
  for db in _DBS.value:
    store = chunk_store_lib.ChunkStore.open(db)
    row = {"num_chunks": store.num_chunks, "store_shards": store.num_shards, "operations": {}}
    for op in _OPS.value or OPERATIONS:
      _evict(os.path.abspath(db))
      env = {**os.environ, "JAX_PLATFORMS": "cpu"}
      out = subprocess.run([sys.executable, "-m", "bench.open_reads", f"--one={db}:{op}"],
                           capture_output=True, text=True, env=env, timeout=1800)
      if out.returncode:
        row["operations"][op] = {"error": out.stderr.strip().splitlines()[-1:]}
      else:
        row["operations"][op] = json.loads(out.stdout.strip().splitlines()[-1])
      print(db, op, json.dumps(row["operations"][op]), flush=True)
    res["databases"][db] = row
  with open(_OUT.value, "w") as f:
    json.dump(res, f, indent=1)
    f.write("\n")
  if not _OPS.value:
    with open(_DOC.value, "w") as f:
      f.write(page(res))


def page(res: dict) -> str:
  """docs/open_reads.md from the results file (every figure read from it)."""
  dbs = list(res["databases"])
  lines = [f"# What opening a database reads, at {len(dbs)} sizes", "",
           f"Written by `{res['command']}` at commit {res['commit']} on {res['date']} from "
           "`bench/results/open_reads.json`; how it is measured: `bench/open_reads.py` (each "
           "operation in a fresh process, the database's files dropped from the page cache "
           "first). Each cell: requests (open / stat / listdir calls under the database from "
           "Python), bytes read through read() calls, and bytes of memory-mapped files under the "
           "database present in the process's page tables at the end (each file page once; an "
           "upper bound on what was touched, as the kernel also maps the cached pages around a "
           "faulting one).", "",
           "| operation | " + " | ".join(
               f"{row['num_chunks']:,} chunks ({row['store_shards']} store shards)"
               for row in (res["databases"][d] for d in dbs)) + " |",
           "|---|" + "---|" * len(dbs)]
  for op in OPERATIONS:
    cells = []
    for d in dbs:
      o = res["databases"][d]["operations"].get(op, {"error": "not measured"})
      cells.append("error" if "error" in o else
                   f"{o['requests']}, {o['read_bytes']:,}, {o.get('mapped_bytes', 0):,}")
    lines.append(f"| {op} | " + " | ".join(cells) + " |")
  lines += ["", _index_note(res, dbs), "", _query_note(res, dbs), "", _training_note(res, dbs),
            "", _joined_note(res, dbs)]
  lines.append("")
  return "\n".join(lines)


def _facts(res: dict, dbs: list[str], op: str, key: str, fact) -> str | None:
  """`fact(operation's record, database's row)` for each database, joined by "; "; None when a
  database's `op` record lacks `key` (not measured, or failed): its note is then left out."""
  out = []
  for d in dbs:
    row = res["databases"][d]
    o = row["operations"].get(op, {})
    if key not in o:
      return None
    out.append(fact(o, row))
  return "; ".join(out)


def _training_note(res: dict, dbs: list[str]) -> str:
  """What the training-start row reads: the store shards its first example's chunks reach."""
  facts = _facts(res, dbs, "training_start", "store_shards_read", lambda o, row: (
      f"{o['store_shards_read']} of {row['store_shards']} store shards and "
      f"{o['neighbours_shards_read']} neighbours shard(s) at {row['num_chunks']:,} chunks: "
      f"{o['read_bytes'] // max(o['store_shards_read'], 1):,} bytes read per store shard "
      "reached"))
  if facts is None:
    return ""
  return ("training_start reads the first example's chunks and its neighbours' tokens and "
          "document ids (the same-document filter): a record and the touched 128 KiB blocks of "
          f"each store shard those chunks lie in ({facts}). That count is bounded by the "
          "example's chunks times its neighbours, plus one, not by the database: it grows with "
          "the store only while the store has fewer shards than that.")


def _joined_note(res: dict, dbs: list[str]) -> str:
  """What the joined-examples training start reads."""
  facts = _facts(res, dbs, "training_start_joined", "read_bytes", lambda o, row: (
      f"{o['read_bytes']:,} bytes in {o['read_calls']} read calls at {row['num_chunks']:,} "
      "chunks"))
  if facts is None:
    return ""
  return ("training_start_joined is the pod's path (the examples joined with their neighbours "
          "ahead of time, `build_db --stages=examples`): it reads the store's and the examples' "
          "manifests, the neighbours' provenance and first shard's header (the examples' "
          "fingerprint of the database and the neighbours per chunk) and the first array_record "
          f"chunk of the first examples shard, whatever the database's size: {facts}.")


def _index_note(res: dict, dbs: list[str]) -> str:
  """What the retriever and shard-server rows read: headers; the trained file memory-mapped."""
  facts = _facts(res, dbs, "retriever_open", "index", lambda o, row: (
      f"{o.get('mapped_files', {}).get('index/global/trained.faiss', 0):,} of its "
      f"{o['index']['trained_bytes']:,} bytes at {row['num_chunks']:,} chunks "
      f"(`{o['index']['factory']}`, nlist {o['index']['nlist']:,})"))
  if facts is None:
    return ""
  return ("retriever_open and shard_server_open read the index's manifest and scale, the two ends "
          "of its trained file (`trained.faiss`: the coarse quantizer and PQ codebooks), and per "
          "serving shard its record, its faiss file's header and its lists file's header and two "
          "offsets: the same reads at every size. The trained file is memory-mapped, not read "
          f"(faiss's `IO_FLAG_MMAP_IFC`); loading it touches {facts}. What loading touches is the "
          "file's header, the PQ codebooks, a 16-byte count per empty list and, with an HNSW "
          "quantizer, its links, which faiss checks entry by entry when it loads them: that part "
          "grows with nlist, ~2 sqrt(N). The centroids, most of the file, are paged in as routing "
          "uses them; a serving shard's inverted lists are read when a query first probes them, "
          "its int8 rerank copy and ids are memory-mapped.")


def _query_note(res: dict, dbs: list[str]) -> str:
  """What one query adds to the retriever's open."""
  def fact(q, row):
    o = row["operations"].get("retriever_open", {})
    return (f"{q['read_bytes'] - o.get('read_bytes', 0):,} bytes read and "
            f"{q.get('mapped_bytes', 0) - o.get('mapped_bytes', 0):,} mapped at "
            f"{row['num_chunks']:,} chunks")
  facts = _facts(res, dbs, "retriever_query", "read_bytes", fact)
  if facts is None or any("read_bytes" not in res["databases"][d]["operations"].get(
      "retriever_open", {}) for d in dbs):
    return ""
  return ("retriever_query is not an open: it opens the retriever and searches one query, to show "
          f"where the rest goes. Over the open it adds {facts}: the probed inverted lists (read; "
          "a list holds ~N / nlist vectors), the centroids routing visits (all of them with a "
          "flat quantizer, those on the HNSW search's path otherwise) and the rerank rows of the "
          "candidates (mapped).")


if __name__ == "__main__":
  app.run(main)
