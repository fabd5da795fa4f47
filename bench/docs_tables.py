"""The README's and docs' generated tables, written again from the results files (no measurement).

    python -m bench.docs_tables           # rewrite every generated block and page (= make docs)
    python -m bench.docs_tables --check   # change nothing; exit 1 naming what would change

A generated block is the text between the lines

    <!-- generated: NAME (python -m bench.docs_tables) -->
    <!-- end generated: NAME -->

in README.md or docs/*.md, written by BLOCKS[NAME] from the results files it names. A generated
page is a whole docs/ page written by its benchmark's page function (PAGES), run here on the
committed results file in a process of its own (each benchmark defines its own absl flags).
Every other table in README.md and docs/*.md names its results files in a comment above it,
`<!-- sources: bench/results/a.json bench/results/b.json -->`, and tests/test_results_sources.py
checks every number in it against them.
"""
import argparse
import functools
import glob
import json
import os
import re
import subprocess
import sys

from retro_jax.evaluation import figures, scaling

RESULTS = "bench/results"
BEGIN = re.compile(r"^<!-- generated: (\S+) \(python -m bench\.docs_tables\) -->$")
END = "<!-- end generated: {} -->"

# docs page -> (module, function of the results dict that returns the page, results file).
PAGES = {
    "docs/plan_simulation.md": ("bench.plan_simulation", "table", "plan_simulation.json"),
    "docs/build_10m.md": ("bench.build_10m", "page", "build_10m.json"),
    "docs/global_searchers.md": ("bench.global_searchers", "page", "global_searchers.json"),
    "docs/open_reads.md": ("bench.open_reads", "page", "open_reads.json"),
}

# docs pages that a benchmark writes in the same run as its results (it needs a database, so
# they are not written again here): checked against that results file.
BENCH_PAGES = {"docs/cost_model_28b.md": "bench/results/cost_model_28b.json"}


@functools.cache
def load(name: str):
  """bench/results/NAME as parsed JSON (a list of records for .jsonl)."""
  with open(os.path.join(RESULTS, name)) as f:
    if name.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    return json.load(f)


def f4(x: float) -> str:
  return f"{x:.4f}"


def d4(x: float) -> str:
  """A difference, signed."""
  return f"{x:+.4f}"


def ci(d: dict, digits: int = 4) -> str:
  """A difference with its 95% interval: `-0.2346 [-0.4138, -0.1017]`."""
  lo, hi = d["ci95"]
  return f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def bold_ci(d: dict) -> str:
  """ci(d), in bold where the interval excludes zero."""
  return f"**{ci(d)}**" if d["excludes_zero"] else ci(d)


def ratio_ci(d: dict) -> str:
  lo, hi = d["ci95"]
  return f"{d['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"


