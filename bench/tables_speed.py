"""The speed and memory tables of docs/ (benchmarks.md, beam.md), written from the results
files; `python -m bench.docs_tables` puts them in their generated blocks."""
import re

from bench.results_files import load


def db_build_stages() -> str:
  """docs/benchmarks.md: the database stages' seconds inside the fresh-clone `make demo`."""
  fresh = load("make_demo_fresh.json")
  st = fresh["db_stages_seconds"]
  order = ["tokenizer", "chunks", "embeddings", "index", "neighbours"]
  out = ["| stage | seconds |", "|---|---|"]
  out += [f"| {s} | {st[s]:.1f} |" for s in order if s in st]
  out.append(f"| **total** | **{sum(st.values()):.1f}** |")
  return "\n".join(out)


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
  """docs/benchmarks.md: the ahead-of-time TPU compiles, one row per aot_compile run: training
  steps, then evaluation steps and sampling programs (`--program`)."""
  out = ["| program | size | slice (chips) | batch/chip (global) | self-attention | per-chip memory "
         "| HBM | XLA TFLOP/step | compile |", "|---|---|---|---|---|---|---|---|---|"]
  for r in load("aot_compile.jsonl"):
    program = r.get("program", "train")
    slices, accum = r.get("num_slices") or 1, r.get("grad_accum_steps") or 1
    mesh = r["mesh"]
    if slices == 1:
      where = f"{r['topology']} ({r['chips']})"
    else:
      where = (f"{slices} x {r['topology']} ({r['chips']}), mesh data={mesh['data']}"
               + (" (one per slice)" if accum == 1 else "") + f", fsdp={mesh['fsdp']}"
               + (f"; {accum} micro-batches" if accum > 1 else ""))
    if program != "train":
      where += ", " + ("FSDP" if mesh["fsdp"] > 1 else "data-parallel")
    batch = (f"{r['per_chip_batch']} x {accum} ({r['global_batch']:,})" if accum > 1
             else f"{r['per_chip_batch']} ({r['global_batch']:,})")
    attn = f"blocks of {r['q_block']}" if r["q_block"] else "whole"
    mem = f"{r['per_chip_gib']:.1f} GiB"
    if r["per_chip_gib"] > r["hbm_gib"]:
      mem += " (does not fit)"
    elif accum > 1 or program != "train":
      mem = f"**{mem}** (fits)"
    if program == "sample":
      mem += (f": prefill of {r['prompt_len']:,} tokens {r['prefill_gib']:.1f}, decode step "
              f"{r['step_gib']:.1f} (cache of {r['seq_len']:,} {r['cache_gib']:.2f})")
    name = {"train": "training step", "evaluate": f"evaluation ({r['seq_len']:,} tokens)",
            "sample": "sampling"}[program]
    tflops = r["xla_tflops_per_step"]
    out.append(f"| {name} | {r['size'].upper()} | {where} | {batch} | {attn} | {mem} | "
               f"{r['hbm_gib']} GiB | {tflops:,.0f} | {r['compile_s']:.0f} s |"
               if tflops >= 10 else
               f"| {name} | {r['size'].upper()} | {where} | {batch} | {attn} | {mem} | "
               f"{r['hbm_gib']} GiB | {tflops:.2f} | {r['compile_s']:.0f} s |")
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


def _ann_setting(family: str, p: dict) -> str:
  """An ANN setting as the tables name it."""
  if family == "faiss":
    return f"`{p['factory']}` (nprobe {p['nprobe']})"
  if family == "scann":
    return f"{p['num_leaves']:,} leaves, {p['leaves_to_search']} searched"
  return ""


