"""The model-quality tables of README.md and docs/ (results.md, design.md), written from the
results files; `python -m bench.docs_tables` puts them in their generated blocks."""
from bench.results_files import bold_ci, ci, d4, f4, load, ratio_ci
from retro_jax.evaluation import figures, scaling


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

  def aot_run(size, topology, slices=1, accum=1, program="train"):
    return next(r for r in aot if r["size"] == size and r["topology"] == topology
                and r.get("num_slices", 1) == slices and r.get("grad_accum_steps", 1) == accum
                and r.get("program", "train") == program)

  a172, a425, a15, a75 = (aot_run("172m", "v5e:4x4"), aot_run("425m", "v5e:4x4"),
                          aot_run("1.5b", "v5p:2x2x4"), aot_run("7.5b", "v5p:4x4x4"))
  a15x2 = aot_run("1.5b", "v5p:2x2x4", 2)
  e75 = aot_run("7.5b", "v5e:4x4", program="evaluate")
  s172, s425 = (aot_run(n, "v5e:4x4", program="sample") for n in ("172m", "425m"))
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
      ("ahead-of-time TPU compile of evaluation and sampling (sharded), per-chip memory",
       f"7.5B evaluation step on {e75['topology']} ({e75['chips']} chips, float32 weights FSDP, "
       f"{e75['per_chip_batch']} window of {e75['seq_len']:,} tokens per chip): "
       f"**{e75['per_chip_gib']:.1f} GiB, {fits(e75)} {e75['hbm_gib']} GiB**; sampling on {s172['topology']} "
       f"(data-parallel, {s172['per_chip_batch']} sequence per chip, prefill of "
       f"{s172['prompt_len']:,} tokens and a decode step over a {s172['seq_len']:,}-token cache): "
       f"172M {s172['per_chip_gib']:.1f} GiB, {fits(s172)}; 425M {s425['per_chip_gib']:.1f} GiB, "
       f"{fits(s425)}",
       "`ONLY_SERVE=1 APPEND=1 bash bench/aot_all.sh`"),
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


def readme_demo_time() -> str:
  """README.md: how long `make demo` takes from a fresh clone."""
  fresh = load("make_demo_fresh.json")
  return (f"`make demo` takes {fresh['wall_seconds'] / 60:.1f} min from a fresh clone on a "
          f"{fresh['cores']}-core CPU machine ({fresh['start_utc'][:10]}; "
          "`python -m bench.fresh_demo` writes `bench/results/make_demo_fresh.json`).")


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


def figures_tables(name: str) -> str:
  """docs/results.md: a `make figures` run's tables, as `retro_jax.figures` writes its figures.md."""
  return figures.table(load(name)).rstrip("\n")


def scaling_tables() -> str:
  """docs/results.md: the scaling sweep's tables, as `retro_jax.scaling` writes its scaling.md."""
  return scaling.table(load("scaling_tiny.json")).rstrip("\n")


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