def readme_results() -> str:
  """README.md's Results table: the headline figure of each results file, with its command."""
  fresh = load("make_demo_fresh.json")
  demo, diffs = fresh["demo"]["table"], fresh["demo"]["differences"]
  ob = diffs["RETRO[ON] - baseline"]
  fig = load("figures_dup.json")
  s0 = fig["per_seed"]["0"]
  dd, dg = s0["differences"], s0["differences_given"]
  omb = fig["on_minus_baseline"]
  sseeds = [fig["per_seed"][s]["differences"]["on-shuffled_source"]["all"]["diff"]
            for s in fig["per_seed"]]
  rows_db = fig["db_fraction"]["0"]["rows"]
  fr = sorted(rows_db, key=float)
  frac = {"0.125": "1/8", "0.25": "1/4", "0.5": "1/2", "1.0": "1"}
  rf, rf3 = fig["retrofit"], fig["retrofit_more_steps"]["300"]
  dflt = load("figures_default.json")
  d0 = dflt["per_seed"]["0"]
  drows = dflt["db_fraction"]["0"]["rows"]
  dfr = sorted(drows, key=float)
  sc = load("scaling_tiny.json")["sizes"]
  on_sh = [sc[s]["differences"]["on-shuffled"]["all"]["diff"] for s in sc]
  small = sc["d128-L2"]
  fact = load("fact_recall.json")["runs"]
  ts = load("train_step.json")
  g32, g16 = load("gpu/reference_fp32.json"), load("gpu/reference_bf16.json")
  aot = load("aot_compile.jsonl")

  def aot_run(size, topology, slices=1, accum=1):
    return next(r for r in aot if r["size"] == size and r["topology"] == topology
                and r.get("num_slices", 1) == slices and r.get("grad_accum_steps", 1) == accum)

  a172, a425, a15, a75 = (aot_run("172m", "v5e:4x4"), aot_run("425m", "v5e:4x4"),
                          aot_run("1.5b", "v5p:2x2x4"), aot_run("7.5b", "v5p:4x4x4"))
  a15x2 = aot_run("1.5b", "v5p:2x2x4", 2)
  a75x8, a75x4 = aot_run("7.5b", "v5p:4x4x4", 2, 8), aot_run("7.5b", "v5p:4x4x4", 2, 4)
  emb = load("embed_throughput.json")["results"]["bfloat16_bs16_bucketed"]
  ann = load("ann_recall.json")
  best = ann["summary"]["at_recall10_0.95"]
  gid = load("global_index_default.json")
  g48 = gid["results"]["global nprobe=48 (end to end)"]
  today = gid["results"]["today per-shard faiss (end to end)"]
  gis = load("global_index_scaling.json")
  gen = next(r for r in load("generate_speed.json")["rows"] if r["new_tokens"] == 128)
  svc = load("service_latency.json")["runs"][0]
  one = svc["single_one_in_flight"]["latency_ms"]

  def fits(r):
    return "fits" if r["per_chip_gib"] <= r["hbm_gib"] else f"does not fit {r['hbm_gib']} GiB"

  rows = [
      ("tiny RETRO vs baseline where text recurs (the duplication database: kernel docs 6.1 + "
       f"6.12; {fig['steps']} steps each; windows {fig['seq_len']}, stride {fig['stride']}; 95% "
       f"intervals over {ob['all']['docs']} held-out documents; fresh clone, "
       f"{fresh['wall_seconds'] / 60:.1f} min)",
       f"baseline {f4(demo['baseline']['bpb'])}, RETRO[OFF] {f4(demo['RETRO[OFF]']['bpb'])}, "
       f"RETRO[SHUFFLED] {f4(demo['RETRO[SHUFFLED]']['bpb'])}, RETRO[ON] "
       f"**{f4(demo['RETRO[ON]']['bpb'])}**: on - baseline **{ci(ob['all'])}**; where the "
       f"neighbours overlap the text (r >= 50%, {ob['r>=50%']['chunks']:,} of "
       f"{ob['all']['chunks']:,} chunks) {d4(ob['r>=50%']['diff'])}; where they do not "
       f"(alpha = 12.5%, {ob['r<=12.5%']['chunks']} chunks) RETRO is "
       + ("**worse than its baseline, " if ob["r<=12.5%"]["diff"] > 0 else "**better than its "
          "baseline, ") + f"{ci(ob['r<=12.5%'])}** ([why](docs/results.md#retro-where-text-"
       "recurs-the-duplication-database-make-demo-make-figures))",
       "`make demo`"),
      (f"the same, {len(fig['per_seed'])} seeds, with the controls (the paper's figures at this "
       "scale; [tables](docs/results.md#the-papers-figures-at-this-scale-make-figures))",
       f"on - baseline **{d4(omb['mean'])} +- {omb['sd']:.4f}** (mean +- sd; "
       + ", ".join(d4(x) for x in omb["per_seed"])
       + (", every interval excluding zero" if omb["every_seed_excludes_zero"] else "")
       + f"); on - same-source shuffled {d4(max(sseeds))} to {d4(min(sseeds))}, on - "
       f"same-document {d4(dd['on-same_document']['all']['diff'])} (seed 0)",
       "`make figures`"),
      ("gain by overlap (seed 0)",
       f"on - shuffled **{d4(dd['on-shuffled']['r>=50%']['diff'])}** where r(C) >= 50% against "
       f"{d4(dd['on-shuffled']['r<=12.5%']['diff'])} where r(C) <= 12.5% (binned by the overlap "
       f"with the neighbours given: {d4(dg['on-shuffled']['r>=50%']['diff'])} vs "
       f"{d4(dg['on-shuffled']['r<=12.5%']['diff'])}); at alpha = 12.5% RETRO "
       f"{f4(s0['results']['on']['bins']['r<=12.5%']['bpb'])} vs baseline "
       f"{f4(s0['results']['baseline']['bins']['r<=12.5%']['bpb'])}",
       "`make figures`"),
      ("gain by database size (seed 0; [plot](docs/figures_dup_bpb_vs_db_fraction.png))",
       "RETRO on " + ", ".join(f4(rows_db[f]["on"]) for f in fr) + " at "
       + ", ".join(frac.get(f, f) for f in fr) + " of the database; shuffled "
       + ", ".join(f4(rows_db[f]["shuffled"]) for f in fr)
       + f"; baseline {f4(rows_db[fr[-1]]['baseline'])}",
       "`make figures`"),
      (f"retrofit of the frozen {fig['steps']}-step baseline (CCA and encoder only)",
       f"after {rf['steps']} steps R = (baseline - retrofit on) / (baseline - from-scratch on) = "
       f"**{ratio_ci(rf['recovery'])}**, and against the baseline trained {rf['steps']} steps "
       f"longer {ci(rf['on-baseline_longer']['all'])}; after {rf3['steps']} steps R = "
       f"{ratio_ci(rf3['recovery'])}, against the baseline trained {rf3['steps']} steps longer "
       f"{ci(rf3['on-baseline_longer']['all'])}",
       "`make figures`"),
      ("the same figures on the default database (little duplication; "
       f"{len(dflt['per_seed'])} seed)",
       "RETRO on " + ", ".join(f4(drows[f]["on"]) for f in dfr) + " at "
       + ", ".join(frac.get(f, f) for f in dfr) + " of the database, baseline "
       f"{f4(drows[dfr[-1]]['baseline'])}; on - shuffled {ci(d0['differences']['on-shuffled']['all'])}"
       f", on - same-source shuffled {ci(d0['differences']['on-shuffled_source']['all'])}",
       "`make figures`"),
      (f"scaling sweep, {len(sc)} sizes x {len(small['retro_on'])} database sizes, with the "
       "controls (95% intervals)",
       f"on - shuffled {d4(max(on_sh))} to {d4(min(on_sh))} at the {len(sc)} sizes; at d128-L2 "
       f"on (whole database) {f4(small['retro_on']['1.0'])} vs baseline "
       f"{f4(small['baseline'])}, **{ci(small['differences']['on-baseline']['1.0']['all'])}** "
       "([table](docs/results.md#scaling-curves-make-scaling))",
       "`make scaling`"),
      ("a fact only the database holds (copy-curriculum tiny RETRO)",
       f"{fact['retrieval on']['match_fraction']:.0%} of the next chunk reproduced with retrieval "
       f"on, {fact['retrieval off']['match_fraction']:.0%} off, "
       f"{fact['retrieval on, document removed']['match_fraction']:.0%} after the document's "
       "removal",
       "`make example`"),
      (f"training step, reference config (d{ts['config']['d_model']}, {ts['config']['layers']} "
       f"layers, seq {ts['config']['seq_len']}, batch {ts['config']['batch']}, fp32)",
       f"RETRO **{ts['retro']['tokens_per_s']:,.0f} tokens/s** ({ts['retro']['mfu']:.1%} MFU), "
       f"baseline decoder {ts['baseline']['tokens_per_s']:,.0f}",
       "`make bench`"),
      ("the same step on an NVIDIA H100",
       f"RETRO {g32['retro']['tokens_per_s']:,.0f} tokens/s (fp32), "
       f"{g16['retro']['tokens_per_s']:,.0f} (bf16)",
       "`bash bench/gpu_check.sh`"),
      ("ahead-of-time TPU compile, per-chip memory",
       f"172M on {a172['topology']} {a172['per_chip_gib']:.1f} GiB; 425M "
       f"{a425['per_chip_gib']:.1f} GiB; 1.5B on {a15['topology']} {a15['per_chip_gib']:.1f} GiB "
       f"(2 x {a15x2['topology']}, hybrid mesh, batch {a15x2['global_batch']}: "
       f"{a15x2['per_chip_gib']:.1f} GiB, {a15x2['xla_tflops_per_step']:,.0f} XLA TFLOP/step); "
       f"7.5B on {a75['topology']} {a75['per_chip_gib']:.1f} GiB (2 x {a75x8['topology']} at "
       f"batch {a75x8['global_batch']:,}: by {a75x8['grad_accum_steps']} micro-batches "
       f"**{a75x8['per_chip_gib']:.1f} GiB, {fits(a75x8)}**, "
       f"{a75x8['xla_tflops_per_step']:,.0f} XLA TFLOP/step; by {a75x4['grad_accum_steps']}, "
       f"{a75x4['per_chip_gib']:.1f} GiB, {fits(a75x4)})",
       "`make aot`"),
      ("MiniLM embedding throughput (bf16)",
       f"{emb['chunks_per_s']:.1f} chunks/s, min cosine to fp32 {emb['min_cosine_to_fp32']:.5f}",
       "`make bench-embed`"),
      (f"ANN search, {ann['database_size']:,} chunks, loaded machine",
       f"faiss fast-scan {best['faiss']['qps']:,.0f} QPS at recall@10 "
       f"{best['faiss']['recall_at_10']:.3f}; ScaNN {best['scann']['qps']:,.0f} at "
       f"{best['scann']['recall_at_10']:.3f}",
       "`make bench-ann`"),
      ("the global index vs the per-shard faiss index, default store, end to end "
       f"(`Retriever.search` with the same-document exclusion, {gid['num_queries']:,} stored "
       f"chunks, {gid['threads']} threads, loaded machine)",
       f"global **{g48['qps']:,.0f} QPS at recall@10 {g48['recall@10']:.3f}**, "
       f"{g48['qps_vs_today']:.2f}x the per-shard index's {today['qps']:,.0f} (at "
       f"{today['recall@10']:.3f}); end to end {g48['e2e_vs_raw_qps']:.2f}x of its raw index "
       f"call; {gid['global_index']['ram_bytes_per_vector']:.1f} B per vector in RAM",
       "`make bench-index`"),
      ("the global index from 200k to 10M vectors, real embeddings then noisy copies "
       "([plot](docs/global_index_scaling.png))",
       "RAM per vector " + ", ".join(f"{s['ram_bytes_per_vector']:.1f}" for s in gis["sizes"])
       + " B at " + ", ".join(f"{s['num_vectors']:,}" for s in gis["sizes"])
       + f" vectors; best QPS at recall@10 >= 0.9 falls {gis['qps_ratio_smallest_to_largest']:.2f}x "
       f"({gis['sizes'][0]['best_at_recall_0.9']['qps']:,.0f} -> "
       f"{gis['sizes'][-1]['best_at_recall_0.9']['qps']:,.0f})",
       "`make bench-index`"),
      ("generation with the KV cache",
       f"{gen['cached']['tokens_per_s']:.1f} tokens/s for {gen['new_tokens']} new tokens, "
       f"{gen['speedup']:.1f}x a full recompute",
       "`make bench-generate`"),
      (f"retrieval service, {svc['num_shards']} shard processes",
       f"p50 {one['p50']:.2f} ms, p99 {one['p99']:.2f} ms; a killed shard: "
       f"{svc['kill']['all']['unavailable_errors']:,} errors, {svc['kill']['all']['wrong']} "
       "wrong answers",
       "`make bench-service`"),
  ]
  out = ["| what | result | command |", "|---|---|---|"]
  out += [f"| {w} | {r} | {c} |" for w, r, c in rows]
  return "\n".join(out)


