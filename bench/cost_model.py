r"""The 28-billion-chunk build in 24 hours, costed from rates measured on the Beam pipeline.

  python -m bench.cost_model [--db=runs/default_db]

Reads the measured rates (every figure of the table names its file and key):
  bench/results/beam_build.json        the Beam build of the default database (60,473 chunks) on 2
                                       cores, 2 local worker processes: each stage's seconds, best
                                       whole build of `timed.wall_seconds.beam`
  bench/results/tfds_chunks.json       the Beam chunks stage reading a TFDS ArrayRecord corpus by
                                       random access (each shard reads only its records)
  bench/results/embed_aot.json         the embedder compiled ahead of time for a TPU v5e topology
  bench/results/global_index_scaling.json  the global index (what the Beam index and neighbours
                                       stages build and search) up to 10M vectors: encode
                                       vectors/s, QPS, RAM per vector
  bench/results/global_index_default.json  the global index on the default store
and the default database's files (`--db`; the Beam build's files are the same bytes,
beam_build.json `whole_database`) for the bytes per chunk on disk. Writes the tables to stdout
(Markdown, pasted into WORKSPACE.md and docs/benchmarks.md) and bench/results/cost_model_28b.json.

Schedule: the chunk, embed and encode stages stream shard by shard in the first `--stream_hours`
(the index is trained on a sample embedded first); the neighbours stage searches the finished
index in the remaining hours. Worker counts are what finishes each stage in its window at the
measured per-core (or per-chip) rate, with no allowance for stragglers.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

_DB = flags.DEFINE_string("db", "runs/default_db", "A built default database (bytes per chunk).")
_CHUNKS = flags.DEFINE_float("chunks", 28e9, "Chunks in the database (the paper: 2T tokens / 64).")
_HOURS = flags.DEFINE_float("hours", 24.0, "The whole build's budget.")
_STREAM = flags.DEFINE_float("stream_hours", 12.0, "Hours for chunk + embed + encode.")
_RESULTS = flags.DEFINE_string("results", "bench/results", "Measured results.")
_OUT = flags.DEFINE_string("out", "bench/results/cost_model_28b.json", "Output JSON.")


def _load(name):
  with open(os.path.join(_RESULTS.value, name)) as f:
    return json.load(f)


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv):
  del argv
  n = _CHUNKS.value
  beam = _load("beam_build.json")
  tfds_run = _load("tfds_chunks.json")
  aot = _load("embed_aot.json")
  scaling = _load("global_index_scaling.json")
  default = _load("global_index_default.json")
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
  row("embed (CPU, MiniLM bf16, Beam embeddings stage)",
      db_chunks / stage_s["embeddings"] / cores, "chunks/s per core",
      f"{db_chunks:,} chunks / {stage_key}.embeddings ({stage_s['embeddings']} s) / {cores} "
      f"worker processes on {cores} cores", stream_s, total=False)
  mfu = aot["assumed_mfu"]
  row(f"embed (TPU v5e, assumed MFU {mfu})", aot["chunks_per_s_per_chip"], "chunks/s per chip",
      f"embed_aot.json chunks_per_s_per_chip: 197 TFLOP/s x {mfu} / xla_flops_per_chunk "
      f"({aot['xla_flops_per_chunk']:.3g}) from the AOT compile for {aot['topology']}", stream_s,
      per="chip")
  big, first = scaling["sizes"][-1], scaling["sizes"][0]
  threads = scaling["threads"]
  row("encode into the global index (assign + PQ + int8 copy)",
      big["encode_vectors_per_second"] / threads, "vectors/s per core",
      f"global_index_scaling.json sizes[-1] ({big['num_vectors']:,} vectors, {big['factory']}) "
      f"encode_vectors_per_second / {threads} threads (the default store: "
      f"{default['global_index']['encode_vectors_per_second']:,.0f} on 1 thread, "
      "global_index_default.json)", stream_s)
  nb_here = db_chunks / stage_s["neighbours"] / cores
  drop = first["best_at_recall_0.9"]["qps"] / big["best_at_recall_0.9"]["qps"]
  row("neighbours (k=2, Beam neighbours stage)", nb_here / drop, "queries/s per core",
      f"{db_chunks:,} queries / {stage_key}.neighbours ({stage_s['neighbours']} s) / {cores} "
      f"cores = {nb_here:,.0f} at {db_chunks:,} vectors, / {drop:.2f} (global_index_scaling.json "
      f"best_at_recall_0.9.qps, {first['num_vectors']:,} -> {big['num_vectors']:,} vectors, one "
      "run), held flat beyond", search_s)
  # Pessimistic: partitions keep growing as sqrt(N) at a fixed nprobe, so the codes scanned per
  # query grow as sqrt(N / largest measured).
  grow = math.sqrt(n / big["num_vectors"])
  row("neighbours, if per-query work grows as sqrt(N)", nb_here / drop / grow,
      "queries/s per core",
      f"the row above / sqrt(28e9 / {big['num_vectors']:,}) = / {grow:.0f}", search_s,
      total=False)

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
          big["ram_bytes_per_vector"],
          f"global_index_scaling.json sizes[-1].ram_bytes_per_vector ({big['num_vectors']:,})"),
      "index: int8 rerank copy (disk)": (
          big["rerank_disk_bytes_per_vector"],
          "global_index_scaling.json sizes[-1].rerank_disk_bytes_per_vector"),
      "training neighbours (k=2)": (
          _dir_bytes(os.path.join(db, "neighbours")) / db_chunks,
          f"{db}/neighbours/ bytes / chunks"),
  }
  storage = {k: v for k, (v, _) in sizes.items()}
  storage_tb = {k: v * n / 1e12 for k, v in storage.items()}
  ram_vec = big["ram_bytes_per_vector"]
  total_core_h = sum(r["core_hours"] for r in rows if r["worker"] == "core" and r["in_total"])
  cpu_embed = next(r for r in rows if r["stage"].startswith("embed (CPU"))
  out = {"chunks": n, "hours": _HOURS.value, "stream_hours": _STREAM.value, "stages": rows,
         "bytes_per_chunk": storage, "bytes_sources": {k: s for k, (_, s) in sizes.items()},
         "storage_tb": storage_tb,
         "disk_tb_kept": sum(v for k, v in storage_tb.items() if "intermediate" not in k),
         "serving_ram_tb": ram_vec * n / 1e12,
         "serving_hosts_256gb": math.ceil(ram_vec * n / (256e9 * 0.8)),
         "total": {"cpu_core_hours_with_tpu_embed": total_core_h,
                   "tpu_chip_hours": next(r["chip_hours"] for r in rows if r["worker"] == "chip"),
                   "cpu_core_hours_with_cpu_embed": total_core_h + cpu_embed["core_hours"]},
         "machine_notes": {"beam_build.json": beam["machine"]["note"],
                           "tfds_chunks.json": tfds_run["machine"],
                           "global_index_scaling.json": scaling["machine"]}}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print("| stage | measured rate | from | worker-hours | window | workers |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['stage']} | {r['measured_rate']:,.0f} {r['rate_unit']} | {r['source']} | "
          f"{r[r['worker'] + '_hours']:,.0f} {r['worker']}-h | {r['window_hours']:.0f} h | "
          f"{r['workers']:,} {r['worker']}s |")
  t = out["total"]
  print(f"\nTotal: {t['cpu_core_hours_with_tpu_embed']:,.0f} core-h + {t['tpu_chip_hours']:,.0f} "
        f"chip-h with the TPU embedder; {t['cpu_core_hours_with_cpu_embed']:,.0f} core-h all on "
        "CPUs.\n")
  print("| data | bytes per chunk | from | at 28B chunks |")
  print("|---|---|---|---|")
  for k, (v, src) in sizes.items():
    print(f"| {k} | {v:,.0f} | {src} | {storage_tb[k]:,.1f} TB |")
  print(f"\nDisk kept (all but the float32 embeddings): {out['disk_tb_kept']:.1f} TB. Serving RAM: "
        f"{out['serving_ram_tb']:.2f} TB = {out['serving_hosts_256gb']} hosts of 256 GB at 80% use.")


if __name__ == "__main__":
  app.run(main)
