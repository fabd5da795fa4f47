r"""SmolLM2-135M and its retrofit sample, with and without retrieval, from a fresh clone.

    python -m bench.sample_smollm2   # -> bench/results/sample_smollm2.json, docs/sample_smollm2.md

The README's retrofit sequence, each step the real command in its own process, on a small
database so that it runs in minutes on a CPU (the repository's fixed corpus, tests/data/corpus,
tokenized with SmolLM2's byte-level BPE):
  1. build_db --tokenizer=smollm2        the database
  2. pretrained.export_smollm2           SmolLM2-135M as a step-0 checkpoint (rotary positions,
                                         grouped-query attention, tied embeddings)
  3. retrofit (experiments/retrofit_smollm2.py, a few steps)   CCA layers + the neighbour encoder
  4. sample: the baseline without retrieval; the retrofit with retrieval on and off (greedy)
Then, in this process, the KV-cache decoder's greedy tokens against the full forward's
(`FullRecompute`) for the same three cases.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import app, flags

from bench.common import run_provenance, write_page
from retro_jax.sampling import generate as gen
from retro_jax.training.checkpoint import load_model

_OUT = flags.DEFINE_string("out", "bench/results/sample_smollm2.json", "Results file.")
_DOC = flags.DEFINE_string("doc", "docs/sample_smollm2.md", "The page written from the results.")
_WORK = flags.DEFINE_string("work", "runs/sample_smollm2", "Scratch directory (rebuilt).")
_STEPS = flags.DEFINE_integer("retrofit_steps", 4, "retrofit steps")
_NEW = flags.DEFINE_integer("max_new_tokens", 80, "tokens sampled per case")
_PAGE_ONLY = flags.DEFINE_bool("page_only", False, "write the page from the results file only")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "tests/data/corpus"  # paths relative to the repository, where the commands run
SPEC = f"{CORPUS}/kernel:limit=20+{CORPUS}/wiki.jsonl:limit=40"
PROMPT = ("The Moon is the only natural satellite of the Earth. It orbits at an average distance "
          "of 384,400 km, about 30 times the diameter of the Earth. The Moon")
CASES = (("baseline", False), ("retrofit", True), ("retrofit", False))


def _run(cmd: list[str], timeout_s: float) -> dict:
  """One command in its own process (the repository's code, this interpreter)."""
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=timeout_s)
  secs = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
  return {"command": "python -m " + shlex.join(cmd), "seconds": round(secs, 1),
          "stdout": p.stdout}


def _continuation(stdout: str) -> str:
  """The text `sample` prints after its continuation header."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("=== continuation"))
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("=== ")), len(lines))
  return "\n".join(lines[start + 1:end])


def _cached_equals_full(work: str) -> list[dict]:
  """Greedy tokens of the KV-cache decoder and of the full forward, per case."""
  rows = []
  work = os.path.join(REPO, work)
  db = os.path.join(work, "db")
  retrieval = None
  for name, on in CASES:
    model, config, _ = load_model(os.path.join(work, name))
    if on and retrieval is None:
      retrieval = gen.DatabaseRetrieval.from_db(db, config.num_neighbours, config.neighbour_len)
    fn = retrieval if on else None
    prompt_ids = (retrieval.tokenizer if retrieval else gen.load_db_tokenizer(db)).encode(PROMPT)
    n = 2 * config.chunk_size  # crosses at least one chunk boundary
    cached = gen.generate(model, config, prompt_ids, fn, max_new_tokens=n, temperature=0.0)
    full = gen.FullRecompute(model, config).generate(prompt_ids, fn, n)["new_ids"]
    rows.append({"model": name, "retrieval": on, "positions": config.positions,
                 "kv_heads": config.kv_heads, "heads": config.num_heads, "tokens": n,
                 "prompt_tokens": len(prompt_ids),
                 "cached_equals_full_forward": [int(t) for t in cached.new_ids] == full,
                 "retrievals": len(cached.retrievals)})
  return rows


def measure() -> dict:
  work = _WORK.value  # relative to the repository
  shutil.rmtree(os.path.join(REPO, work), ignore_errors=True)
  os.makedirs(os.path.join(REPO, work))
  db, base, ret = (os.path.join(work, d) for d in ("db", "baseline", "retrofit"))
  steps = [
      _run(["retro_jax.build_db", f"--corpus={SPEC}", "--tokenizer=smollm2", f"--db={db}",
            "--heldout_fraction=0.1", "--docs_per_shard=100"], 1800),
      _run(["retro_jax.pretrained.export_smollm2", f"--workdir={base}", f"--db={db}"], 900),
      _run(["retro_jax.retrofit", "--config=experiments/retrofit_smollm2.py", f"--workdir={ret}",
            f"--config.init_from={base}", f"--config.db={db}",
            f"--config.total_steps={_STEPS.value}", "--config.warmup_steps=1",
            "--config.seq_len=256", "--config.global_batch=1",
            f"--config.checkpoint_every={_STEPS.value}", "--config.log_every=1"], 1800),
  ]
  samples = []
  for name, on in CASES:
    r = _run(["retro_jax.sample", f"--workdir={os.path.join(work, name)}", f"--prompt={PROMPT}",
              f"--retrieval={'on' if on else 'off'}", "--temperature=0",
              f"--max_new_tokens={_NEW.value}", "--show_neighbours"], 900)
    samples.append({"model": name, "retrieval": on, "command": r["command"],
                    "seconds": r["seconds"], "continuation": _continuation(r["stdout"])})
  for s in steps:
    del s["stdout"]
  return {**run_provenance("bench.sample_smollm2"), "corpus": SPEC, "prompt": PROMPT,
          "steps": steps, "samples": samples, "cached_vs_full": _cached_equals_full(work)}


def page(res: dict) -> str:
  lines = [
      "# SmolLM2-135M and its retrofit sample",
      "",
      f"Written by `{res['command']}` from `bench/results/sample_smollm2.json` (commit "
      f"{res['commit'][:12]}, {res['date']}). A fresh database, SmolLM2 exported, retrofitted for "
      "a few steps and sampled greedily, each step the real command in its own process "
      "(`bench/sample_smollm2.py`). Corpus: the repository's fixed test corpus, 20 kernel "
      "documents and 40 Wikipedia leads.",
      "",
      "| step | command | seconds |",
      "|---|---|---:|",
  ]
  for s in res["steps"]:
    lines.append(f"| {s['command'].split()[2]} | `{s['command']}` | {s['seconds']} |")
  lines += ["", "## Samples (greedy)", "", f"Prompt: {res['prompt']!r}", ""]
  for s in res["samples"]:
    text = s["continuation"].replace("\n", " ").replace("|", "\\|")
    lines += [f"**{s['model']}, retrieval {'on' if s['retrieval'] else 'off'}** "
              f"({s['seconds']} s with start-up and compilation): `{s['command']}`", "",
              f"> {text}", ""]
  lines += ["## KV-cache decoding equals the full forward", "",
            "| model | retrieval | positions | heads / key-value heads | tokens | retrievals | "
            "cached = full forward |", "|---|---|---|---|---:|---:|---|"]
  for c in res["cached_vs_full"]:
    lines.append(f"| {c['model']} | {'on' if c['retrieval'] else 'off'} | {c['positions']} | "
                 f"{c['heads']} / {c['kv_heads']} | {c['tokens']} | {c['retrievals']} | "
                 f"{c['cached_equals_full_forward']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not _PAGE_ONLY.value:
    res = measure()
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(res, f, indent=1)
      f.write("\n")
  write_page(_DOC.value, page, _OUT.value)


if __name__ == "__main__":
  app.run(main)
