r"""The paper's figures at CPU scale, from one resumable command (`python -m retro_jax.figures`).

    python -m retro_jax.figures --config=experiments/figures_dup.py --out=runs/figures_dup

The config holds `train` (an experiment, e.g. experiments/dup_tiny.py's) and `figures`:
  seeds            RETRO and its baseline are trained from scratch once per seed (`seed` sets the
                   parameters and the data order), OUT/seed<S>/{retro,baseline}; the first seed
                   is scored with every control, the others with `other_seed_modes`
  db_fractions     fractions of the training documents that form the retrieval database when the
                   held-out documents are scored (nested subsets, retro_jax.evaluation.bpb)
  fraction_seeds   the seeds whose RETRO is scored at every fraction
  retrofit_steps   0, or the steps of a retrofit of seed 0's frozen baseline (CCA and encoder only,
                   OUT/seed0/retrofit) and of its control, the same baseline trained the same steps
                   with all weights and no retrieval (OUT/seed0/baseline_longer: "it trained
                   longer"); a tuple adds retrofits of more steps (OUT/seed0/retrofit_<N>,
                   baseline_longer_<N>), the first being the headline one
  eval_max_docs    0 = every held-out document

What it measures (each difference a - b in bpb with a 95% paired-bootstrap interval over documents,
retro_jax.evaluation.controls):
  * per seed, at the whole database: RETRO on / off / shuffled (another document's neighbours) /
    shuffled_source (another document of the same source) / same_document (another chunk of the
    same document, far enough away) and the baseline, by overlap bin of the paper's r(C) and of
    the overlap with the neighbours the model is given; on - baseline as mean +- sd over seeds;
  * bpb against the database fraction: RETRO on and shuffled at every fraction, the baseline (which
    retrieves nothing) beside them, and on(f) - on(next f) with intervals;
  * the retrofit: on / off / shuffled, its recovery R = (baseline - retrofit on) / (baseline -
    from-scratch on) with an interval, and retrofit on - the trained-longer control.
Writes OUT/figures.json (with the command, commit and date), OUT/figures.md and the plots
OUT/bpb_vs_db_fraction.png, OUT/gain_by_overlap.png. Every training run is reused when finished
and resumed when killed, and every finished evaluation is kept in OUT/evals/ and not redone.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.training import loop

LOW, HIGH = controls.OVERLAP_BINS[0][0], controls.OVERLAP_BINS[-1][0]


def _train(c, workdir: str) -> None:
  print(f"== training {workdir} ({c.total_steps} steps, seed {c.seed}, retrieval {c.retrieval}"
        f"{', from ' + c.init_from if c.init_from else ''})", flush=True)
  loop.run(c, workdir)


def train_all(base, fig, out: str) -> dict[str, str]:
  """Trains (or reuses) every model of the figures; returns name -> workdir."""
  runs = {}
  for s in fig.seeds:
    for kind in ("retro", "baseline"):
      c = copy.deepcopy(base)
      c.seed = int(s)
      c.retrieval = kind == "retro"
      runs[f"seed{s}/{kind}"] = wd = os.path.join(out, f"seed{s}", kind)
      _train(c, wd)
  s0 = fig.seeds[0]
  for i, steps in enumerate(retrofit_steps(fig)):
    for kind in ("retrofit", "baseline_longer"):
      c = copy.deepcopy(base)
      c.seed = int(s0)
      c.init_from = runs[f"seed{s0}/baseline"]
      c.retrieval = kind == "retrofit"
      c.train_only = "retrieval" if kind == "retrofit" else "all"
      c.total_steps = steps
      c.warmup_steps = max(1, min(c.warmup_steps, c.total_steps // 10))
      c.checkpoint_every = min(c.checkpoint_every, c.total_steps)
      name = kind if i == 0 else f"{kind}_{steps}"
      runs[f"seed{s0}/{name}"] = wd = os.path.join(out, f"seed{s0}", name)
      _train(c, wd)
  return runs


def retrofit_steps(fig) -> list[int]:
  """The retrofits' step counts, the headline one first ([] for none)."""
  steps = fig.retrofit_steps
  steps = [steps] if isinstance(steps, int) else list(steps)
  return [int(x) for x in steps if x]


