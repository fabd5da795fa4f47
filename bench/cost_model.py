r"""The 28-billion-chunk build in 24 hours, costed from rates measured on the Beam pipeline.

  python -m bench.cost_model [--db=runs/default_db]

Reads the measured rates (every figure of the table names its file and key):
  bench/results/beam_build.json        the Beam build of the default database (60,473 chunks) on 2
                                       cores, 2 local worker processes: each stage's seconds, best
                                       whole build of `timed.wall_seconds.beam`
  bench/results/tfds_chunks.json       the Beam chunks stage reading a TFDS ArrayRecord corpus by
                                       random access (each shard reads only its records)
  bench/results/embed_aot.json         the embedder compiled ahead of time for a TPU v5e topology
  bench/results/build_10m.json         the index and neighbours stages over 10M vectors in Beam
                                       worker processes (bench/build_10m.py): step seconds,
                                       neighbours wall time, RAM and disk per vector
  bench/results/plan_simulation.json   the planner at 2.8e10 chunks: how many elements (keys) each
                                       stage's parallel step has, which caps its workers
  bench/results/tokenizer_cost.json    the tokenizer's two parts in CPU seconds: counting lines
                                       (grows with the corpus), training SentencePiece (does not)
and the default database's files (`--db`; the Beam build's files are the same bytes,
beam_build.json `whole_database`) for the bytes per chunk on disk. Writes the tables to stdout
and docs/cost_model_28b.md (Markdown, linked from WORKSPACE.md and docs/benchmarks.md) and
bench/results/cost_model_28b.json.

Schedule: the chunk, embed and encode stages stream shard by shard in the first `--stream_hours`
(the index is trained on a sample embedded first); the neighbours stage searches the finished
index in the remaining hours. Worker counts are what finishes each stage in its window at the
measured per-core (or per-chip) rate, with no allowance for stragglers.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

from retro_jax.build import pipeline
from retro_jax.evaluation.figures import provenance

_DB = flags.DEFINE_string("db", "runs/default_db", "A built default database (bytes per chunk).")
_CHUNKS = flags.DEFINE_float("chunks", 28e9, "Chunks in the database (the paper: 2T tokens / 64).")
_HOURS = flags.DEFINE_float("hours", 24.0, "The whole build's budget.")
_STREAM = flags.DEFINE_float("stream_hours", 12.0, "Hours for chunk + embed + encode.")
_RESULTS = flags.DEFINE_string("results", "bench/results", "Measured results.")
_OUT = flags.DEFINE_string("out", "bench/results/cost_model_28b.json", "Output JSON.")
_DOC = flags.DEFINE_string("doc", "docs/cost_model_28b.md", "Output Markdown page.")
_LATENCY = flags.DEFINE_float(
    "request_latency_ms", 50.0,
    "An assumed (not measured) latency of one small-object read from a bucket, for the steps "
    "whose elements read many small records (their time on the critical path).")


def _load(name):
  with open(os.path.join(_RESULTS.value, name)) as f:
    return json.load(f)


def tok_docs_per_chunk(manifest: dict) -> float:
  return manifest["num_docs"] / manifest["num_chunks"]


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv):
  del argv
  n = _CHUNKS.value
  beam = _load("beam_build.json")
  with open(os.path.join(_DB.value, "chunks", "manifest.json")) as f:
    db_manifest = json.load(f)
  tfds_run = _load("tfds_chunks.json")
  aot = _load("embed_aot.json")
  cores = beam["machine"]["cpus"]
  db_chunks = beam["neighbours"]["num_chunks"]
  walls = beam["timed"]["wall_seconds"]["beam"]
  best = walls.index(min(walls))  # the best whole Beam build: its stages
  stage_s = beam["timed"]["stage_seconds"]["beam"][best]
  stage_key = f"beam_build.json timed.stage_seconds.beam[{best}]"
  stream_s = _STREAM.value * 3600
  search_s = (_HOURS.value - _STREAM.value) * 3600
  rows = []

  def row(stage, rate, unit, source, window_s, per="core", total=True):
    work = n / rate  # unit-seconds
    rows.append({"stage": stage, "measured_rate": rate, "rate_unit": unit, "source": source,
                 f"{per}_hours": work / 3600, "window_hours": window_s / 3600,
                 "workers": math.ceil(work / window_s), "worker": per, "in_total": total})

  # Tokenise + chunk: the random-access (TFDS) path, the one that scales (each shard's worker
  # reads only its records); SentencePiece encodes on every core, so per core = / cores.
  tfds_s = tfds_run["best_seconds"]["tfds"]
  row("read (TFDS ArrayRecord) + tokenise + chunk", tfds_run["chunks"] / tfds_s / cores,
      "chunks/s per core",
      f"tfds_chunks.json: {tfds_run['chunks']:,} chunks / best_seconds.tfds ({tfds_s:.2f} s) / "
      f"{cores} cores (loaded machine; the whole-read path, {stage_key}.chunks = "
      f"{stage_s['chunks']} s, is {tfds_run['tfds_over_whole_read']:.1f}x faster in one process "
      "but reads the whole corpus in every worker)", stream_s)
  # The tokenizer: every document's training lines counted in parallel (ranges of
  # TOKENIZER_RANGE_DOCS documents), then SentencePiece on a fixed number of lines, one element.
  tok = _load("tokenizer_cost.json")
  docs = n * tok_docs_per_chunk(db_manifest)
  ranges = math.ceil(docs / pipeline.TOKENIZER_RANGE_DOCS)
  row("tokenizer: count and pick training lines (ranges of documents)",
      tok["count"]["documents_per_cpu_second"] / tok_docs_per_chunk(db_manifest),
      "chunks/s per core",
      f"tokenizer_cost.json count.documents_per_cpu_second "
      f"({tok['count']['documents_per_cpu_second']:,.0f}, CPU seconds) x "
      f"{tok_docs_per_chunk(db_manifest):.3f} documents per chunk ({_DB.value} chunk store)",
      stream_s)
  rows[-1]["max_workers"] = ranges
  rows.append({"stage": f"tokenizer: train SentencePiece on {tok['train']['lines']:,} lines (one "
                        "element, the same at any size)",
               "measured_rate": tok["train"]["cpu_seconds"], "rate_unit": "CPU s",
               "source": f"tokenizer_cost.json train.cpu_seconds ({tok['train']['threads']} "
                         f"threads, vocabulary {tok['train']['vocab_size']:,})",
               "core_hours": tok["train"]["cpu_seconds"] / 3600, "window_hours": None,
               "workers": 1, "worker": "core", "in_total": True, "max_workers": 1})
  row("embed (CPU, MiniLM bf16, Beam embeddings stage)",
      db_chunks / stage_s["embeddings"] / cores, "chunks/s per core",
      f"{db_chunks:,} chunks / {stage_key}.embeddings ({stage_s['embeddings']} s) / {cores} "
      f"worker processes on {cores} cores", stream_s, total=False)
  mfu = aot["assumed_mfu"]
  row(f"embed (TPU v5e, assumed MFU {mfu})", aot["chunks_per_s_per_chip"], "chunks/s per chip",
      f"embed_aot.json chunks_per_s_per_chip: 197 TFLOP/s x {mfu} / xla_flops_per_chunk "
      f"({aot['xla_flops_per_chunk']:.3g}) from the AOT compile for {aot['topology']}", stream_s,
      per="chip")
  b10 = _load("build_10m.json")
  sim = next(r for r in _load("plan_simulation.json")["sizes"] if r["num_chunks"] == n)
  n10, bs = b10["num_vectors"], b10["index"]["build_seconds"]
  c10 = b10["index"]["config"]
  keys = {s: d["grouping_keys"] for s, d in sim["stages"].items()}
  # Index training: a k-means costs ~ points x centroids distances per iteration. The 10M
  # build's one-element training (a two-level k-means: sample x 2 sqrt(nlist)) gives the rate;
  # at this size the plan trains in parallel (plan_simulation.json `training`): one coarse
  # k-means on a sub-sample, every sample row assigned to the coarse cells (by encode group),
  # each cell's share of nlist trained on its rows (by cell).
  rate10 = c10["train_sample"] * 2 * math.sqrt(c10["nlist"]) / bs["train"]
  tr = sim["training"]
  if tr["parallel"]:
    cells = tr["element_keys"]["cell"]
    work = {"coarse": tr["element_vectors"]["coarse"] * cells,
            "assign": tr["sample"] * cells,
            "cells": tr["sample"] * tr["nlist"] / cells}
    what = (f"coarse k-means {tr['element_vectors']['coarse']:,} x {cells:,} cells, one element; "
            f"assign {tr['sample']:,} x {cells:,} over {tr['element_keys']['assign']:,} elements; "
            f"cells {tr['sample']:,} x {tr['nlist'] / cells:,.0f} over {cells:,} elements")
    max_workers = max(tr["element_keys"]["assign"], cells)
  else:
    work = {"one element": tr["sample"] * 2 * math.sqrt(tr["nlist"])}
    what, max_workers = f"one element: {tr['sample']:,} x 2 sqrt({tr['nlist']:,})", 1
  rows.append({"stage": "index: train on the sample (point x centroid distances)",
               "measured_rate": rate10, "rate_unit": "distances/s per core",
               "source": f"build_10m.json index.build_seconds.train ({bs['train']:.1f} s: "
                         f"{c10['train_sample']:,} vectors x 2 sqrt(nlist {c10['nlist']:,})); "
                         f"at this size ({what}, plan_simulation.json training); its one-element "
                         f"step: {next(iter(work.values())) / rate10:,.0f} s",
               "core_hours": sum(work.values()) / rate10 / 3600,
               "window_hours": stream_s / 3600,
               "workers": math.ceil(sum(work.values()) / rate10 / stream_s), "worker": "core",
               "in_total": True, "max_workers": max_workers})

  row("encode into the global index (assign + PQ + int8 copy)", n10 / bs["encode"],
      "vectors/s per core",
      f"build_10m.json: {n10:,} vectors / index.build_seconds.encode ({bs['encode']:,.0f} s, "
      "summed over the encode elements, one thread each)", stream_s)
  rows[-1]["max_workers"] = keys["index"]["Distribute"]  # encode groups
  row("merge serving shards (parts read whole, codes packed, int8 copy streamed)",
      n10 / max(bs["merge"], 1e-9), "vectors/s per core",
      f"build_10m.json: {n10:,} vectors / index.build_seconds.merge ({bs['merge']:,.1f} s)",
      stream_s)
  rows[-1]["max_workers"] = sim["serving_shards"]
  nb = b10["stages"]["neighbours"]
  nb_rate = n10 / nb["wall_seconds"] / b10["workers"]
  grow = math.sqrt(n / n10)  # nlist = 2 sqrt(N): partitions, so codes scanned, grow as sqrt(N)
  row("neighbours (k=2, routed Beam job)", nb_rate / grow, "queries/s per core",
      f"build_10m.json: {n10:,} queries / stages.neighbours.wall_seconds "
      f"({nb['wall_seconds']:,.0f} s) / {b10['workers']} worker processes = {nb_rate:,.0f} at "
      f"{n10:,} vectors, / sqrt(N / {n10:,}) = / {grow:.1f} (partitions of N / (2 sqrt N) "
      "vectors, nprobe fixed: the codes scanned per query grow as sqrt N)", search_s)
  rows[-1]["max_workers"] = keys["neighbours"]["BySearchKey"]  # (serving shard, search group)
  for r in rows:
    if r.get("max_workers") is not None and r["workers"] > r["max_workers"]:
      r["note"] = f"needs {r['workers']:,} workers, the plan has {r['max_workers']:,} elements"
  serving = {"serving_shards": sim["serving_shards"],
             "vectors_per_serving_shard": -(-int(n) // sim["serving_shards"]),
             "ram_bytes_per_vector": b10["index"]["ram_bytes_per_vector"] + 8,
             "disk_bytes_per_vector": b10["index"]["disk_bytes_per_vector"]}
  serving["ram_gb_per_serving_shard"] = (serving["vectors_per_serving_shard"]
                                         * serving["ram_bytes_per_vector"] / 1e9)
  serving["disk_gb_per_serving_shard"] = (serving["vectors_per_serving_shard"]
                                          * serving["disk_bytes_per_vector"] / 1e9)
  serving["shards_per_256gb_host"] = int(256 * 0.8 // serving["ram_gb_per_serving_shard"])
  serving["hosts"] = math.ceil(sim["serving_shards"] / serving["shards_per_256gb_host"])
  serving["disk_tb_per_host"] = (serving["shards_per_256gb_host"]
                                 * serving["disk_gb_per_serving_shard"] / 1e3)

  # The steps whose elements read many small records: reads per element (the plan simulation's
  # largest element) and how many run at once, timed at the assumed latency.
  big = sim["stages"]
  reads = [
      ("index finish: serving-shard, encode-group and merge-time records (one element)",
       big["index"]["largest_element"]["finish_reads_records"],
       big["index"]["largest_element"].get("finish_reads_in_flight", 1), 1),
      ("embeddings / neighbours outputs record: progress records of a group of shards",
       big["neighbours"]["largest_element"]["outputs_record_reads"], 1,
       big["neighbours"]["grouping_keys"].get("SpreadOutputGroups", 1)),
  ]
  record_reads = [{"step": name, "reads_per_element": r, "in_flight": f, "elements": e,
                   "element_seconds": r / f * _LATENCY.value / 1e3}
                  for name, r, f, e in reads]

  db = _DB.value
  sizes = {
      "corpus as TFDS ArrayRecord (input)": (
          tfds_run["tfds_dataset"]["bytes"] / tfds_run["chunks"],
          "tfds_chunks.json tfds_dataset.bytes / chunks"),
      "chunk store (tokens int32 + doc tables)": (
          _dir_bytes(os.path.join(db, "chunks")) / db_chunks, f"{db}/chunks/ bytes / chunks"),
      "embeddings float32 (build intermediate)": (
          _dir_bytes(os.path.join(db, "embeddings")) / db_chunks,
          f"{db}/embeddings/ bytes / chunks"),
      "index: PQ codes + ids (RAM when served)": (
          b10["index"]["ram_bytes_per_vector"],
          f"build_10m.json index.ram_bytes_per_vector ({n10:,})"),
      "index on disk (codes, ids, int8 rerank copy)": (
          b10["index"]["disk_bytes_per_vector"],
          f"build_10m.json index.disk_bytes_per_vector ({n10:,})"),
      "training neighbours (k=2)": (
          _dir_bytes(os.path.join(db, "neighbours")) / db_chunks,
          f"{db}/neighbours/ bytes / chunks"),
  }
  storage = {k: v for k, (v, _) in sizes.items()}
  storage_tb = {k: v * n / 1e12 for k, v in storage.items()}
  ram_vec = serving["ram_bytes_per_vector"]
  total_core_h = sum(r["core_hours"] for r in rows if r["worker"] == "core" and r["in_total"])
  cpu_embed = next(r for r in rows if r["stage"].startswith("embed (CPU"))
  out = {"chunks": n, "hours": _HOURS.value, "stream_hours": _STREAM.value, "stages": rows,
         "bytes_per_chunk": storage, "bytes_sources": {k: s for k, (_, s) in sizes.items()},
         "storage_tb": storage_tb,
         "disk_tb_kept": sum(v for k, v in storage_tb.items() if "intermediate" not in k),
         "serving_ram_tb": ram_vec * n / 1e12,
         "serving_hosts_256gb": serving["hosts"], "serving_layout": serving,
         "record_reads": record_reads, "request_latency_ms_assumed": _LATENCY.value,
         "total": {"cpu_core_hours_with_tpu_embed": total_core_h,
                   "tpu_chip_hours": next(r["chip_hours"] for r in rows if r["worker"] == "chip"),
                   "cpu_core_hours_with_cpu_embed": total_core_h + cpu_embed["core_hours"]},
         "machine_notes": {"beam_build.json": beam["machine"]["note"],
                           "tfds_chunks.json": tfds_run["machine"],
                           "build_10m.json": b10["machine"]}}
  out["provenance"] = provenance("python -m bench.cost_model " + " ".join(sys.argv[1:]))
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  lines = []
  emit = lines.append  # the page, line by line
  p = out["provenance"]
  emit(f"# The database at 28 billion chunks: what the build costs\n\nWritten by `{p['command']}` "
        f"at commit {p['commit']} on {p['date']} from `bench/results/cost_model_28b.json` (how: "
        "`bench/cost_model.py`); every rate names the results file and key it comes from. The "
        f"schedule: chunk, embed and encode stream in the first {_STREAM.value:.0f} h, the "
        f"neighbours search the finished index in the remaining {_HOURS.value - _STREAM.value:.0f} "
        "h; a stage's workers are capped by the elements its plan has (plan_simulation.json).\n")
  emit("| stage | measured rate | from | worker-hours | window | workers |")
  emit("|---|---|---|---|---|---|")
  for r in rows:
    window = f"{r['window_hours']:.0f} h" if r["window_hours"] else "-"
    cap = f" ({r['note']})" if r.get("note") else ""
    emit(f"| {r['stage']} | {r['measured_rate']:,.1f} {r['rate_unit']} | {r['source']} | "
          f"{r[r['worker'] + '_hours']:,.1f} {r['worker']}-h | {window} | "
          f"{r['workers']:,} {r['worker']}s{cap} |")
  t = out["total"]
  emit(f"\nTotal: {t['cpu_core_hours_with_tpu_embed']:,.0f} core-h + {t['tpu_chip_hours']:,.0f} "
        f"chip-h with the TPU embedder; {t['cpu_core_hours_with_cpu_embed']:,.0f} core-h all on "
        "CPUs.\n")
  emit("Steps whose elements read many small records (plan_simulation.json, largest element at "
       f"this size), timed at an assumed {_LATENCY.value:.0f} ms per read (`--request_latency_ms`, "
       "not measured):\n")
  emit("| step | reads per element | in flight | elements | one element |")
  emit("|---|---|---|---|---|")
  for r in record_reads:
    emit(f"| {r['step']} | {r['reads_per_element']:,} | {r['in_flight']} | {r['elements']:,} | "
         f"{r['element_seconds']:,.0f} s |")
  emit("")
  emit("| data | bytes per chunk | from | at 28B chunks |")
  emit("|---|---|---|---|")
  for k, (v, src) in sizes.items():
    emit(f"| {k} | {v:,.0f} | {src} | {storage_tb[k]:,.1f} TB |")
  sv = serving
  emit(f"\nDisk kept (all but the float32 embeddings): {out['disk_tb_kept']:.1f} TB. Serving: "
        f"{sv['serving_shards']:,} serving shards of {sv['vectors_per_serving_shard']:,} vectors, "
        f"each {sv['ram_gb_per_serving_shard']:.2f} GB in RAM (codes, faiss ids and the sorted ids "
        f"the rerank looks up: {sv['ram_bytes_per_vector']:.1f} B per vector) and "
        f"{sv['disk_gb_per_serving_shard']:.1f} GB on disk; a 256 GB host at 80% use holds "
        f"{sv['shards_per_256gb_host']} of them and {sv['disk_tb_per_host']:.2f} TB of its files: "
        f"{sv['hosts']} hosts, RAM {out['serving_ram_tb']:.2f} TB in all.")
  with open(_DOC.value, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
