r"""Scaling curves: bpb against model size (retrieval on / off) and against retrieval-database size.

    python -m retro_jax.scaling --config=experiments/sweep_tiny.py --out=runs/scaling

The sweep file holds `train` (an experiment, e.g. experiments/tiny.py's) and `sweep`:
  sizes         name -> RetroConfig overrides (width, depth, CCA layers ...)
  db_fractions  fractions of the training documents that form the retrieval database at evaluation
  eval_max_docs 0 = every held-out document
For every size, the RETRO model and its baseline train on the same data for the same steps
(OUT/<size>/{retro,baseline}, resumable: finished runs are reused), then the held-out documents are
scored (retro_jax.evaluation.bpb): the baseline, RETRO with retrieval off, RETRO with shuffled
neighbours (each chunk given another held-out document's, retro_jax.evaluation.controls) and RETRO
with retrieval on at each database fraction; the differences RETRO on - baseline (every fraction),
on - off and on - shuffled (full database) carry 95% paired-bootstrap intervals over documents.
Windows: the run's seq_len with stride seq_len / 2. Writes OUT/scaling.json, OUT/bpb_vs_params.png (the paper's Figure 1 left: bpb
against non-embedding parameters) and OUT/bpb_vs_db.png (Figure 1 middle: bpb against the number
of tokens in the retrieval database), and prints the table.
"""
from __future__ import annotations

import copy
import json
import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.evaluation import bpb as ev
from retro_jax.evaluation import controls
from retro_jax.model import Retro
from retro_jax.model.retro import count_params
from retro_jax.training import experiment, loop


