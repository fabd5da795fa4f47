r"""RETRO against its baseline over training: retrieval on / off / shuffled at several checkpoints.

    python -m bench.retro_gap_trend --retro=runs/long/retro --baseline=runs/long/baseline \
        --db=runs/default_db --steps=200,400,600,800 --out=bench/results/retro_gap_trend.json

For every step, the RETRO checkpoint (retrieval on, off, shuffled) and the baseline checkpoint of
the same step are scored on the same held-out chunks (retro_jax.evaluation.bpb, windows of the
run's seq_len, stride seq_len - chunk so every scored chunk has its preceding chunk's neighbours),
each difference with its 95% paired-bootstrap interval over documents
(retro_jax.evaluation.controls). The gap (RETRO on - baseline, bpb) is fitted linearly against
log10(training tokens) and the fit's zero crossing reported (`crossing_tokens`, with the
direction the gap moves). `--extra=LABEL:RETRO_DIR:BASELINE_DIR[:STEP]` adds a separately trained pair
(e.g. the demo's) as a labelled row, outside the fit. `--resume` keeps what --out already holds
for the same runs and settings, so checkpoints can be scored as training writes them;
`--fit_with=LABEL=FILE[:KEY]` fits these rows together with rows of another schedule that this
script measured before (`fit_combined`, each point labelled with its schedule).
"""
import json
import os
import time

import numpy as np
from absl import app, flags

from bench.common import run_provenance
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls

FLAGS = flags.FLAGS
flags.DEFINE_string("retro", None, "RETRO workdir", required=True)
flags.DEFINE_string("baseline", None, "baseline workdir (same data and schedule)", required=True)
flags.DEFINE_string("db", None, "database (default: the RETRO run's)")
flags.DEFINE_list("steps", [], "checkpoint steps present in both workdirs")
flags.DEFINE_list("extra", [], "LABEL:RETRO_DIR:BASELINE_DIR[:STEP] pairs scored alongside")
flags.DEFINE_list("modes", ["all"], "RETRO's modes at each step (on is needed for the gap)")
flags.DEFINE_integer("stride", 0, "eval stride (0: seq_len - chunk size)")
flags.DEFINE_integer("max_docs", None, "first N held-out documents only")
flags.DEFINE_string("out", "bench/results/retro_gap_trend.json", "results JSON")
flags.DEFINE_list("fit_with", [], "LABEL=RESULTS_JSON[:KEY]: rows this script wrote earlier for "
                  "another schedule (KEY: the object of that file holding them), fitted together "
                  "with this run's rows as `fit_combined`, every point labelled with its schedule")
flags.DEFINE_bool("resume", False, "keep the rows (steps, extra labels) already in --out when it "
                  "scored the same runs, database and windows; score only the rest")


def _row(res: dict, tokens: int | None) -> dict:
  r, d = res["results"], res["differences"]
  return {"step": res["step"], "train_tokens": tokens,
          "bpb": {m: r[m]["bpb"] for m in r},
          "bpb_by_bin": {m: {b: v["bpb"] for b, v in r[m]["bins"].items()} for m in r},
          "chunks_by_bin": {b: v["chunks"] for b, v in r["on"]["bins"].items()},
          "differences": d}


def fit_gap(tokens: list[float], gaps: list[float]) -> dict:
  """Least squares gap = a + b * log10(tokens) and where it crosses zero (None if b == 0):
  with b > 0 RETRO's lead shrinks and it falls behind past the crossing, with b < 0 it pulls
  ahead past it."""
  slope, icpt = np.polyfit(np.log10(tokens), gaps, 1)
  crossing = float(10 ** (-icpt / slope)) if slope else None
  return {"model": "gap = a + b * log10(tokens)", "a": float(icpt), "b": float(slope),
          "crossing_tokens": crossing,
          "direction": ("RETRO falls behind after the crossing" if slope > 0 else
                        "RETRO pulls ahead after the crossing")}


def _fit(rows: list[dict]) -> dict:
  return fit_gap([r["train_tokens"] for r in rows],
                 [_gap(r) for r in rows])


def _gap(row: dict) -> float:
  return row["differences"]["on-baseline"]["all"]["diff"]


def _combined_fit(series: list[tuple[str, list[dict]]]) -> dict | None:
  """One fit over the rows of several schedules; None with fewer than two points."""
  pts = [{"schedule": label, "step": r["step"], "train_tokens": r["train_tokens"], "gap": _gap(r)}
         for label, rows in series for r in rows]
  if len(pts) < 2:
    return None
  return {"points": pts, **fit_gap([p["train_tokens"] for p in pts], [p["gap"] for p in pts])}


