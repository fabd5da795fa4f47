r"""What opening a database costs in reads, at two sizes: the store, the retriever, one serving
shard's server, and the start of training.

    python -m bench.open_reads --dbs=runs/default_f2,runs/synth_10m   # -> bench/results/open_reads.json

Each operation runs in a fresh process (nothing cached from another) while every filesystem call
under the database is counted (bench.plan_simulation.Counter: open, stat, listdir, and the size of
each file opened for reading). Operations:
  store_open           ChunkStore.open
  store_first_gather   then the tokens of one chunk (format 3: that shard's record, the offsets
                       and the blocks read; older stores: the whole shard list and file)
  retriever_open       Retriever.from_db (the global index: the trained files whole, then every
                       serving shard's faiss header and its lists file's header and ends (an
                       index without lists files: one count per partition instead); its inverted
                       lists are read when a query first probes them)
  shard_server_open    ShardServicer for serving shard 0 (what one serving host loads)
  training_start       bytes_per_token, then SequenceSource (train split, 2 neighbours), then its
                       first example (what a training host reads before its first step)
Reported: requests (calls), read_bytes (bytes through read() calls, /proc/self/io rchar: the
library files of a lazy import included), read_calls (those calls, syscr) and opened_file_bytes
(the sizes of the files opened for reading; a memory-mapped file counts whole, though the kernel
pages in only what is used).
`--operations=...` measures some operations only (the page is then not rewritten).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

_DBS = flags.DEFINE_list("dbs", ["runs/default_f2", "runs/synth_10m"], "Databases to open.")
_OUT = flags.DEFINE_string("out", "bench/results/open_reads.json", "Results file.")
_ONE = flags.DEFINE_string("one", None, "(internal) DB:OPERATION to measure in this process.")
_DOC = flags.DEFINE_string("doc", "docs/open_reads.md", "The page written from the results.")
_OPS = flags.DEFINE_list("operations", None, "Only these operations (default: all); a partial "
                        "run writes no page.")

OPERATIONS = ("store_open", "store_first_gather", "retriever_open", "shard_server_open",
              "training_start")
INDEX_OPERATIONS = ("retriever_open", "shard_server_open")


def _io(field: str = "rchar") -> int:
  """This process's /proc/self/io `field`: rchar, the bytes it has read through read() calls
  (cached or not); syscr, those calls."""
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith(field + ":")).split()[1])


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
  try:
    if op == "store_open":
      chunk_store_lib.ChunkStore.open(root)
    elif op == "store_first_gather":
      chunk_store_lib.ChunkStore.open(root).tokens(np.array([0]))
    elif op == "retriever_open":
      retriever_lib.Retriever.from_db(root)
    elif op == "shard_server_open":
      shard_server.ShardServicer(root, 0)
    elif op == "training_start":
      store = chunk_store_lib.ChunkStore.open(root)
      loop.bytes_per_token(store)
      src = input_pipeline.SequenceSource(root, 128, "train", True, 2, 128, store=store)
      src[0]
  finally:
    counter.stop()
  read_bytes, read_calls = _io() - read0, _io("syscr") - calls0
  top = sorted(counter.paths.items(), key=lambda kv: -kv[1])
  out = {"requests": counter.requests, "read_bytes": read_bytes, "read_calls": read_calls,
         "opened_file_bytes": counter.bytes,
         "distinct_paths": len(counter.paths), "most_requested": top[:5]}
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
  lines = ["# What opening a database reads, at two sizes", "",
           f"Written by `{res['command']}` at commit {res['commit']} on {res['date']} from "
           "`bench/results/open_reads.json`; how it is measured: `bench/open_reads.py` (each "
           "operation in a fresh process; requests are open / stat / listdir calls under the "
           "database; read bytes go through read() calls, memory-mapped pages not counted).", "",
           "| operation | " + " | ".join(
               f"{res['databases'][d]['num_chunks']:,} chunks ({res['databases'][d]['store_shards']}"
               " store shards): requests, read bytes" for d in dbs) + " |",
           "|---|" + "---|" * len(dbs)]
  for op in OPERATIONS:
    cells = []
    for d in dbs:
      o = res["databases"][d]["operations"][op]
      cells.append("error" if "error" in o else f"{o['requests']}, {o['read_bytes']:,}")
    lines.append(f"| {op} | " + " | ".join(cells) + " |")
  lines += ["", _index_note(res, dbs), "", _training_note(res, dbs)]
  lines.append("")
  return "\n".join(lines)


def _training_note(res: dict, dbs: list[str]) -> str:
  """What the training-start row reads: the store shards its first example's chunks reach."""
  facts = []
  for d in dbs:
    o = res["databases"][d]["operations"]["training_start"]
    if "store_shards_read" not in o:
      return ""
    facts.append(f"{o['store_shards_read']} of {res['databases'][d]['store_shards']} store shards "
                 f"and {o['neighbours_shards_read']} neighbours shard(s) at "
                 f"{res['databases'][d]['num_chunks']:,} chunks")
  return ("training_start reads the first example's chunks and its neighbours' document ids (the "
          "same-document filter): a record and the touched 128 KiB blocks of each store shard "
          "those chunks lie in (" + "; ".join(facts) + "). That count is bounded by the example's "
          "chunks times its neighbours, not by the database: it grows with the store only while "
          "the store has fewer shards than that.")


def _index_note(res: dict, dbs: list[str]) -> str:
  """What the retriever and shard-server rows read: the index's trained files, whole."""
  facts, lists_files = [], []
  for d in dbs:
    o = res["databases"][d]["operations"]["retriever_open"]
    if "index" in o:
      i = o["index"]
      lists_files.append(i.get("lists_files", False))
      facts.append(f"{i['trained_bytes']:,} bytes at {res['databases'][d]['num_chunks']:,} chunks "
                   f"(`{i['factory']}`, nlist {i['nlist']:,})")
  if not facts:
    return ""
  return ("retriever_open and shard_server_open read the global index's trained files whole "
          "(`trained.faiss`: the coarse quantizer and PQ codebooks, " + "; ".join(facts) +
          "; nlist grows as ~2 sqrt(N)), then of each serving shard's faiss file a header and "
          + ("of its lists file a header and two offsets" if all(lists_files) else
             "8 bytes a partition" if not any(lists_files) else
             "8 bytes a partition (databases without lists files) or its lists file's header and "
             "two offsets")
          + "; its inverted lists are read when a query first probes them, its int8 rerank copy "
          "and ids are memory-mapped.")


if __name__ == "__main__":
  app.run(main)