def ann_quiet_table() -> str:
  """docs/benchmarks.md: the best QPS of each ANN family at recall@10 >= 0.95 and >= 0.99."""
  summ = load("ann_recall_quiet.json")["summary"]
  at95, at99 = summ["at_recall10_0.95"], summ["at_recall10_0.99"]
  label = {"faiss": "faiss fast-scan", "scann": "ScaNN spherical tree + SOAR + AH(2) + reorder",
           "exact": "exact (faiss Flat)"}
  out = ["| method | best QPS at recall@10 >= 0.95 | best QPS at >= 0.99 |", "|---|---|---|"]
  for fam in ("faiss", "scann", "exact"):
    a, b = at95.get(fam), at99.get(fam)
    if fam == "exact":
      out.append(f"| {label[fam]} | {a['qps']:,} | "
                 + ("same" if b and b["qps"] == a["qps"] else f"{b['qps']:,}" if b else "-") + " |")
      continue
    where = " / ".join(_ann_setting(fam, x["params"]) for x in (a, b) if x)
    c95 = f"{a['qps']:,} (r@10 {a['recall_at_10']:.3f}, r@2 {a['recall_at_2']:.3f})" if a else "-"
    c99 = f"{b['qps']:,} (r@10 {b['recall_at_10']:.3f})" if b else "none reached it"
    out.append(f"| {label[fam]}: {where} | {c95} | {c99} |")
  return "\n".join(out)


def ann_reference_table() -> str:
  """docs/benchmarks.md: the reference figures' corpus and size, here against the reference."""
  res = load("ann_recall_kernel_docs_84k.json")
  at95, ref = res["summary"]["at_recall10_0.95"], res["anchors_kernel_docs_82k"]
  best = max(at95[f]["qps"] for f in ("faiss", "scann"))
  rows = [("faiss", f"faiss `{at95['faiss']['params']['factory']}`",
           ref["faiss fast-scan at 0.95"]),
          ("scann", "ScaNN spherical + SOAR", ref["scann spherical+SOAR at 0.95"]),
          ("exact", "exact (faiss Flat)", ref["exact faiss Flat"])]
  out = ["| method | recall@10 | QPS here | reference figure |", "|---|---|---|---|"]
  for fam, name, anchor in rows:
    r = at95[fam]
    qps = f"{r['qps']:,}"
    out.append(f"| {name} | {round(r['recall_at_10'], 3)} | "
               f"{f'**{qps}**' if r['qps'] == best else qps} | {anchor:,} |")
  return "\n".join(out)


def _make_targets() -> list[str]:
  """The Makefile's targets, in file order (not the .venv stamp)."""
  out = []
  with open("Makefile") as f:
    for line in f:
      m = re.match(r"^([a-z][a-z0-9-]*):", line)
      if m and m.group(1) not in out:
        out.append(m.group(1))
  return out


def make_targets_table() -> str:
  """docs/testing.md: every make target, timed from a fresh clone where measured."""
  rec = load("make_targets.json")["targets"]
  rec.setdefault("demo", load("make_demo_fresh.json"))  # bench.fresh_demo's run of `make demo`
  out = ["| target | from a fresh clone | result | CPU, load (mean during the run, or the 5-min "
         "average at its end), date, commit |", "|---|---:|---|---|"]
  for t in _make_targets():
    r = rec.get(t)
    if r is None and t == "aot":  # hours of compiles: longer than a session here
      rows = load("aot_compile.jsonl")
      hours = sum(x["compile_s"] for x in rows) / 3600
      out.append(f"| `make aot` | not timed whole | its {len(rows)} compiles alone took "
                 f"{hours:.1f} h (`compile_s` in bench/results/aot_compile.jsonl) | "
                 f"{rows[0]['provenance']['commit'][:7]}, {rows[0]['provenance']['date'][:10]} |")
      continue
    if r is None:
      out.append(f"| `make {t}` | not measured yet | | |")
      continue
    result = ("ok" if r["exit_status"] == 0 else f"exit {r['exit_status']}") + (
        f": {r['pytest']}" if r.get("pytest") else "") + (
        f" (after {', '.join(r['after'])} in the same clone)" if r.get("after") else "")
    during = r.get("load_during")
    shown = (f"{during['mean']:.1f} (max {during['max']:.1f})" if during
             else f"{r['load_average_at_end'][1]:.1f} at the end")
    out.append(f"| `make {t}` | {r['wall_seconds'] / 60:.1f} min | {result} | {r['cores']} x "
               f"{r['cpu']}, {shown}, {r['start_utc'][:10]}, {r['commit'][:7]} |")
  return "\n".join(out)
