r"""The index and neighbours stages over a database of 10M synthetic chunks, in worker processes.

    python -m bench.synthetic_db --db=runs/synth_10m --num_chunks=10000000
    python -m bench.build_10m --db=runs/synth_10m [--workers=2]   # -> bench/results/build_10m.json

Runs `python -m retro_jax.build_db --stages=S --runner=DirectRunner
--direct_running_mode=multi_processing --direct_num_workers=W` once per stage (index, then
neighbours) and samples, every half second, the memory of the whole process tree (the launcher
and its worker processes), from /proc: anonymous memory (what the processes hold: the index, the
queries, Beam's buffers) and file pages (memory-mapped embeddings and rerank copy, page cache that
the kernel can drop). Reports per stage the wall time, the peak of the tree's anonymous memory
(the sum over processes at one sample) and of its largest process, and those per vector.

Then recall against exact search (float32 dot products over every stored vector, streamed):
  - the global index as built (`GlobalIndex.search`, k = 10) for `--num_queries` stored vectors
    drawn with a fixed seed: recall@10;
  - the training neighbours the stage wrote (k = 2, a chunk's own document excluded) for the
    same chunks against the exact top 2 with the same exclusion: recall@2.
A stage already finished is not run again (its time is kept from the results file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from bench import common
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.evaluation.figures import provenance as run_provenance
from retro_jax.retrieval import global_index as global_lib
from retro_jax.retrieval import retriever as retriever_lib

_DB = flags.DEFINE_string("db", "runs/synth_10m", "A database through its embeddings stage.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Beam worker processes.")
_STAGES = flags.DEFINE_list("stages", ["index", "neighbours"], "Stages to run.")
_NQ = flags.DEFINE_integer("num_queries", 1000, "Stored vectors used as queries for recall.")
_OUT = flags.DEFINE_string("out", "bench/results/build_10m.json", "Results file.")
_LOG = flags.DEFINE_string("log", None, "Where the build's output goes (default: DB/../NAME.log).")
_DOC = flags.DEFINE_string("doc", "docs/build_10m.md", "The page written from the results file.")
_DOC_ONLY = flags.DEFINE_bool("doc_only", False, "Only write --doc from an existing --out.")
_NOTE = flags.DEFINE_string("note", None, "A remark on the recovered stages' runs, kept in the "
                            "results and shown on the page.")
_RECOVER = flags.DEFINE_string("recover_log", None, "A log of an earlier run of this script whose "
                               "results file was not written: its printed stage records are "
                               "taken (marked so) for stages not run now.")


def _tree(root: int) -> list[int]:
  pids, todo = [], [root]
  while todo:
    p = todo.pop()
    pids.append(p)
    try:
      tasks = os.listdir(f"/proc/{p}/task")
    except OSError:
      continue
    for t in tasks:  # a child belongs to the thread that started it
      try:
        with open(f"/proc/{p}/task/{t}/children") as f:
          todo += [int(c) for c in f.read().split()]
      except OSError:
        pass
  return pids


def _mem_kb(pid: int) -> tuple[int, int]:
  """(RssAnon, RssFile) of a process, in kB (0, 0 once it has gone)."""
  anon = file = 0
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          anon = int(line.split()[1])
        elif line.startswith("RssFile:"):
          file = int(line.split()[1])
  except OSError:
    pass
  return anon, file


def run_stage(stage: str, db: str, workers: int, log) -> dict:
  cmd = [sys.executable, "-m", "retro_jax.build_db", f"--db={db}", f"--stages={stage}",
         "--runner=DirectRunner", "--direct_running_mode=multi_processing",
         f"--direct_num_workers={workers}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  peak = {"tree_anon_kb": 0, "process_anon_kb": 0, "tree_file_kb": 0, "processes": 0}
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      mems = [_mem_kb(p) for p in _tree(proc.pid)]
      peak["tree_anon_kb"] = max(peak["tree_anon_kb"], sum(a for a, _ in mems))
      peak["process_anon_kb"] = max(peak["process_anon_kb"], max(a for a, _ in mems))
      peak["tree_file_kb"] = max(peak["tree_file_kb"], sum(f for _, f in mems))
      peak["processes"] = max(peak["processes"], len(mems))
      stop.wait(0.5)

  th = threading.Thread(target=sample, daemon=True)
  th.start()
  rc = proc.wait()
  stop.set()
  th.join()
  if rc:
    raise SystemExit(f"{' '.join(cmd)} exited with {rc}; see {log.name}")
  return {"command": " ".join(cmd[1:]), "wall_seconds": time.perf_counter() - t0, **peak,
          "provenance": run_provenance("python " + " ".join(cmd[1:]))}


def page(res: dict) -> str:
  """docs/build_10m.md from the results file (every figure read from it)."""
  p = res["provenance"]
  lines = [f"# The index and neighbours stages over {res['num_vectors']:,} vectors, in worker "
           "processes", "",
           f"Written by `{p['command']}` at commit {p['commit']} on {p['date']} from "
           "`bench/results/build_10m.json`; how it is measured: `bench/build_10m.py`.",
           f"Data: {res['data']}. Machine: {res['machine']}, {res['workers']} Beam worker "
           "processes (`--direct_running_mode=multi_processing`).", "",
           "| stage | wall time | processes | peak anonymous RAM, all processes | per vector "
           "| largest process | per vector | peak file pages mapped |", "|" + "---|" * 8]
  for stage, d in res["stages"].items():
    lines.append(
        f"| {stage} | {d['wall_seconds']:,.0f} s | {d['processes']} | "
        f"{d['tree_anon_kb'] / 2**20:,.2f} GiB | {d['tree_anon_bytes_per_vector']:,.0f} B | "
        f"{d['process_anon_kb'] / 2**20:,.2f} GiB | {d['process_anon_bytes_per_vector']:,.0f} B | "
        f"{d['tree_file_kb'] / 2**20:,.2f} GiB |")
  for stage, d in res["stages"].items():
    if d.get("recovered_from_log"):
      lines += ["", f"The {stage} row is the record that run printed (`{d['recovered_from_log']}`; "
                "its results file was not written: a bug in this script, since fixed). "
                + (d.get("note") or "")]
  ix, r = res["index"], res["recall"]
  bs = ix["build_seconds"]
  lines += ["", f"The index: `{ix['factory']}`, {ix['config']['serving_shards']} serving shard(s), "
            f"trained on {ix['config']['train_sample']:,} vectors "
            f"({ix['config']['train_sample'] / ix['config']['nlist']:.0f} per centroid); step "
            f"seconds summed over elements: train {bs['train']:,.1f}, encode {bs['encode']:,.1f}, "
            f"merge {bs['merge']:,.1f}. RAM (codes and ids) {ix['ram_bytes_per_vector']:.1f} B per "
            f"vector; on disk {ix['disk_bytes_per_vector']:.1f} B per vector.", "",
            f"Recall against exact float32 search, {r['num_queries']:,} stored vectors as queries "
            f"(seed {r['seed']}):", "",
            f"- the index (k = 10, nprobe {r['index_settings']['nprobe']}, rerank "
            f"{r['index_settings']['rerank']}): recall@10 {r['index_recall@10']:.4f};",
            f"- the training neighbours the stage wrote (k = 2, own document excluded): "
            f"recall@2 {r['training_neighbours_recall@2']:.4f}.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if _DOC_ONLY.value:
    common.write_page(_DOC.value, page, _OUT.value)
    return
  db = _DB.value
  store = chunk_store_lib.ChunkStore.open(db)
  out = json.load(open(_OUT.value)) if os.path.exists(_OUT.value) else {"stages": {}}
  out.update({"db": db, "num_vectors": store.num_chunks, "workers": _WORKERS.value,
              "data": "synthetic: bench/synthetic_db.py (real MiniLM vectors of the default "
                      "database, then noisy re-normalised copies; 20-chunk documents)",
              "machine": f"{os.cpu_count()} cores"})
  log_path = _LOG.value or os.path.join(os.path.dirname(os.path.abspath(db)),
                                        os.path.basename(db) + "_build.log")
  if _RECOVER.value:
    for line in open(_RECOVER.value):
      stage, _, rest = line.partition(" ")
      if stage in ("index", "neighbours") and rest.startswith("{") and stage not in _STAGES.value:
        out["stages"][stage] = {**json.loads(rest), "recovered_from_log": _RECOVER.value,
                                "note": _NOTE.value}
  with open(log_path, "a") as log:
    for stage in _STAGES.value:
      rec = run_stage(stage, db, _WORKERS.value, log)
      if stage in out["stages"] and rec["wall_seconds"] < 60 and "skipped" in open(log_path).read():
        continue  # finished before: keep the measured run
      n = store.num_chunks
      rec["tree_anon_bytes_per_vector"] = rec["tree_anon_kb"] * 1024 / n
      rec["process_anon_bytes_per_vector"] = rec["process_anon_kb"] * 1024 / n
      out["stages"][stage] = rec
      print(stage, json.dumps(rec), flush=True)
      with open(_OUT.value, "w") as f:  # after each stage: a later failure keeps it
        json.dump(out, f, indent=1)
  root = global_lib.index_dir(db)
  manifest = global_lib.read_manifest(root)
  before = (out.get("index") or {}).get("content_sha256")
  out["index"] = {k: manifest[k] for k in ("count", "config", "factory", "ram_bytes",
                                           "build_seconds", "content_sha256")}
  out["index"]["disk_bytes"] = sum(os.path.getsize(os.path.join(d, f))
                                   for d, _, fs in os.walk(root) for f in fs)
  out["index"]["disk_bytes_per_vector"] = out["index"]["disk_bytes"] / store.num_chunks
  out["index"]["ram_bytes_per_vector"] = manifest["ram_bytes"] / store.num_chunks

  if "recall" in out and before == manifest["content_sha256"]:
    _finish(out)  # the same index bytes as the recall was measured on
    return
  rng = np.random.default_rng(0)
  qids = np.sort(rng.choice(store.num_chunks, _NQ.value, replace=False)).astype(np.int64)
  sources = [(i, np.load(path, mmap_mode="r"), off)
             for i, path, off in retriever_lib.db_embedding_shards(db, verify_content=False)]
  offs = np.array([off for _, _, off in sources])
  shard_of = np.searchsorted(offs, qids, side="right") - 1
  q = np.stack([np.asarray(sources[s][1][int(i - offs[s])], np.float32)
                for s, i in zip(shard_of, qids)])
  t0 = time.perf_counter()
  index = global_lib.GlobalIndex(root)
  open_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  found, _ = index.search(q, 10)
  search_s = time.perf_counter() - t0
  true10, _ = common.exact_top(sources, q, 10)
  docs = store.doc_ids(qids)
  true2, _ = common.exact_top(sources, q, 2, docs, store.doc_ids)
  nb = np.concatenate([np.load(layout.neighbours_path(db, int(s)), mmap_mode="r")[
      [int(i - offs[s])]] for s, i in zip(shard_of, qids)])
  out["recall"] = {
      "num_queries": int(len(qids)), "seed": 0,
      "index_recall@10": common.recall(found, true10),
      "index_settings": {"nprobe": index.config.nprobe, "rerank": index.config.rerank},
      "index_open_seconds": open_s, "index_search_qps_one_call": len(qids) / search_s,
      "training_neighbours_recall@2": common.recall(nb, true2),
      "exact": "float32 dot products over every stored vector (own document excluded for the "
               "training neighbours)"}
  _finish(out)


def _finish(out: dict) -> None:
  if "provenance" in out:  # an earlier run's (its stages keep their own)
    out.setdefault("earlier_runs", []).append(out["provenance"])
  out["provenance"] = run_provenance("python -m bench.build_10m " + " ".join(sys.argv[1:]))
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  with open(_DOC.value, "w") as f:
    f.write(page(out))
  print(json.dumps(out["recall"], indent=1))


if __name__ == "__main__":
  app.run(main)