def _cached_eval(out: str, name: str, fn) -> dict:
  """fn()'s result, kept in OUT/evals/NAME.json so that a rerun does not score it again."""
  path = os.path.join(out, "evals", name.replace("/", "_") + ".json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  print(f"== scoring {name}", flush=True)
  r = fn()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  layout.write_json_atomic(path, r)
  return r


def _slim(r: dict) -> dict:
  """An evaluation's results without the per-chunk arrays."""
  return {k: v for k, v in r.items() if not k.startswith("chunk_")}


def run_figures(cfg, out: str) -> dict:
  base, fig = cfg.train, cfg.figures
  t0 = time.time()
  runs = train_all(base, fig, out)
  store = chunk_store_lib.ChunkStore.open(base.db)
  seq = base.seq_len
  stride = ev.resolve_stride(seq, int(fig.get("stride", 0)), store.chunk_size)
  nlen = base.model_overrides.neighbour_len
  max_docs = fig.eval_max_docs or None
  fracs = sorted(float(f) for f in fig.db_fractions)
  full = max(fracs)
  held = {}
  for f in fracs:
    print(f"== held-out retrieval with {f:.1%} of the training documents", flush=True)
    held[f] = ev.load_heldout(store, base.db, db_fraction=f, neighbour_len=nlen, max_docs=max_docs)
  H = held[full]
  doc_C = controls.doc_of_row(H.doc_first_row, len(H.chunk_ids_C))
  bytes_C = H.chunk_bytes_C
  kw = dict(seq_len=seq, stride=stride, db=base.db, progress=False)
  res = {"db": base.db, "steps": base.total_steps, "global_batch": base.global_batch,
         "seq_len": seq, "stride": stride, "db_fractions": fracs, "seeds": list(fig.seeds),
         "num_docs": len(H.doc_tokens), "num_chunks": int(len(H.chunk_ids_C)),
         "num_bytes": int(bytes_C.sum()), "overlap_bins": [list(b) for b in controls.OVERLAP_BINS],
         "per_seed": {}, "db_fraction": {}, "retrofit": None}

  # Per seed at the whole database: every control and the baseline.
  losses = {}
  for i, s in enumerate(fig.seeds):
    modes = "controls" if i == 0 else tuple(fig.get("other_seed_modes", ("on", "shuffled")))
    r = _cached_eval(out, f"seed{s}_full", lambda s=s, modes=modes: ev.evaluate(
        runs[f"seed{s}/retro"], retrieval=modes, held=H,
        baseline=runs[f"seed{s}/baseline"], **kw))
    losses[s] = {m: np.asarray(v) for m, v in r["chunk_loss_nats"].items()}
    res["per_seed"][str(s)] = _slim(r)
    if i == 0:
      given_C = np.asarray(r["chunk_given_overlap"])
  gains = [res["per_seed"][str(s)]["differences"]["on-baseline"]["all"]["diff"] for s in fig.seeds]
  res["on_minus_baseline"] = {"per_seed": gains, "mean": float(np.mean(gains)),
                              "sd": float(np.std(gains, ddof=1)) if len(gains) > 1 else None,
                              "every_seed_excludes_zero": all(
                                  res["per_seed"][str(s)]["differences"]["on-baseline"]["all"][
                                      "excludes_zero"] for s in fig.seeds)}
  res["leakage_bins"] = {n: int(m.sum()) for n, m in controls.bin_masks(H.leakage_C).items()}
  res["given_bins"] = {n: int(m.sum()) for n, m in controls.bin_masks(given_C).items()}

  # bpb against the database fraction.
  for s in fig.fraction_seeds:
    on, shuf, rows = {}, {}, {}
    for f in fracs:
      if f == full:
        on[f], shuf[f] = losses[s]["on"], losses[s]["shuffled"]
      else:
        r = _cached_eval(out, f"seed{s}_fraction{f}", lambda s=s, f=f: ev.evaluate(
            runs[f"seed{s}/retro"], retrieval=("on", "shuffled"), held=held[f], **kw))
        on[f], shuf[f] = (np.asarray(r["chunk_loss_nats"][m]) for m in ("on", "shuffled"))
      rows[str(f)] = {"on": controls.bpb(on[f], bytes_C),
                      "shuffled": controls.bpb(shuf[f], bytes_C),
                      "baseline": controls.bpb(losses[s]["baseline"], bytes_C),
                      "db_tokens": int(np.sum(store.doc_num_chunks[ev.training_doc_mask(
                          store, f)])) * store.chunk_size,
                      "alpha_12.5": {m: controls.bpb(x[f], bytes_C,
                                                     held[f].leakage_C <= 0.125 + 1e-9)
                                     for m, x in (("on", on), ("shuffled", shuf))}}
      rows[str(f)]["on-baseline"] = controls.paired_bootstrap(on[f], losses[s]["baseline"],
                                                              bytes_C, doc_C)
    steps = {}
    for a, b in zip(fracs[:-1], fracs[1:]):
      steps[f"{b}-{a}"] = {m: controls.paired_bootstrap(x[b], x[a], bytes_C, doc_C)
                           for m, x in (("on", on), ("shuffled", shuf))}
    res["db_fraction"][str(s)] = {"rows": rows, "steps": steps,
                                  "on_falls_every_step": all(
                                      d["on"]["diff"] < 0 for d in steps.values()),
                                  "shuffled_steps_within_interval": all(
                                      d["shuffled"]["ci95"][0] <= 0 <= d["shuffled"]["ci95"][1]
                                      for d in steps.values())}

  # The retrofits, their recovery of the from-scratch gain, and the trained-longer controls.
  s0 = fig.seeds[0]
  base_C, scratch_on = losses[s0]["baseline"], losses[s0]["on"]
  for i, steps in enumerate(retrofit_steps(fig)):
    tag = "" if i == 0 else f"_{steps}"
    # (Retrieval off is the frozen baseline itself, bit for bit: not scored again.)
    rf = _cached_eval(out, f"retrofit{tag}", lambda tag=tag: ev.evaluate(
        runs[f"seed{s0}/retrofit{tag}"], retrieval=("on", "shuffled"), held=H,
        baseline=runs[f"seed{s0}/baseline_longer{tag}"], **kw))
    rf_on = np.asarray(rf["chunk_loss_nats"]["on"])
    longer = np.asarray(rf["chunk_loss_nats"]["baseline"])
    entry = {
        "steps": steps, "scratch_steps": base.total_steps,
        "bpb": {"baseline": controls.bpb(base_C, bytes_C),
                "from_scratch_on": controls.bpb(scratch_on, bytes_C),
                "retrofit_on": controls.bpb(rf_on, bytes_C),
                "retrofit_shuffled": rf["results"]["shuffled"]["bpb"],
                "baseline_longer": controls.bpb(longer, bytes_C)},
        "recovery": controls.ratio_bootstrap(base_C, rf_on, scratch_on, bytes_C, doc_C),
        "on-baseline": controls.compare(rf_on, base_C, bytes_C, doc_C, H.leakage_C),
        "on-baseline_longer": controls.compare(rf_on, longer, bytes_C, doc_C, H.leakage_C),
        "baseline_longer-baseline": controls.paired_bootstrap(longer, base_C, bytes_C, doc_C),
        "on-shuffled": rf["differences"]["on-shuffled"]}
    if i == 0:
      res["retrofit"] = entry
    else:
      res.setdefault("retrofit_more_steps", {})[str(steps)] = entry
  res["wall_s"] = time.time() - t0
  return res


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(command: str, repo: str = ".") -> dict:
  """{"command", "commit" (short HEAD of `repo`, "unknown" outside git), "date" (UTC)}: what a
  results file records about the run that wrote it."""
  try:
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10, check=False).stdout.strip()
  except OSError:
    commit = ""
  return {"command": command, "commit": commit or "unknown", "date": utc_now()}