def demo_dup() -> str:
  """docs/results.md: the fresh-clone `make demo` tables (bpb, then differences with intervals)."""
  demo = load("make_demo_fresh.json")["demo"]
  t, diffs = demo["table"], demo["differences"]
  hi = t["baseline"]["bins"]["r>=50%"]["chunks"]
  lo = t["baseline"]["chunks_alpha_12.5"]
  neighbours = {"baseline": "off", "RETRO[OFF]": "off", "RETRO[SHUFFLED]": "shuffled",
                "RETRO[ON]": "on"}
  out = [f"| model | neighbours | bpb, all chunks | bpb, alpha = 12.5% ({lo:,} chunks) | bpb, "
         f"overlap >= 50% ({hi:,} chunks) |", "|---|---|---|---|---|"]
  for m, n in neighbours.items():
    out.append(f"| {m} | {n} | {f4(t[m]['bpb'])} | {f4(t[m]['bpb_alpha_12.5'])} | "
               f"{f4(t[m]['bins']['r>=50%']['bpb'])} |")
  out += ["", "| difference (bpb, 95% interval) | all chunks | alpha <= 12.5% | overlap >= 50% |",
          "|---|---|---|---|"]
  for name, d in diffs.items():
    out.append(f"| {name} | {ci(d['all'])} | {ci(d['r<=12.5%'])} | {ci(d['r>=50%'])} |")
  return "\n".join(out)


def db_build_stages() -> str:
  """docs/benchmarks.md: the database stages' seconds inside the fresh-clone `make demo`."""
  fresh = load("make_demo_fresh.json")
  st = fresh["db_stages_seconds"]
  order = ["tokenizer", "chunks", "embeddings", "index", "neighbours"]
  out = ["| stage | seconds |", "|---|---|"]
  out += [f"| {s} | {st[s]:.1f} |" for s in order if s in st]
  out.append(f"| **total** | **{sum(st.values()):.1f}** |")
  return "\n".join(out)


def readme_demo_time() -> str:
  """README.md: how long `make demo` takes from a fresh clone."""
  fresh = load("make_demo_fresh.json")
  return (f"`make demo` takes {fresh['wall_seconds'] / 60:.1f} min from a fresh clone on a "
          f"{fresh['cores']}-core CPU machine ({fresh['start_utc'][:10]}; "
          "`python -m bench.fresh_demo` writes `bench/results/make_demo_fresh.json`).")


