r"""The CPU demo (`make demo`): train a tiny RETRO and its baseline, evaluate both, print the table.

    python -m retro_jax.demo [--db=runs/dup_db --out=runs/demo --steps=N]

On the database built by `make dup-db` (both kernel documentation versions: held-out text recurs in
other documents, as on the web): trains experiments/dup_tiny.py with retrieval (RETRO) and without
(the baseline: same decoder, no CCA, no encoder) for the same steps and data, then scores both on
the database's held-out documents (retro_jax.evaluation.bpb: bits-per-byte, windows of seq_len with
stride seq_len - 64, so that every scored chunk but a document's first has its preceding chunk's
neighbours (--stride to change), the leakage filter with the 10 nearest training neighbours), and
writes
  OUT/results.json, OUT/results.md   the table: baseline, RETRO[OFF], RETRO[SHUFFLED] (each chunk
                                     given another held-out document's neighbours, the control of
                                     retro_jax.evaluation.controls), RETRO[ON], each at alpha=100%
                                     and 12.5% and on chunks with overlap >= 50%; and the
                                     differences with 95% intervals (paired bootstrap over
                                     documents)
  OUT/leakage.png                    bpb(alpha) of the four
  OUT/loss.png                       training loss of both
Every stage is restartable: a finished training run is not redone (its checkpoint is reused), a
killed one resumes.
"""
from __future__ import annotations

import json
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from experiments import dup_tiny
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.evaluation.bpb import bpb_at
from retro_jax.training import loop


def _config(db: str, steps: int | None, retrieval: bool):
  c = dup_tiny.get_config()
  c.db = db
  c.retrieval = retrieval
  if steps:
    c.total_steps = steps
    c.warmup_steps = min(c.warmup_steps, max(1, steps // 10))
    c.checkpoint_every = min(c.checkpoint_every, steps)
  return c


def _loss_curve(workdir: str):
  steps, losses = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      steps.append(r["step"])
      losses.append(r["loss"])
  return steps, losses


def plot_losses(runs: dict[str, str], path: str) -> None:
  matplotlib.use("Agg")
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, wd in runs.items():
    s, l = _loss_curve(wd)
    k = max(1, len(l) // 50)
    sm = np.convolve(l, np.ones(k) / k, mode="valid")
    ax.plot(s[k - 1:], sm, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/token)")
  ax.set_title("Tiny RETRO and baseline")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


HIGH = controls.OVERLAP_BINS[-1][0]  # r >= 50%
# (label, a, b) of the differences the demo prints, a - b in bpb (negative: a is better).
DEMO_DIFFERENCES = (("RETRO[ON] - baseline", "on-baseline"), ("RETRO[ON] - RETRO[OFF]", "on-off"),
                    ("RETRO[ON] - RETRO[SHUFFLED]", "on-shuffled"))


def table(rows: list[tuple[str, dict]], differences: dict | None = None) -> str:
  """Rows (name, a `summarise` dict with "bins"); then the differences with 95% intervals."""
  counts = {b: v["chunks"] for b, v in rows[0][1].get("bins", {}).items()}
  n_high = f" ({counts[HIGH]} chunks)" if HIGH in counts else ""
  out = [f"| model | neighbours | bpb, all chunks | bpb, alpha = 12.5% | bpb, overlap >= 50%"
         f"{n_high} |", "|---|---|---|---|---|"]
  for name, r in rows:
    kind = "on" if "ON" in name else "shuffled" if "SHUFFLED" in name else "off"
    high = r.get("bins", {}).get(HIGH, {}).get("bpb")
    out.append(f"| {name} | {kind} | {r['bpb']:.4f} | {bpb_at(r, 0.125):.4f} | "
               f"{'n/a' if high is None else f'{high:.4f}'} |")
  if differences:
    out += ["", "| difference (bpb, 95% interval) | all chunks | alpha <= 12.5% | overlap >= 50% |",
            "|---|---|---|---|"]
    low = controls.OVERLAP_BINS[0][0]
    for label, key in DEMO_DIFFERENCES:
      d = differences[key]
      out.append(f"| {label} | {controls.format_diff(d['all'])} | "
                 f"{controls.format_diff(d[low])} | {controls.format_diff(d[HIGH])} |")
  return "\n".join(out)


def run(db: str | None, out: str, *, steps: int | None = None, max_docs: int | None = None,
        stride: int | None = None) -> dict:
  """Trains both models (or reuses finished runs), evaluates them, writes OUT/results.*; returns
  the summary. `db`: default experiments/dup_tiny.py's."""
  db = db or dup_tiny.get_config().db
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  timings = {}
  runs = {"RETRO": os.path.join(out, "retro"), "baseline": os.path.join(out, "baseline")}
  last = {}
  for name, wd in runs.items():
    t = time.time()
    c = _config(db, steps, retrieval=name == "RETRO")
    print(f"== training {name} ({c.total_steps} steps of {c.global_batch} x {c.seq_len} tokens) "
          f"in {wd}", flush=True)
    last[name] = loop.run(c, wd)
    timings[f"train_{name}_s"] = time.time() - t

  t = time.time()
  store = chunk_store_lib.ChunkStore.open(db)
  c = _config(db, steps, True)
  print("== held-out documents: retrieving the 10 nearest training chunks of every chunk",
        flush=True)
  held = ev.load_heldout(store, db, neighbour_len=c.model_overrides.neighbour_len,
                         max_docs=max_docs)
  timings["retrieve_s"] = time.time() - t
  # Stride = window length - one chunk: every scored chunk gets its preceding chunk's neighbours
  # at 4/3 the cost of no overlap; the paper's 2048 / 1024 is
  # `python -m retro_jax.evaluate --seq_len=2048 --stride=1024`.
  seq = c.seq_len
  stride = ev.resolve_stride(seq, stride or 0, c.model_overrides.chunk_size)
  t = time.time()
  retro = ev.evaluate(runs["RETRO"], seq_len=seq, stride=stride, held=held, db=db,
                      baseline=runs["baseline"])
  timings["evaluate_s"] = time.time() - t
  res = retro["results"]
  rows = [("baseline", res["baseline"]), ("RETRO[OFF]", res["off"]),
          ("RETRO[SHUFFLED]", res["shuffled"]), ("RETRO[ON]", res["on"])]
  ev.plot({n: r for n, r in rows}, os.path.join(out, "leakage.png"),
          title="Held-out bpb against the leakage threshold alpha")
  plot_losses(runs, os.path.join(out, "loss.png"))
  timings["total_s"] = time.time() - t0
  md = table(rows, retro["differences"])
  steps = c.total_steps
  header = (f"Tiny RETRO vs baseline, {steps} steps x {c.global_batch} x {c.seq_len} tokens each, "
            f"held-out: {held.chunk_ids_C.size} chunks of {len(held.doc_tokens)} documents "
            f"({int(held.chunk_bytes_C.sum())} bytes); eval windows {seq}, stride {stride}; "
            f"intervals: paired bootstrap over documents.")
  summary = {"table": {n: {"bpb": r["bpb"], "bpb_alpha_12.5": ev.bpb_at(r, 0.125),
                           "chunks_alpha_12.5": r["chunks_alpha"]["0.1250"],
                           "bins": r["bins"]} for n, r in rows},
             "differences": {label: retro["differences"][key] for label, key in DEMO_DIFFERENCES},
             "final_train_loss": {k: _loss_curve(runs[k])[1][-1] for k in runs},
             "num_chunks": int(held.chunk_ids_C.size), "timings": timings, "header": header,
             "markdown": md,
             "eval": retro}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(header + "\n\n" + md + "\n")
  return summary