def plot(res: dict, out: str, title: str = "") -> list[str]:
  """bpb against the database fraction; on - shuffled and on - baseline by overlap bin."""
  matplotlib.use("Agg")
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for s, d in res["db_fraction"].items():
    fr = sorted(d["rows"], key=float)
    toks = [d["rows"][f]["db_tokens"] for f in fr]
    for mode, style in (("on", "s-"), ("shuffled", "x:"), ("baseline", "o--")):
      ax.plot(toks, [d["rows"][f][mode] for f in fr], style,
              label=f"{'RETRO ' + mode if mode != 'baseline' else 'baseline'} (seed {s})")
  ax.set_xscale("log")
  ax.set_xlabel("tokens in the retrieval database")
  ax.set_ylabel("held-out bits per byte")
  ax.set_title(title + "bpb against database size")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out, "bpb_vs_db_fraction.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  names = [b[0] for b in controls.OVERLAP_BINS]
  for ax, key, label in ((axes[0], "differences", "r(C): 10 nearest neighbours"),
                         (axes[1], "differences_given", "overlap with the neighbours given")):
    for j, (diff, name) in enumerate((("on-shuffled", "on - shuffled"),
                                      ("on-shuffled_source", "on - same-source shuffled"),
                                      ("on-baseline", "on - baseline"))):
      ys, lo, hi = [], [], []
      first = next(iter(res["per_seed"].values()))  # the seed scored with every control
      for b in names:
        d = first[key][diff][b]
        ys.append(d["diff"] if d["diff"] is not None else np.nan)
        lo.append(d["ci95"][0] if d["ci95"][0] is not None else np.nan)
        hi.append(d["ci95"][1] if d["ci95"][1] is not None else np.nan)
      x = np.arange(len(names)) + (j - 1) * 0.25
      ys, lo, hi = (np.asarray(v, float) for v in (ys, lo, hi))
      # (A bootstrap interval need not contain the point estimate: clip the bars at zero.)
      err = np.nan_to_num(np.maximum([ys - lo, hi - ys], 0))
      ax.bar(x, ys, 0.25, yerr=err, capsize=3, label=name)
    ax.set_xticks(np.arange(len(names)), names)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(label)
  axes[0].set_ylabel("bpb difference (negative: RETRO on better)")
  axes[0].legend(fontsize=8)
  fig.suptitle(title + f"gain by overlap bin (seed {next(iter(res['per_seed']))}, 95% intervals)")
  fig.tight_layout()
  paths.append(os.path.join(out, "gain_by_overlap.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def table(res: dict) -> str:
  """The figures as markdown tables."""
  fd = controls.format_diff
  out = []
  seeds = list(res["per_seed"])
  out += ["| seed | baseline | RETRO off | shuffled | same-source shuffled | same document | "
          "RETRO on | on - baseline | on - shuffled | on - same-source shuffled | "
          "on - same document |", "|---|" + "---|" * 10]
  for s in seeds:
    r = res["per_seed"][s]
    b = {m: f"{v['bpb']:.4f}" for m, v in r["results"].items()}
    d = {k: fd(v["all"]) for k, v in r["differences"].items()}
    cells = [b.get(m, "-") for m in ("baseline", "off", "shuffled", "shuffled_source",
                                     "same_document")]
    cells.append(f"**{b['on']}**")
    cells += [d.get(k, "-") for k in ("on-baseline", "on-shuffled", "on-shuffled_source",
                                      "on-same_document")]
    out.append(f"| {s} | " + " | ".join(cells) + " |")
  g = res["on_minus_baseline"]
  sd = "n/a" if g["sd"] is None else f"{g['sd']:.4f}"
  out += ["", f"on - baseline over {len(seeds)} seeds: mean {g['mean']:+.4f}, sd {sd}", ""]
  s = seeds[0]
  r = res["per_seed"][s]
  out += [f"By overlap bin (seed {s}; chunks per bin in brackets):", "",
          "| bin | binned by | chunks | baseline | on | shuffled | on - shuffled | "
          "on - same-source shuffled | on - baseline |", "|---|---|---|---|---|---|---|---|---|"]
  for key, bins_key, label in (("differences", "bins", "r(C)"),
                               ("differences_given", "bins_given", "given")):
    for b, _, _ in controls.OVERLAP_BINS:
      rb = r["results"]
      bpb = {m: rb[m][bins_key][b]["bpb"] for m in ("baseline", "on", "shuffled")}
      f = {m: "n/a" if v is None else f"{v:.4f}" for m, v in bpb.items()}
      d = r[key]
      out.append(f"| {b} | {label} | {rb['on'][bins_key][b]['chunks']} | {f['baseline']} | "
                 f"{f['on']} | {f['shuffled']} | {fd(d['on-shuffled'][b])} | "
                 f"{fd(d['on-shuffled_source'][b])} | {fd(d['on-baseline'][b])} |")
  on12 = ev.bpb_at(r["results"]["on"], 0.125)
  base12 = ev.bpb_at(r["results"]["baseline"], 0.125)
  out += ["", f"At alpha = 12.5% (the paper's leakage filter, {r['results']['on']['chunks_alpha']['0.1250']} "
          f"chunks): RETRO on {on12:.4f}, baseline {base12:.4f}.", ""]
  for s, d in res["db_fraction"].items():
    fr = sorted(d["rows"], key=float)
    out += [f"bpb against the database fraction (seed {s}):", "",
            "| fraction | database tokens | RETRO on | shuffled | baseline | on - baseline |",
            "|---|---|---|---|---|---|"]
    for f in fr:
      row = d["rows"][f]
      out.append(f"| {float(f):.3g} | {row['db_tokens']:,} | {row['on']:.4f} | "
                 f"{row['shuffled']:.4f} | {row['baseline']:.4f} | {fd(row['on-baseline'])} |")
    out += ["", "| step | on, next - this | shuffled, next - this |", "|---|---|---|"]
    for k, v in d["steps"].items():
      out.append(f"| {k} | {fd(v['on'])} | {fd(v['shuffled'])} |")
    out.append("")
  for rf in ([res["retrofit"]] if res.get("retrofit") else []) + list(
      res.get("retrofit_more_steps", {}).values()):
    b = rf["bpb"]
    rec = rf["recovery"]
    out += [f"Retrofit ({rf['steps']} steps on the frozen {rf['scratch_steps']}-step baseline):", "",
            "| model | bpb |", "|---|---|"]
    out += [f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in b.items()]
    out += ["", f"recovery R = (baseline - retrofit on) / (baseline - from-scratch on) = "
            f"{rec['ratio']:.3f} [{rec['ci95'][0]:.3f}, {rec['ci95'][1]:.3f}]; "
            f"retrofit on - baseline trained {rf['steps']} steps longer: "
            f"{fd(rf['on-baseline_longer']['all'])}; trained longer - baseline: "
            f"{fd(rf['baseline_longer-baseline'])}", ""]
  return "\n".join(out)


def run(cfg, out: str, argv: list[str] | None = None) -> dict:
  """The figures, their plots and OUT/figures.md; returns the results."""
  os.makedirs(out, exist_ok=True)
  res = run_figures(cfg, out)
  res.update(provenance(" ".join(["python -m retro_jax.figures"] +
                                  list((argv or sys.argv)[1:]))))
  res["plots"] = plot(res, out, title=cfg.figures.get("title", ""))
  with open(os.path.join(out, "figures.json"), "w") as f:
    json.dump(res, f, indent=1)
  with open(os.path.join(out, "figures.md"), "w") as f:
    f.write(table(res) + "\n")
  return res
