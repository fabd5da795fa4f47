r"""The build's planning over a simulated database of N chunks: what the launching process reads
and what job graph it sends, per stage, from 6e4 to 2.8e10 chunks.

    python -m bench.plan_simulation            # -> bench/results/plan_simulation.json

The layout is metadata only: the chunk store's manifest.json (totals), the embeddings stage's
outputs record, and the global index's manifest as `global_index._manifest` writes it (totals,
config, checksums of the trained files and one fingerprint of the serving shards). No shard list, no shard files: a launcher that reads one fails. The
real planning code runs over it (`build.build(plan_only=True)`: every stage's checks and its Beam
pipeline built, not run) while every filesystem call of this process is counted (open, stat,
listdir). Per stage it reports the serialized job graph, the launcher's requests and bytes read,
the distinct keys of each grouping and the largest element's work (from the plan functions the
workers run), and the index's nlist against its training sample with the training's elements
(one k-means, or the parallel training's: `training`).

The tokenizer and chunks stages are planned over simulated corpora of files (`simulate_corpus`):
a directory of N files and one `.jsonl` of N bytes, sparse files whose content is never written
(the planner lists names and sizes only, so nothing is read); per stage the job graph, the
launcher's requests and bytes read under the corpus, and the units of files (or byte ranges) the
workers classify and read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

from retro_jax.build import pipeline
from retro_jax.build import plan
from retro_jax.build import stages as build_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus as corpus_lib
from retro_jax.db import layout, provenance
from retro_jax.evaluation.figures import provenance as run_provenance
from retro_jax.retrieval import global_index as global_lib

SIZES = (60_000, 10_000_000, 1_000_000_000, 28_000_000_000)
CHUNKS_PER_STORE_SHARD = 81_920  # 4,096 documents of ~20 chunks, as in the default database
STAGES = ("embeddings", "index", "neighbours")
DIM = 384


def layout_for(n: int, root: str) -> dict:
  """Writes the simulated database's metadata under `root`; returns its shape."""
  shards = -(-n // CHUNKS_PER_STORE_SHARD)
  db = os.path.join(root, "db")
  os.makedirs(os.path.join(db, "chunks"))
  os.makedirs(os.path.join(db, "tokenizer"))
  open(os.path.join(db, layout.TOKENIZER_PATH), "wb").close()
  top = {"format_version": chunk_store_lib.FORMAT_VERSION, "chunk_size": 64, "num_chunks": n,
         "num_docs": n // 20, "num_tokens": n * 60, "docs_shorter_than_chunk": 0,
         "append_eos": True, "seed": 0,
         "tokenizer": {"kind": "sentencepiece", "vocab_size": 8192, "pad_id": 0,
                       "fingerprint": "0" * 64},
         "corpus": {"spec": "simulated", "max_docs": None, "docs_per_shard": 4096,
                    "bad_input": {}},
         "heldout": {"fraction": 0.01, "seed": 0, "num_docs": n // 2000, "file": "heldout.json",
                     "sha256": "1" * 64},
         "num_shards": shards, "records_dir": chunk_store_lib.RECORDS,
         "offsets_file": chunk_store_lib.OFFSETS, "content_sha256": "2" * 64}
  with open(os.path.join(db, "chunks", "manifest.json"), "w") as f:
    json.dump(top, f)
  # Format 3's offsets array (each shard's first chunk and document, then the totals); the
  # per-shard records are not written: planning reads none.
  starts = np.minimum(np.arange(shards + 1, dtype=np.int64) * CHUNKS_PER_STORE_SHARD, n)
  np.save(os.path.join(db, "chunks", chunk_store_lib.OFFSETS),
          np.stack([starts, np.minimum(starts // 20, n // 20)], axis=1))
  provenance.outputs_path(db, "embeddings").parent.mkdir(parents=True, exist_ok=True)
  with open(provenance.outputs_path(db, "embeddings"), "w") as f:
    json.dump({"format_version": 1, "stage": "embeddings", "num_shards": shards,
               "sha256": "3" * 64}, f)
  c = global_lib.GlobalIndexConfig().resolved(n)
  idx = global_lib.index_dir(db)
  os.makedirs(idx)
  files = {f: {"sha256": "4" * 64, "bytes": 1} for f in (global_lib.TRAINED, global_lib.SCALE)}
  manifest = {"format_version": global_lib.FORMAT_VERSION, "backend": global_lib.BACKEND,
              "count": n, "num_sources": shards, "dim": DIM, "config": c.to_json(),
              "factory": global_lib._factory(DIM, c), "versions": {}, "ram_bytes": n * 56,
              "files": files, "content_sha256": "5" * 64}
  return {"db": db, "store_shards": shards, "config": c, "index_manifest": manifest}


def _write_index_manifest(shape: dict) -> None:
  """After the index stage's planning (which plans a build only where none is finished)."""
  with open(os.path.join(global_lib.index_dir(shape["db"]), "manifest.json"), "w") as f:
    json.dump(shape["index_manifest"], f)


class Counter:
  """Counts this process's filesystem calls under `root` (open / stat / listdir) and the bytes of
  the files it opens for reading, between start() and stop()."""

  def __init__(self, root: str):
    self.root, self.requests, self.bytes, self.paths = root, 0, 0, {}
    self._stat, self._listdir, self._scandir = os.stat, os.listdir, os.scandir

  def _hit(self, path, size=0):
    p = os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
    if isinstance(p, str) and p.startswith(self.root):
      self.requests += 1
      self.bytes += size
      key = os.path.relpath(p, self.root)
      self.paths[key] = self.paths.get(key, 0) + 1

  def _audit(self, event, args):
    if self.on and event == "open" and args and args[0] is not None:
      path, mode = args[0], args[1] if len(args) > 1 else "r"
      if isinstance(path, (str, os.PathLike)) and ("r" in str(mode) or mode is None):
        try:
          size = self._stat(path).st_size
        except OSError:
          size = 0
        self._hit(path, size)

  def start(self):
    self.on = True
    counter = self

    def stat(path, *a, **k):
      counter._hit(path)
      return counter._stat(path, *a, **k)

    def listdir(path=".", *a, **k):
      counter._hit(path)
      return counter._listdir(path, *a, **k)

    def scandir(path=".", *a, **k):
      counter._hit(path)
      return counter._scandir(path, *a, **k)
    os.stat, os.listdir, os.scandir = stat, listdir, scandir
    if not getattr(Counter, "_hooked", False):
      sys.addaudithook(lambda e, a: Counter._current._audit(e, a) if Counter._current else None)
      Counter._hooked = True
    Counter._current = self
    return self

  def stop(self):
    self.on = False
    os.stat, os.listdir, os.scandir = self._stat, self._listdir, self._scandir
    Counter._current = None


Counter._current = None


def _groupings(n: int, shards: int, c: global_lib.GlobalIndexConfig) -> dict:
  blocks_e = -(-n // pipeline.EMBED_BLOCK_ROWS)  # about: blocks restart at each store shard
  blocks_n = -(-n // pipeline.NEIGHBOURS_BLOCK_ROWS)
  ranges = len(plan.ranges(n))
  return {
      "embeddings": {"SpreadRanges": ranges, "SpreadBlocks": blocks_e, "ByShard": shards,
                     "SpreadOutputGroups": provenance.outputs_groups(shards)},
      "index": {"SpreadSample": global_lib.num_groups(shards),
                **({"SpreadAssign": global_lib.num_groups(shards),
                    "ByCoarseCell": global_lib.coarse_cells(c)}
                   if global_lib.trains_in_parallel(c, n) else {}),
                "SpreadRanges": len(plan.ranges(global_lib.num_groups(shards))),
                "Distribute": global_lib.num_groups(shards), "ByServingShard": c.serving_shards},
      "neighbours": {"SpreadRanges": ranges, "Distribute": blocks_n,
                     "BySearchKey": plan.num_search_keys(n, c.serving_shards),
                     "ByBlock": blocks_n, "ByStoreShard": shards,
                     "SpreadOutputGroups": provenance.outputs_groups(shards)},
  }


def training(n: int, shards: int, c: global_lib.GlobalIndexConfig) -> dict:
  """The index training's elements (global_index: one k-means, or the parallel training's
  coarse, assign, cell and finish elements) and the vectors each holds, from the config the
  launcher resolves. A coarse cell's rows depend on the data: its mean is given."""
  sample = min(n, c.train_sample)
  if not global_lib.trains_in_parallel(c, n):
    elements = {"train": sample}
    keys = {"train": 1}
  else:
    cells, groups = global_lib.coarse_cells(c), global_lib.num_groups(shards)
    coarse = min(sample, cells * c.coarse_points_per_cell)
    elements = {"coarse": coarse, "assign": -(-sample // groups) + cells,
                "cell_mean": -(-sample // cells),
                "finish": c.nlist + min(coarse, c.pq_train_sample)}
    keys = {"coarse": 1, "assign": groups, "cell": cells, "finish": 1}
  name = max(elements, key=elements.get)
  return {"parallel": global_lib.trains_in_parallel(c, n), "sample": sample, "nlist": c.nlist,
          "sample_over_39": sample // c.min_points_per_centroid, "element_keys": keys,
          "elements": sum(keys.values()), "element_vectors": elements, "largest_element": name,
          "largest_element_vectors": elements[name],
          "largest_element_bytes_float32": elements[name] * DIM * 4,
          "threshold_vectors": c.parallel_train_min_sample}


def _largest(n: int, shards: int, c: global_lib.GlobalIndexConfig) -> dict:
  """The largest element of each stage, from the plan functions the workers run."""
  offsets = np.minimum(np.arange(shards + 1, dtype=np.int64) * CHUNKS_PER_STORE_SHARD, n)
  biggest = max((plan.ranges(n)), key=lambda r: r[1] - r[0])
  blocks = sum(1 for _ in plan.blocks_in(offsets, biggest[0], biggest[1],
                                         pipeline.NEIGHBOURS_BLOCK_ROWS))
  per_serving = -(-n // c.serving_shards)
  train = training(n, shards, c)
  return {
      "embeddings": {"block_rows": pipeline.EMBED_BLOCK_ROWS,
                     "range_expands_to_blocks": blocks},
      "index": {"train_element_vectors": train["largest_element_vectors"],
                "train_element_bytes_float32": train["largest_element_bytes_float32"],
                "encode_rows": global_lib.ENCODE_GROUP_SOURCES * CHUNKS_PER_STORE_SHARD,
                "merge_vectors": per_serving,
                "merge_reads_parts": global_lib.num_groups(shards),
                "finish_reads_records": global_lib.num_groups(shards) + 2 * c.serving_shards,
                "finish_reads_in_flight": global_lib.FINISH_READS_IN_FLIGHT},
      "neighbours": {"search_queries": plan.SEARCH_GROUP_ROWS,
                     "search_serving_shard_vectors": per_serving,
                     "outputs_record_reads": min(shards, provenance.OUTPUTS_GROUP_SHARDS)},
  }


def simulate(n: int, workdir: str | None = None) -> dict:
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    t0 = time.perf_counter()
    shape = layout_for(n, tmp)
    setup_s = time.perf_counter() - t0
    db, shards, c = shape["db"], shape["store_shards"], shape["config"]
    out = {"num_chunks": n, "store_shards": shards, "serving_shards": c.serving_shards,
           "nlist": c.nlist, "train_sample": c.train_sample,
           "sample_per_centroid": c.train_sample / c.nlist, "layout_seconds": setup_s,
           "training": training(n, shards, c), "stages": {}}
    out["index_manifest_bytes"] = len(json.dumps(shape["index_manifest"]))
    groupings, largest = _groupings(n, shards, c), _largest(n, shards, c)
    for stage in STAGES:
      if stage == "neighbours":
        _write_index_manifest(shape)
      counter = Counter(tmp).start()
      t0 = time.perf_counter()
      try:
        planned = build_lib.build(db, stages=(stage,), plan_only=True)
      finally:
        counter.stop()
      out["stages"][stage] = {
          "graph_bytes": planned["stages"][stage]["graph_bytes"],
          "launcher_requests": counter.requests,
          "launcher_bytes_read": counter.bytes, "launcher_paths": counter.paths,
          "plan_seconds": time.perf_counter() - t0,
          "grouping_keys": groupings[stage], "largest_element": largest[stage]}
  return out


CORPUS_FILES = (1_000, 10_000, 100_000)  # a directory of this many files
CORPUS_FILE_BYTES = 4096  # each
CORPUS_JSONL_BYTES = (10**9, 10**12, 10**13)  # one .jsonl of this many bytes
CORPUS_STAGES = ("tokenizer", "chunks")


def _sparse(path: str, size: int) -> None:
  with open(path, "wb") as f:
    f.truncate(size)


def simulate_corpus(kind: str, n: int, workdir: str | None = None) -> dict:
  """The tokenizer and chunks stages planned (`run_stage(plan_only=True)`) over a directory of
  n sparse files ("files") or one sparse .jsonl of n bytes ("jsonl"), the launcher's filesystem
  calls under the corpus counted."""
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    root = os.path.join(tmp, "corpus")
    os.makedirs(root)
    if kind == "files":
      for i in range(n):
        sub = os.path.join(root, f"d{i // 1000:05d}")
        if i % 1000 == 0:
          os.makedirs(sub)
        _sparse(os.path.join(sub, f"{i:09d}.txt"), CORPUS_FILE_BYTES)
      spec = root
    else:
      spec = os.path.join(root, "corpus.jsonl")
      _sparse(spec, n)
    db = os.path.join(tmp, "db")
    os.makedirs(db)
    cfg = {"corpus": spec, "max_docs": None, "tokenizer": None}
    out = {"kind": kind, "n": n, "stages": {}}
    for stage in CORPUS_STAGES:
      corpus_lib._part_files.cache_clear()  # pylint: disable=protected-access  (each stage lists)
      counter = Counter(root).start()
      t0 = time.perf_counter()
      try:
        graph = pipeline.run_stage(stage, db, cfg, plan_only=True)
      finally:
        counter.stop()
      out["stages"][stage] = {"graph_bytes": graph, "launcher_requests": counter.requests,
                              "launcher_bytes_read": counter.bytes,
                              "plan_seconds": time.perf_counter() - t0}
    source = corpus_lib.planned_corpus(spec)
    out["units"] = len(source.units)
    out["largest_unit_files"] = max(u[2] - u[1] for u in source.units)
    out["largest_unit_bytes"] = max(
        (u[4] - u[3]) if kind == "jsonl" else (u[2] - u[1]) * CORPUS_FILE_BYTES
        for u in source.units)
  return out


def main() -> None:
  rows = []
  for n in SIZES:
    r = simulate(n)
    rows.append(r)
    print(json.dumps({"num_chunks": n, **{s: {k: v for k, v in d.items()
                                               if k in ("graph_bytes", "launcher_requests",
                                                        "launcher_bytes_read")}
                                           for s, d in r["stages"].items()}}), flush=True)
  corpora = []
  for kind, sizes in (("files", CORPUS_FILES), ("jsonl", CORPUS_JSONL_BYTES)):
    for n in sizes:
      r = simulate_corpus(kind, n)
      corpora.append(r)
      print(json.dumps({k: v for k, v in r.items() if k != "stages"}), flush=True)
  out = {**run_provenance("python -m bench.plan_simulation"), "sizes": rows,
         "chunks_per_store_shard": CHUNKS_PER_STORE_SHARD, "plan_ranges": plan.PLAN_RANGES,
         "corpora": corpora, "corpus_file_bytes": CORPUS_FILE_BYTES,
         "plan_units": corpus_lib.PLAN_UNITS}
  path = os.path.join(os.path.dirname(__file__), "results", "plan_simulation.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
  print(f"wrote {path}")
  doc = os.path.join(os.path.dirname(__file__), "..", "docs", "plan_simulation.md")
  with open(doc, "w") as f:
    f.write(table(out))
  print(f"wrote {os.path.normpath(doc)}")


def table(res: dict) -> str:
  """docs/plan_simulation.md from the results file (every figure read from it)."""
  lines = ["# The build's planning at 6e4 .. 2.8e10 chunks (simulated layout)", "",
           f"Written by `{res['command']}` at commit {res['commit']} on {res['date']} from "
           "`bench/results/plan_simulation.json`; how it is measured: `bench/plan_simulation.py`.",
           "Requests and bytes are the launching process's filesystem calls (open, stat, "
           "listdir) during one stage's checks and planning; graph bytes are the serialized Beam "
           "pipeline; keys are the distinct keys of the stage's smallest grouping.", "",
           "| chunks | store shards | serving shards | nlist | train sample (per centroid) "
           "| stage | graph bytes | launcher requests | launcher bytes read | fewest keys "
           "(grouping) |", "|" + "---|" * 10]
  for r in res["sizes"]:
    for stage, d in r["stages"].items():
      name, keys = min(d["grouping_keys"].items(), key=lambda kv: kv[1])
      lines.append(
          f"| {r['num_chunks']:.1e} | {r['store_shards']:,} | {r['serving_shards']:,} "
          f"| {r['nlist']:,} | {r['train_sample']:,} ({r['sample_per_centroid']:.0f}) | {stage} "
          f"| {d['graph_bytes']:,} | {d['launcher_requests']} | {d['launcher_bytes_read']:,} "
          f"| {keys:,} ({name}) |")
  lines += ["", "Index training: one k-means over the sample in one element, or from "
            f"{res['sizes'][-1]['training']['threshold_vectors']:,} sample vectors on in "
            "parallel elements (coarse k-means on a sub-sample, the sample assigned per sample "
            "group, each coarse cell's share of nlist, one element for the quantizer and the PQ; "
            "`global_index.train_hierarchical`). Vectors are float32 rows (centroids included) an "
            "element holds; a coarse cell's rows depend on the data (its mean is given).", "",
            "| chunks | nlist | sample | sample / 39 | parallel | training elements (keys) "
            "| largest element | its vectors | its bytes |", "|" + "---|" * 9]
  for r in res["sizes"]:
    t = r["training"]
    keys = ", ".join(f"{k} {v:,}" for k, v in t["element_keys"].items())
    lines.append(
        f"| {r['num_chunks']:.1e} | {t['nlist']:,} | {t['sample']:,} | {t['sample_over_39']:,} "
        f"| {'yes' if t['parallel'] else 'no'} | {t['elements']:,} ({keys}) "
        f"| {t['largest_element']} | {t['largest_element_vectors']:,} "
        f"| {t['largest_element_bytes_float32']:,} |")
  big = res["sizes"][-1]
  lines += ["", f"Largest elements at {big['num_chunks']:.1e} chunks:", ""]
  for stage, d in big["stages"].items():
    lines.append(f"- {stage}: " + ", ".join(f"{k} {v:,}" for k, v in
                                            d["largest_element"].items()))
  if "corpora" in res:
    lines += ["", "The tokenizer and chunks stages over simulated corpora (sparse files, never read; "
              f"a directory's files {res['corpus_file_bytes']:,} bytes each; units at most about "
              f"{res['plan_units']:,}):", "",
              "| corpus | units | largest unit (files / bytes) | stage | graph bytes "
              "| launcher requests | launcher bytes read |", "|" + "---|" * 7]
    for r in res["corpora"]:
      what = (f"{r['n']:,} files" if r["kind"] == "files" else f".jsonl of {r['n']:.0e} bytes")
      for stage, d in r["stages"].items():
        lines.append(f"| {what} | {r['units']:,} | {r['largest_unit_files']:,} / "
                     f"{r['largest_unit_bytes']:,} | {stage} | {d['graph_bytes']:,} "
                     f"| {d['launcher_requests']:,} | {d['launcher_bytes_read']:,} |")
  lines += [""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
