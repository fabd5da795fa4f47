r"""Scaling curves: bpb against model size (retrieval on / off) and against retrieval-database size.

    python -m retro_jax.scaling --sweep=experiments/sweep_tiny.py --out=runs/scaling

The sweep file holds `train` (an experiment, e.g. experiments/tiny.py's) and `sweep`:
  sizes         name -> RetroConfig overrides (width, depth, CCA layers ...)
  db_fractions  fractions of the training documents that form the retrieval database at evaluation
  eval_max_docs 0 = every held-out document
For every size, the RETRO model and its baseline train on the same data for the same steps
(OUT/<size>/{retro,baseline}, resumable: finished runs are reused), then the held-out documents are
scored (retro_jax.evaluation.bpb): the baseline, RETRO with retrieval off, RETRO with retrieval on at each
database fraction. Writes OUT/scaling.json, OUT/bpb_vs_params.png (the paper's Figure 1 left: bpb
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
    full = held[max(sweep.db_fractions)]
    b = ev.evaluate(os.path.join(out, name, "baseline"), seq_len=seq, stride=stride, held=full,
                    db=base.db)
    entry["baseline"] = b["results"]["off"]["bpb"]
    r = ev.evaluate(os.path.join(out, name, "retro"), seq_len=seq, stride=stride, held=full,
                    db=base.db, retrieval="off")
    entry["retro_off"] = r["results"]["off"]["bpb"]
    entry["retro_on"] = {}
    for frac in sweep.db_fractions:
      r = ev.evaluate(os.path.join(out, name, "retro"), seq_len=seq, stride=stride,
                      held=held[frac], db=base.db, retrieval="on")
      entry["retro_on"][str(frac)] = r["results"]["on"]["bpb"]
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
  fracs = sorted(results["db_tokens"], key=float)
  head = "| size | params (base / RETRO) | baseline | RETRO off | " + " | ".join(
      f"RETRO on, {float(f):.0%} DB" for f in fracs) + " |"
  rows = [head, "|" + "---|" * (4 + len(fracs))]
  for n, e in sorted(results["sizes"].items(), key=lambda kv: kv[1]["baseline_params"]):
    rows.append(f"| {n} | {e['baseline_params'] / 1e6:.2f}M / {e['retro_params'] / 1e6:.2f}M | "
                f"{e['baseline']:.4f} | {e['retro_off']:.4f} | " +
                " | ".join(f"{e['retro_on'][f]:.4f}" for f in fracs) + " |")
  return "\n".join(rows)


def run(sweep_cfg, out: str) -> dict:
  """The sweep, its plots and OUT/scaling.md; returns the results."""
  os.makedirs(out, exist_ok=True)
  results = run_sweep(sweep_cfg, out)
  plot(results, out)
  with open(os.path.join(out, "scaling.md"), "w") as f:
    f.write(table(results) + "\n")
  return results