def param_counts() -> str:
  """docs/design.md: non-embedding parameter counts of the paper's sizes against Table 2."""
  sizes = load("param_counts.json")["sizes"]
  names = {"172m": "172M", "425m": "425M", "1.5b": "1.5B", "7.5b": "7.5B"}

  def cca(layers):
    return ", ".join(map(str, layers)) if len(layers) <= 3 else f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"

  out = ["| size | d_model | layers | CCA layers (Table 10) | baseline | Table 2 | diff | RETRO | "
         "Table 2 | diff | RETRO incl. embeddings |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for k, c in sizes.items():
    out.append(
        f"| {names.get(k, k)} | {c['d_model']} | {c['layers']} | {cca(c['cca_layers'])} | "
        f"{c['baseline'] / 1e6:,.1f}M | {c['table2_baseline'] / 1e6:,.0f}M | "
        f"{c['baseline'] / c['table2_baseline'] - 1:+.1%} | {c['retro'] / 1e6:,.1f}M | "
        f"{c['table2_retro'] / 1e6:,.0f}M | {c['retro'] / c['table2_retro'] - 1:+.1%} | "
        f"{c['retro_with_embeddings'] / 1e6:,.0f}M |")
  return "\n".join(out)


def figures_tables(name: str) -> str:
  """docs/results.md: a `make figures` run's tables, as `retro_jax.figures` writes its figures.md."""
  return figures.table(load(name)).rstrip("\n")


def scaling_tables() -> str:
  """docs/results.md: the scaling sweep's tables, as `retro_jax.scaling` writes its scaling.md."""
  return scaling.table(load("scaling_tiny.json")).rstrip("\n")


def train_step_table() -> str:
  """docs/benchmarks.md: the CPU training step, relative and rotary positions."""
  rel, rope = load("train_step.json"), load("train_step_rope.json")
  out = [f"| model (decoder self-attention positions) | s/step (median of "
         f"{len(rel['retro']['step_s_all'])}) | tokens/s | GFLOP/step (analytic / XLA) | GFLOP/s | "
         "MFU |", "|---|---|---|---|---|---|"]
  for res, pos in ((rel, "relative"), (rope, "rotary")):
    for model in ("retro", "baseline"):
      r = res[model]
      name = ("RETRO" if model == "retro" else "baseline decoder") + (
          " (relative, the paper's)" if (pos, model) == ("relative", "retro") else
          " (rotary, `--positions=rope`)" if (pos, model) == ("rotary", "retro") else f" ({pos})")
      tps = f"{r['tokens_per_s']:,.0f}"
      out.append(f"| {name} | {r['step_s_median']:.2f} | "
                 + (f"**{tps}**" if (pos, model) == ("relative", "retro") else tps)
                 + f" | {r['analytic_gflop_per_step']:,.0f} / {r['xla_gflop_per_step']:,.0f} | "
                 f"{r['achieved_gflops']:,.0f} | {r['mfu']:.1%} |")
  return "\n".join(out)


def gpu_table() -> str:
  """docs/benchmarks.md: the same step on an H100, float32 and bfloat16."""
  f32, b16 = load("gpu/reference_fp32.json"), load("gpu/reference_bf16.json")

  def cell(r, unit):
    return f"{r['step_s_median'] * 1e3:.1f} {unit} = {r['tokens_per_s']:,.0f} tokens/s"

  return "\n".join([
      "| model | float32 | bfloat16 |", "|---|---|---|",
      f"| RETRO | {cell(f32['retro'], 'ms/step')} | {cell(b16['retro'], 'ms')} |",
      f"| baseline decoder | {cell(f32['baseline'], 'ms')} | {cell(b16['baseline'], 'ms')} |",
      f"| retrieval's cost over the plain decoder | {f32['retrieval_overhead']:+.1%} | "
      f"{b16['retrieval_overhead']:+.1%} |"])


def embed_table() -> str:
  """docs/benchmarks.md: MiniLM chunks/s by rows per call and dtype."""
  res = load("embed_throughput.json")["results"]
  sizes = sorted({int(k.split("_bs")[1].split("_")[0]) for k in res})
  best = max(res.values(), key=lambda r: r["chunks_per_s"])["chunks_per_s"]
  out = ["| rows per call | bfloat16 | float32 |", "|---|---|---|"]
  for n in sizes:
    cells = []
    for dt in ("bfloat16", "float32"):
      v = res[f"{dt}_bs{n}_bucketed"]["chunks_per_s"]
      cells.append(f"**{v:.1f}**" if v == best else f"{v:.1f}")
    out.append(f"| {n} | {' | '.join(cells)} |")
  return "\n".join(out)


def generate_table() -> str:
  """docs/benchmarks.md: generation tokens/s, KV cache against full recompute."""
  out = ["| new tokens | KV cache, tokens/s | full recompute, tokens/s | speed-up |",
         "|---|---|---|---|"]
  for r in load("generate_speed.json")["rows"]:
    full = r["full_recompute"]
    f = f"{full['tokens_per_s']:.1f}" + ("" if full.get("measured") else " (modelled)")
    out.append(f"| {r['new_tokens']} | {r['cached']['tokens_per_s']:.1f} | {f} | "
               f"{r['speedup']:.1f}x |")
  return "\n".join(out)


def service_table() -> str:
  """docs/benchmarks.md: the retrieval service's latency, throughput and a killed shard."""
  runs = load("service_latency.json")["runs"]

  def lat(r, name):
    m = r[name]
    return (f"{m['latency_ms']['p50']:.2f} / {m['latency_ms']['p99']:.2f} ms "
            f"({m['queries_per_s']:,.0f} QPS)")

  def kill(r):
    k = r["kill"]
    return (f"{k['before_kill']['ok']:,} correct answers before, every one of the "
            f"{k['started_after_kill']['requests']:,} requests started after it failed "
            f"(first {k['seconds_from_kill_to_first_error'] * 1e3:.0f} ms after), "
            f"{k['before_kill']['wrong'] + k['started_after_kill']['wrong']} wrong"
            if k["started_after_kill"]["ok"] == 0 else
            f"{k['before_kill']['ok']:,} correct answers before, "
            f"{k['started_after_kill']['ok']:,} after, "
            f"{k['before_kill']['wrong'] + k['started_after_kill']['wrong']} wrong")

  one, many, batched = (runs[0][n] for n in ("single_one_in_flight", "single", "batched"))
  head = " | ".join(f"{r['num_shards']} shard processes" for r in runs)
  out = [f"| | {head} |", "|---|" + "---|" * len(runs),
         f"| 1 query/request, {one['concurrency']} in flight: p50 / p99 | "
         + " | ".join(lat(r, "single_one_in_flight") for r in runs) + " |",
         f"| 1 query/request, {many['concurrency']} in flight: p50 / p99 | "
         + " | ".join(lat(r, "single") for r in runs) + " |",
         f"| {batched['queries_per_request']} queries/request, {batched['concurrency']} in "
         "flight | " + " | ".join(f"{r['batched']['queries_per_s']:,.0f} queries/s" for r in runs)
         + " |",
         "| a shard SIGKILLed mid-load | " + " | ".join(kill(r) for r in runs) + " |"]
  return "\n".join(out)


def verify_table() -> str:
  """docs/benchmarks.md: what verifying on read costs per GB."""
  v = load("verify_on_read.json")
  return "\n".join([
      "| check | seconds per GB |", "|---|---|",
      f"| plain sequential read (the floor) | {v['read_seconds_per_gb']:.2f} |",
      f"| sha256 of the file (`verify.file_once`) | {v['sha256_seconds_per_gb']:.2f} "
      f"({v['sha256_gb_per_second']:.2f} GB/s) |",
      f"| id range check (tokens, neighbours) | {v['range_check_seconds_per_gb']:.2f} |"])


def aot_table() -> str:
  """docs/benchmarks.md: the ahead-of-time TPU compiles, one row per aot_compile run."""
  out = ["| size | slice (chips) | batch/chip (global) | self-attention | per-chip memory | HBM | "
         "XLA TFLOP/step | compile |", "|---|---|---|---|---|---|---|---|"]
  for r in load("aot_compile.jsonl"):
    slices, accum = r.get("num_slices") or 1, r.get("grad_accum_steps") or 1
    mesh = r["mesh"]
    if slices == 1:
      where = f"{r['topology']} ({r['chips']})"
    else:
      where = (f"{slices} x {r['topology']} ({r['chips']}), mesh data={mesh['data']}"
               + (" (one per slice)" if accum == 1 else "") + f", fsdp={mesh['fsdp']}"
               + (f"; {accum} micro-batches" if accum > 1 else ""))
    batch = (f"{r['per_chip_batch']} x {accum} ({r['global_batch']:,})" if accum > 1
             else f"{r['per_chip_batch']} ({r['global_batch']:,})")
    attn = f"blocks of {r['q_block']}" if r["q_block"] else "whole"
    mem = f"{r['per_chip_gib']:.1f} GiB"
    if r["per_chip_gib"] > r["hbm_gib"]:
      mem += " (does not fit)"
    elif accum > 1:
      mem = f"**{mem}** (fits)"
    out.append(f"| {r['size'].upper()} | {where} | {batch} | {attn} | {mem} | {r['hbm_gib']} GiB | "
               f"{r['xla_tflops_per_step']:,.0f} | {r['compile_s']:.0f} s |")
  return "\n".join(out)


def eval_retrievers_table() -> str:
  """docs/results.md: evaluation through the exact search, the index and the service."""
  e = load("eval_retrievers.json")
  res = e["results"]
  label = {"exact": "`exact`", "index": "`index` (in-process faiss)",
           "service": f"`service` ({len(e.get('service_shards') or [])} gRPC shard processes)"}
  n = next(iter(res.values()))["num_chunks"]
  out = ["| retriever | bpb, retrieval on | alpha = 12.5% | recall@10 against exact | neighbour "
         f"search, {n:,} chunks |", "|---|---|---|---|---|"]
  for k, r in res.items():
    out.append(f"| {label.get(k, k)} | {r['bpb']:.5f} | {r['bpb_alpha_12.5']:.4f} | "
               f"{round(r['recall@10_vs_exact'], 3)} | {r['neighbour_search_seconds']:.1f} s |")
  return "\n".join(out)


def gap_trend_table() -> str:
  """docs/results.md: RETRO and its baseline at each checkpoint of one schedule."""
  out = ["| step | training tokens | baseline | RETRO on | RETRO shuffled | on - baseline | "
         "on - shuffled |", "|---|---|---|---|---|---|---|"]
  for r in load("retro_gap_trend.json")["rows"]:
    b, d = r["bpb"], r["differences"]
    out.append(f"| {r['step']} | {r['train_tokens']:,} | {f4(b['baseline'])} | {f4(b['on'])} | "
               f"{f4(b['shuffled'])} | {bold_ci(d['on-baseline']['all'])} | "
               f"{bold_ci(d['on-shuffled']['all'])} |")
  return "\n".join(out)


def gap_fit_table() -> str:
  """docs/results.md: the fits of the on - baseline gap against log10(training tokens)."""
  g = load("retro_gap_trend.json")
  longest = max(r["train_tokens"] for r in g["rows"])
  steps = [r["step"] for r in g["rows"]]
  sched = f"{g['total_steps']['retro']}-step schedule"

  def crossing(f, where: bool) -> str:
    x = f["crossing_tokens"]
    mantissa, exp = f"{x:.1e}".split("e")
    note = (" (inside the measured range)" if x <= longest
            else f" ({x / longest:.1f}x the longest run)")
    return f"{mantissa}e{int(exp)}" + (note if where else "")

  def row(label: str, f: dict, where: bool = True) -> str:
    a = d4(f["a"]) if f["a"] > 0 else f4(f["a"])
    return (f"| {label} | {a} | {d4(f['b'])} | {crossing(f, where)} | "
            f"{f['direction'].replace(' after the crossing', '')} |")

  out = ["| points | a | b (per decade) | crossing (tokens) | after the crossing |",
         "|---|---|---|---|---|",
         row(f"{sched}, steps {steps[0]}-{steps[-1]}", g["fit"]),
         row(f"{sched}, steps {steps[1]}-{steps[-1]}", g["fit_without_first"])]
  if "fit_combined" in g:
    pts = g["fit_combined"]["points"]
    demo = [p for p in pts if p["schedule"] != pts[0]["schedule"]]
    out.append(row(f"both schedules: steps {steps[0]}-{steps[-1]} above + the demo's "
                   + "/".join(str(p["step"]) for p in demo)
                   + f" (read from `--fit_with`, a file since removed; {len(pts)} points)",
                   g["fit_combined"], where=False))
  return "\n".join(out)


def beam_transforms_table() -> str:
  """docs/beam.md: the index and neighbours stages before and as Beam transforms."""
  t = load("beam_index_neighbours.json")["timed"]
  best, ratio = t["best_seconds"], t["beam_over_old"]
  runs = len(t["seconds"]["old"])
  out = [f"| best of {runs} (s) | before | transforms | ratio |", "|---|---|---|---|"]
  for key, label in (("index", "index stage"), ("neighbours", "neighbours stage"),
                     ("wall", "whole command")):
    out.append(f"| {label} | {best['old'][key]:.2f} | {best['beam'][key]:.2f} | "
               f"{ratio[key]:.2f} |")
  return "\n".join(out)


def global_index_table() -> str:
  """docs/benchmarks.md: the global index beside the per-shard index, end to end."""
  g = load("global_index_default.json")
  res, today, gi = g["results"], g["today"], g["global_index"]
  t, traw = res["today per-shard faiss (end to end)"], res["today per-shard faiss (raw index calls)"]
  out = ["| index | recall@10 | QPS end to end | raw index call QPS | end to end / raw |",
         "|---|---|---|---|---|",
         f"| today: per-shard faiss `{today['factory'].replace('{pq}', '192').replace('{nlist}', '{n}')}`"
         f" x {today['index_shards']} shards, nprobe {today['nprobe']}, k_factor "
         f"{today['k_factor']} | {t['recall@10']:.3f} | {t['qps']:,.0f} | {traw['qps']:,.0f} | "
         f"{t['qps'] / traw['qps']:.2f} |"]
  probes = sorted(int(k.split("nprobe=")[1].split()[0]) for k in res if k.endswith("(end to end)")
                  and k.startswith("global"))
  for i, n in enumerate(probes):
    e, raw = res[f"global nprobe={n} (end to end)"], res[f"global nprobe={n} (raw index call)"]
    default = n == gi["config"]["nprobe"]
    label = (f"global `{gi['factory']}` + int8 rerank {gi['config']['rerank']}, nprobe {n}"
             if i == 0 else f"global, nprobe {n}") + (" (default)" if default else "")
    cells = [label, f"{e['recall@10']:.3f}", f"{e['qps']:,.0f}" + (
        f" ({e['qps_vs_today']:.2f}x today)" if default else ""), f"{raw['qps']:,.0f}",
        f"{e['e2e_vs_raw_qps']:.2f}"]
    if default:
      cells = [f"**{c}**" if j in (0, 1, 2, 4) else c for j, c in enumerate(cells)]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def copy_alignment_table() -> str:
  """docs/results.md: bpb split by whether the first neighbour is the other kernel version."""
  bpb = load("dup_copy_alignment.json")["bpb"]
  label = {"paper": "paper's neighbours (the demo)", "shift64": "shifted by 0..64 tokens"}
  out = ["| model | on, all | off, all | shuffled, all | baseline | on, alpha <= 12.5% | "
         "baseline, alpha <= 12.5% | on, r >= 50% twin | on, r >= 50% other |",
         "|---|---|---|---|---|---|---|---|---|"]
  for name, b in bpb.items():
    cells = [b["all"]["on"], b["all"]["off"], b["all"]["shuffled"], b["all"]["baseline"],
             b["r<=12.5%"]["on"], b["r<=12.5%"]["baseline"], b["r>=50%, twin"]["on"],
             b["r>=50%, other"]["on"]]
    out.append(f"| {label.get(name, name)} | " + " | ".join(f4(c) for c in cells) + " |")
  return "\n".join(out)


def service_abuse_table() -> str:
  """docs/benchmarks.md: normal requests with and without abusive ones mixed in."""
  a = load("service_abuse.json")
  ph = a["phases"]
  names = [("normal", "without"), ("with_abuse", "with abuse"), ("normal_after", "without, after")]
  idle = a["idle_rss_mb"].values()

  def rss(p, ratio=False):
    lo, hi = min(p["peak_rss_mb"].values()), max(p["peak_rss_mb"].values())
    return (f"{lo:.0f}-{hi:.0f} MB"
            + (f" ({a['summary']['peak_over_idle_rss_with_abuse']:.2f}x idle)" if ratio else ""))

  lat = [ph[n]["normal_requests"]["latency_ms"] for n, _ in names]
  ans = [ph[n]["normal_requests"] for n, _ in names]
  return "\n".join([
      "| | " + " | ".join(h for _, h in names) + " |", "|---|---|---|---|",
      "| normal requests: p50 / p99 | "
      + " | ".join(f"{x['p50']:.2f} / {x['p99']:.1f} ms" for x in lat) + " |",
      "| normal requests: answers, wrong | "
      + " | ".join(f"{x['ok']:,}, {x['wrong']}" for x in ans) + " |",
      f"| shard peak RSS (idle {min(idle):.0f} MB) | "
      + " | ".join(rss(ph[n], n == "with_abuse") for n, _ in names) + " |"])


def fact_recall_table() -> str:
  """docs/results.md: the fact example's continuations, on / off / after the removal; the part
  that matches the document in bold."""
  f = load("fact_recall.json")
  truth = f["truth"]
  tail = " ".join(f["prompt"].split()[-16:])

  def marked(text: str) -> str:
    n = 0
    while n < min(len(text), len(truth)) and text[n] == truth[n]:
      n += 1
    return f"**{text[:n]}**{text[n:]}" if n >= 8 else text

  out = [f'| | continuation of "... {tail}" | true next tokens reproduced | loss of the true '
         "next chunk |", "|---|---|---|---|", f"| truth (the document) | {truth} | | |"]
  for i, (name, r) in enumerate(f["runs"].items()):
    nll = f"{r['true_continuation_nll']:.3f}" + (" nats/token" if i == 0 else "")
    text = marked(r["continuation"]).replace("\xa0", " ")  # non-breaking spaces, as typed
    out.append(f"| {name} | {text} | {r['match_fraction']:.0%} | {nll} |")
  return "\n".join(out)


def global_scaling_table() -> str:
  """docs/benchmarks.md: the global index from 200k to 10M vectors."""

  def best(b):
    if not b:
      return "-"
    return (f"{b['qps']:,.0f} (nprobe {b['nprobe']}, rerank {b['rerank']}, "
            f"r@10 {b['recall@10']:.3f})")

  out = ["| vectors | run | partitions | build s (train + encode) | RAM B/vector | disk B/vector | "
         "best QPS at recall@10 >= 0.9 | best QPS at >= 0.95 |", "|---|---|---|---|---|---|---|---|"]
  for p in load("global_index_scaling.json")["sizes"]:
    ph = p["build_phases"]
    out.append(f"| {p['num_vectors']:,} | {p['date_utc'][11:16]} | {p['nlist']:,} | "
               f"{p['build_seconds']:,.0f} ({ph['train']:,.0f} + {ph['encode']:,.0f}) | "
               f"{p['ram_bytes_per_vector']:.1f} | {p['disk_bytes_per_vector']:.0f} | "
               f"{best(p['best_at_recall_0.9'])} | {best(p['best_at_recall_0.95'])} |")
  return "\n".join(out)


# NAME -> (function, the results files it reads).
BLOCKS = {
    "readme_results": (readme_results, [
        "make_demo_fresh.json", "figures_dup.json", "figures_default.json", "scaling_tiny.json",
        "fact_recall.json", "train_step.json", "gpu/reference_fp32.json",
        "gpu/reference_bf16.json", "aot_compile.jsonl", "embed_throughput.json",
        "ann_recall.json", "global_index_default.json", "global_index_scaling.json",
        "generate_speed.json", "service_latency.json"]),
    "readme_demo_time": (readme_demo_time, ["make_demo_fresh.json"]),
    "param_counts": (param_counts, ["param_counts.json"]),
    "figures_dup": (functools.partial(figures_tables, "figures_dup.json"), ["figures_dup.json"]),
    "figures_default": (functools.partial(figures_tables, "figures_default.json"),
                        ["figures_default.json"]),
    "scaling_tiny": (scaling_tables, ["scaling_tiny.json"]),
    "train_step": (train_step_table, ["train_step.json", "train_step_rope.json"]),
    "gpu_step": (gpu_table, ["gpu/reference_fp32.json", "gpu/reference_bf16.json"]),
    "embed_throughput": (embed_table, ["embed_throughput.json"]),
    "generate_speed": (generate_table, ["generate_speed.json"]),
    "service_latency": (service_table, ["service_latency.json"]),
    "verify_on_read": (verify_table, ["verify_on_read.json"]),
    "aot_compile": (aot_table, ["aot_compile.jsonl"]),
    "eval_retrievers": (eval_retrievers_table, ["eval_retrievers.json"]),
    "gap_trend": (gap_trend_table, ["retro_gap_trend.json"]),
    "gap_fit": (gap_fit_table, ["retro_gap_trend.json"]),
    "beam_transforms": (beam_transforms_table, ["beam_index_neighbours.json"]),
    "global_index_default": (global_index_table, ["global_index_default.json"]),
    "copy_alignment": (copy_alignment_table, ["dup_copy_alignment.json"]),
    "service_abuse": (service_abuse_table, ["service_abuse.json"]),
    "fact_recall": (fact_recall_table, ["fact_recall.json"]),
    "global_index_scaling": (global_scaling_table, ["global_index_scaling.json"]),
    "demo_dup": (demo_dup, ["make_demo_fresh.json"]),
    "db_build_stages": (db_build_stages, ["make_demo_fresh.json"]),
}


def markdown_files() -> list[str]:
  return ["README.md"] + sorted(glob.glob("docs/*.md"))


def rewrite_blocks(text: str) -> str:
  """`text` with every generated block written again."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    out.append(lines[i])
    m = BEGIN.match(lines[i])
    i += 1
    if not m:
      continue
    name = m.group(1)
    if name not in BLOCKS:
      raise ValueError(f"unknown generated block {name!r}")
    end = lines.index(END.format(name), i)
    out += BLOCKS[name][0]().split("\n") + [lines[end]]
    i = end + 1
  return "\n".join(out)


def page_text(doc: str) -> str:
  """The generated page `doc` as its benchmark writes it from the committed results file."""
  module, fn, results = PAGES[doc]
  code = (f"import json, sys, {module} as m\n"
          f"sys.stdout.write(m.{fn}(json.load(open({os.path.join(RESULTS, results)!r}))))")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout


def regenerate(check: bool) -> list[str]:
  """Writes (or with `check`, only compares) every generated block and page; returns the files
  that differ(ed)."""
  changed = []
  new = {f: rewrite_blocks(open(f).read()) for f in markdown_files()}
  new.update({doc: page_text(doc) for doc in PAGES})
  for f, text in new.items():
    with open(f) as fh:
      if fh.read() == text:
        continue
    changed.append(f)
    if not check:
      with open(f, "w") as fh:
        fh.write(text)
  return changed


# Checks (tests/test_results_sources.py).

SOURCES = re.compile(r"^<!-- sources: (.+) -->$")
# A number in a table cell: not part of a word, a path, a version or a shape (d512, v5e:4x4, L2).
NUMBER = re.compile(r"(?<![\w.:/^-])([-+]?\d[\d,]*(?:\.\d+)?)(?![\w:/^]|\.\d)")
# How a results value may be shown: as is, as a percentage, seconds in ms, in thousands or millions, a
# duration in minutes or hours, bytes in GiB or GB.
SCALES = (1, 100, 1e3, 1e-3, 1e-6, 1 / 60, 1 / 3600, 1 / 2**30, 1e-9)


def numbers(x):
  """Every number in a parsed results file (and in its strings)."""
  if isinstance(x, bool):
    return
  if isinstance(x, (int, float)):
    yield float(x)
  elif isinstance(x, dict):
    for k, v in x.items():
      yield from numbers(k)
      yield from numbers(v)
  elif isinstance(x, list):
    for v in x:
      yield from numbers(v)
  elif isinstance(x, str):
    for m in re.findall(r"-?\d+(?:\.\d+)?", x.replace(",", "")):
      yield float(m)


def shown(value: float, text: str) -> bool:
  """Whether `text` (a number as a table shows it) is `value` at some SCALES, to its digits."""
  s = text.replace(",", "").lstrip("+")
  digits = len(s.split(".")[1]) if "." in s else 0
  tol = 0.5 * 10**-digits * (1 + 1e-9)
  x = abs(float(s))
  return any(abs(abs(value) * k - x) <= tol for k in SCALES)


def table_numbers(line: str) -> list[str]:
  """The numbers of a table row, leaving out code spans and link targets."""
  line = re.sub(r"`[^`]*`", "", line)
  line = re.sub(r"\]\([^)]*\)", "]", line)
  return NUMBER.findall(line)


def tables(path: str):
  """(first line number, rows, the sources comment above or None) of each table in `path`
  outside generated blocks."""
  lines = open(path).read().split("\n")
  i, block = 0, None
  while i < len(lines):
    m = BEGIN.match(lines[i])
    if m:
      block = m.group(1)
    elif block and lines[i] == END.format(block):
      block = None
    elif not block and lines[i].startswith("|"):
      j = i
      while j < len(lines) and lines[j].startswith("|"):
        j += 1
      k = i - 1
      while k >= 0 and not lines[k].strip():
        k -= 1
      src = SOURCES.match(lines[k]) if k >= 0 else None
      yield i + 1, lines[i:j], src.group(1).split() if src else None
      i = j
      continue
    i += 1


def unsourced_numbers() -> list[str]:
  """`file:line: number` for each number in a README/docs table outside generated blocks and
  pages that no results file named in the table's sources comment holds. A comment
  `<!-- sources: none: REASON -->` marks a table of the code's layout or settings (no
  measurement)."""
  problems = []
  for path in markdown_files():
    if path in PAGES:
      continue
    for first, rows, sources in tables(path):
      nums = [(first + r, n) for r, row in enumerate(rows) if not re.fullmatch(r"[|:\- ]+", row)
              for n in table_numbers(row)]
      if not nums:
        continue
      if path in BENCH_PAGES:
        sources = [BENCH_PAGES[path]]
      if sources and sources[0] == "none:" and len(sources) > 1:
        continue  # a table of the code's settings or layout, with its reason
      if sources is None:
        problems.append(f"{path}:{first}: a table with numbers and no `<!-- sources: ... -->`")
        continue
      values = []
      for src in sources:
        if not os.path.exists(src):
          problems.append(f"{path}:{first}: sources names {src}, which does not exist")
          continue
        with open(src) as f:
          txt = f.read()
        recs = ([json.loads(x) for x in txt.splitlines() if x.strip()] if src.endswith(".jsonl")
                else [json.loads(txt)])
        values += sorted({v for r in recs for v in numbers(r)})
      problems += [f"{path}:{line}: {n} is in none of {', '.join(sources)}"
                   for line, n in nums if not any(shown(v, n) for v in values)]
  return problems


DATE_KEYS = ("date", "date_utc", "start_utc", "measured_at_utc")


def provenance(record: dict) -> dict:
  """{command, commit, date} a results record names (its `provenance`, else top-level keys)."""
  p = dict(record.get("provenance") or {})
  p.setdefault("command", record.get("command"))
  p.setdefault("commit", record.get("commit"))
  p.setdefault("date", next((record[k] for k in DATE_KEYS if record.get(k)), None))
  return p


def command_source(command: str) -> str | None:
  """The repository file that `command` runs (`python -m MODULE`, `bash PATH`), or None."""
  m = re.search(r"python3? -m ([\w.]+)", command)
  if m:
    base = m.group(1).replace(".", "/")
    for cand in (base + ".py", base + "/__main__.py"):
      if os.path.exists(cand):
        return cand
    return None
  m = re.search(r"bash (\S+\.sh)", command)
  return m.group(1) if m and os.path.exists(m.group(1)) else None


def unproduced_results() -> list[str]:
  """Each results file that names no command, commit or date, or whose command runs no file of
  the repository, or runs one that does not write it."""
  problems = []
  for path in sorted(glob.glob(os.path.join(RESULTS, "**", "*.json*"), recursive=True)):
    name = os.path.relpath(path, RESULTS)
    recs = load(name)
    for r in (recs if isinstance(recs, list) else [recs]):
      p = provenance(r)
      missing = [k for k in ("command", "commit", "date") if not p.get(k)]
      if missing:
        problems.append(f"{path}: names no {', '.join(missing)}")
        continue
      src = command_source(p["command"])
      if src is None:
        problems.append(f"{path}: its command runs no file of the repository: {p['command']}")
        continue
      stem = os.path.splitext(os.path.basename(path))[0]
      with open(src) as f:
        writes = os.path.basename(path) in f.read() or stem in p["command"]
      if not writes:
        problems.append(f"{path}: {src} (its command) does not write it")
  return problems


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
  args = p.parse_args()
  changed = regenerate(args.check)
  for f in changed:
    print(("differs: " if args.check else "rewrote: ") + f)
  if args.check and changed:
    sys.exit(1)


if __name__ == "__main__":
  main()