def run_sweep(cfg, out: str) -> dict:



  base = cfg.train
  sweep = cfg.sweep
  store = chunk_store_lib.ChunkStore.open(base.db)
  train_docs = ~store.doc_heldout
  train_tokens = int(np.sum(store.doc_num_chunks[train_docs])) * store.chunk_size
  seq, stride = base.seq_len, base.seq_len // 2
  max_docs = sweep.eval_max_docs or None
  held = {}
  results = {"db": base.db, "steps": base.total_steps, "global_batch": base.global_batch,
             "seq_len": seq, "stride": stride, "sizes": {}}
  t0 = time.time()
  for name, over in sweep.sizes.items():
    entry = {}
    for kind in ("retro", "baseline"):
      c = copy.deepcopy(base)
      c.retrieval = kind == "retro"
      for k, v in dict(over).items():
        c.model_overrides[k] = v
      wd = os.path.join(out, name, kind)
      print(f"== {name} {kind}: training {c.total_steps} steps in {wd}", flush=True)
      loop.run(c, wd)
      cfg_model = experiment.model_config(c)
      entry[f"{kind}_params"] = count_params(nnx.eval_shape(
          lambda cm=cfg_model: Retro(cm, rngs=nnx.Rngs(0))))
    for frac in sweep.db_fractions:
      if frac not in held:
        print(f"== held-out retrieval with {frac:.0%} of the training documents", flush=True)
        held[frac] = ev.load_heldout(store, base.db, db_fraction=frac,
                                     neighbour_len=base.model_overrides.neighbour_len,
                                     max_docs=max_docs)
    top = max(sweep.db_fractions)
    full = held[top]
    r = ev.evaluate(os.path.join(out, name, "retro"), seq_len=seq, stride=stride, held=full,
                    db=base.db, baseline=os.path.join(out, name, "baseline"))
    entry["baseline"] = r["results"]["baseline"]["bpb"]
    entry["retro_off"] = r["results"]["off"]["bpb"]
    entry["retro_shuffled"] = r["results"]["shuffled"]["bpb"]
    entry["differences"] = {k: r["differences"][k] for k in ("on-off", "on-shuffled")}
    entry["differences"]["on-baseline"] = {}
    base_C = np.asarray(r["chunk_loss_nats"]["baseline"])
    doc_C = controls.doc_of_row(full.doc_first_row, len(full.chunk_ids_C))
    entry["retro_on"] = {}
    for frac in sweep.db_fractions:
      if frac == top:
        on_C = np.asarray(r["chunk_loss_nats"]["on"])
      else:
        on_C = np.asarray(ev.evaluate(
            os.path.join(out, name, "retro"), seq_len=seq, stride=stride, held=held[frac],
            db=base.db, retrieval="on")["chunk_loss_nats"]["on"])
      entry["retro_on"][str(frac)] = float(on_C.sum() / np.log(2) / full.chunk_bytes_C.sum())
      entry["differences"]["on-baseline"][str(frac)] = controls.compare(
          on_C, base_C, full.chunk_bytes_C, doc_C, held[frac].leakage_C)
    results["sizes"][name] = entry
    with open(os.path.join(out, "scaling.json"), "w") as f:
      json.dump(results, f, indent=1)
  results["db_tokens"] = {str(f): int(train_tokens * f) for f in sweep.db_fractions}
  results["wall_s"] = time.time() - t0
  with open(os.path.join(out, "scaling.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def plot(results: dict, out: str) -> None:
  matplotlib.use("Agg")
  sizes = results["sizes"]
  names = sorted(sizes, key=lambda n: sizes[n]["baseline_params"])
  full = max(results["db_tokens"], key=float)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([sizes[n]["baseline_params"] for n in names], [sizes[n]["baseline"] for n in names],
          "o-", label="baseline")
  ax.plot([sizes[n]["retro_params"] for n in names], [sizes[n]["retro_on"][full] for n in names],
          "s-", label="RETRO, retrieval on")
  ax.plot([sizes[n]["retro_params"] for n in names], [sizes[n]["retro_off"] for n in names],
          "^--", label="RETRO, retrieval off")
  if all("retro_shuffled" in sizes[n] for n in names):
    ax.plot([sizes[n]["retro_params"] for n in names], [sizes[n]["retro_shuffled"] for n in names],
            "x:", label="RETRO, shuffled neighbours")
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters")
  ax.set_ylabel("held-out bits per byte")
  ax.set_title("bpb against model size")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "bpb_vs_params.png"), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  fracs = sorted(results["db_tokens"], key=float)
  for n in names:
    line, = ax.plot([results["db_tokens"][f] for f in fracs],
                    [sizes[n]["retro_on"][f] for f in fracs], "s-", label=f"RETRO {n}")
    ax.axhline(sizes[n]["baseline"], color=line.get_color(), ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("tokens in the retrieval database")
  ax.set_ylabel("held-out bits per byte")
  ax.set_title("bpb against database size (dotted: baselines)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "bpb_vs_db.png"), dpi=120)
  plt.close(fig)


def table(results: dict) -> str:
  """bpb per size and database fraction, then the differences with 95% intervals."""
  fracs = sorted(results["db_tokens"], key=float)
  head = "| size | params (base / RETRO) | baseline | RETRO off | RETRO shuffled | " + " | ".join(
      f"RETRO on, {float(f):.0%} DB" for f in fracs) + " |"
  rows = [head, "|" + "---|" * (5 + len(fracs))]
  ordered = sorted(results["sizes"].items(), key=lambda kv: kv[1]["baseline_params"])
  for n, e in ordered:
    shuffled = e.get("retro_shuffled")
    rows.append(f"| {n} | {e['baseline_params'] / 1e6:.2f}M / {e['retro_params'] / 1e6:.2f}M | "
                f"{e['baseline']:.4f} | {e['retro_off']:.4f} | "
                f"{'n/a' if shuffled is None else f'{shuffled:.4f}'} | " +
                " | ".join(f"{e['retro_on'][f]:.4f}" for f in fracs) + " |")
  if all("differences" in e for _, e in ordered):
    full = max(fracs, key=float)
    rows += ["", "| size | on - baseline | on - off | on - shuffled | on - baseline, overlap >= 50% "
             "|", "|---|---|---|---|---|"]
    for n, e in ordered:
      d = e["differences"]
      rows.append(f"| {n} | {controls.format_diff(d['on-baseline'][full]['all'])} | "
                  f"{controls.format_diff(d['on-off']['all'])} | "
                  f"{controls.format_diff(d['on-shuffled']['all'])} | "
                  f"{controls.format_diff(d['on-baseline'][full][controls.OVERLAP_BINS[-1][0]])} |")
  return "\n".join(rows)


def run(sweep_cfg, out: str) -> dict:
  """The sweep, its plots and OUT/scaling.md; returns the results."""
  os.makedirs(out, exist_ok=True)
  results = run_sweep(sweep_cfg, out)
  plot(results, out)
  with open(os.path.join(out, "scaling.md"), "w") as f:
    f.write(table(results) + "\n")
  return results