def main(argv):
  del argv
  f = FLAGS
  cfg = json.load(open(os.path.join(f.retro, "config.json")))
  exp = cfg["experiment"]
  db = f.db or cfg["db"]
  store = chunk_store_lib.ChunkStore.open(db)
  seq = exp["seq_len"]
  t0 = time.time()
  held = ev.load_heldout(store, db, neighbour_len=cfg["model_config"]["neighbour_len"],
                         max_docs=f.max_docs)
  base_exp = json.load(open(os.path.join(f.baseline, "config.json")))["experiment"]
  out = {**run_provenance("bench.retro_gap_trend"),
         "retro": f.retro, "baseline": f.baseline, "db": db, "seq_len": seq,
         "total_steps": {"retro": exp["total_steps"], "baseline": base_exp["total_steps"]},
         "stride": ev.resolve_stride(seq, f.stride, store.chunk_size),
         "tokens_per_step": exp["global_batch"] * seq, "num_chunks": int(held.chunk_ids_C.size),
         "num_docs": len(held.doc_tokens), "rows": [], "extra": {}}

  same = ("retro", "baseline", "db", "seq_len", "stride", "num_chunks")  # rows keep their modes
  prev = json.load(open(f.out)) if f.resume and os.path.exists(f.out) else {}
  if prev and any(prev.get(k) != out[k] for k in same):
    print(f"--resume: {f.out} scored other runs or settings; scoring everything again")
    prev = {}
  prev_rows = {r["step"]: r for r in prev.get("rows", [])}
  for k in ("scored_tokens_without_retrieval", "shuffled_same_document"):
    if k in prev:
      out[k] = prev[k]

  def score(retro, base, step):
    res = ev.evaluate(retro, step=step, db=db, seq_len=seq, stride=f.stride, held=held,
                      baseline=base, baseline_step=step, progress=False, keep_chunk_losses=False,
                      retrieval=modes)
    out["scored_tokens_without_retrieval"] = res["scored_tokens_without_retrieval"]
    out["shuffled_same_document"] = res.get("shuffled_same_document")
    return res

  modes = ev.parse_modes(f.modes)

  def show(label, row):
    bpbs = " ".join(f"{m} {v:.4f}" for m, v in row["bpb"].items())
    diffs = " ".join(f"{k} {controls.format_diff(v['all'])}" for k, v in row["differences"].items())
    print(f"{label}: {bpbs} | {diffs}", flush=True)

  others = []
  for spec in f.fit_with:
    label, path = spec.split("=", 1)
    path, _, key = path.partition(":")
    other = json.load(open(path))
    others.append((label, (other[key] if key else other)["rows"]))
  this = f"{exp['total_steps']}-step schedule ({f.retro})"

  for spec in f.extra:
    label, retro, base, *step = spec.split(":")
    old = prev.get("extra", {}).get(label)
    if old and old.get("spec") == spec:
      out["extra"][label] = old
    else:
      step = int(step[0]) if step else None
      t1 = time.time()
      res = score(retro, base, step)
      ecfg = json.load(open(os.path.join(retro, "config.json")))["experiment"]
      out["extra"][label] = _row(res, res["step"] * ecfg["global_batch"] * ecfg["seq_len"])
      out["extra"][label].update(spec=spec, eval_s=time.time() - t1,
                                 total_steps=ecfg["total_steps"])  # own schedule, not in the fit
    show(label, out["extra"][label])
  for step in map(int, f.steps):
    if step in prev_rows:
      out["rows"].append(prev_rows[step])
    else:
      t1 = time.time()
      res = score(f.retro, f.baseline, step)
      out["rows"].append(_row(res, step * out["tokens_per_step"]))
      out["rows"][-1]["eval_s"] = time.time() - t1
    show(f"step {step}", out["rows"][-1])
    if len(out["rows"]) >= 2:
      out["fit"] = _fit(out["rows"])
    if len(out["rows"]) >= 3:  # the earliest checkpoint tends to dominate a log fit
      out["fit_without_first"] = _fit(out["rows"][1:])
    if others:
      out["fit_combined"] = _combined_fit([(this, out["rows"])] + others)
    out["wall_s"] = time.time() - t0
    with open(f.out, "w") as fh:
      json.dump(out, fh, indent=1)
  if "fit" in out:
    fit = out["fit"]
    cross = fit["crossing_tokens"]
    print(f"fit: gap = {fit['a']:+.4f} {fit['b']:+.4f} * log10(tokens); crossing at "
          f"{'none' if cross is None else f'{cross:.3g}'} tokens ({fit['direction']})")
  with open(f.out, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"wrote {f.out} ({(time.time() - t0) / 60:.1f} min; shared, loaded machine)")


if __name__ == "__main__":
  app.run(main)
