r"""The database build as a Beam pipeline against the plain stage-by-stage build it replaced.

    python -m bench.beam_build --beam_db=runs/beam_default_db --reference_db=REF_DB \
        --old_code=/tmp/old_code --old_python=OLD_VENV/bin/python [--repeats=2 --max_docs=N]

1. Same bytes: every file of the chunk store of `--beam_db` (built by `make db` with
   `DB_FLAGS=--tokenizer=REF_DB/tokenizer/spm.model`) against `--reference_db` (the same corpus
   built by the code before the pipeline), by sha256.
2. Training neighbours against exact search: for `--queries` chunks (a seeded sample), exact
   top-k by brute-force dot product over every embedding with the build's exclusions (the
   query's own document and the held-out documents); recall@k of the stored neighbours.
3. Whole build time on this machine: the old command (`--old_code`, run by `--old_python`) and
   the Beam build (local runner, one worker process per core) on the same corpus and the same
   tokenizer, alternating `--repeats` times into fresh directories; best of each and the ratio.
   The machine is shared: read the ratio, not the absolute seconds.
4. With `--stages=index,neighbours` (and `--old_code`), only those stages: each run copies the
   reference database's tokenizer, chunk store and embeddings into a fresh directory under
   `--work` and runs `build_db --stages=...` there, the old code and the Beam transforms (the
   global index as TrainOnSample / EncodeShard / MergeServingShard, the neighbours as the routed
   batch job) alternating `--repeats` times; per-stage seconds, the ratio, whether the two give
   the same bytes, and recall@2 of the new neighbours against exact search. Results:
   `--out` (bench/results/beam_index_neighbours.json).
Results: bench/results/beam_build.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from bench.common import run_provenance
from retro_jax.build import neighbours as neighbours_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout

FLAGS = flags.FLAGS
flags.DEFINE_string("beam_db", "runs/beam_default_db", "database built by the Beam pipeline")
flags.DEFINE_string("reference_db", "runs/default_db", "the same corpus built before")
flags.DEFINE_integer("queries", 2000, "query chunks for the neighbours recall")
flags.DEFINE_string("old_code", None, "a checkout of the code before the pipeline (skip 3 if unset)")
flags.DEFINE_string("old_python", sys.executable, "python that runs --old_code")
flags.DEFINE_string("corpus", "default", "corpus of the timed builds")
flags.DEFINE_integer("max_docs", None, "first N documents of the timed builds")
flags.DEFINE_integer("repeats", 2, "alternating builds of each kind")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Beam local worker processes")
flags.DEFINE_string("work", "/tmp/beam_build_bench", "scratch directory of the timed builds")
flags.DEFINE_string("out", "bench/results/beam_build.json", "results file")
flags.DEFINE_list("stages", None, "time only these stages (4. above) on copies of --reference_db")


def _digests(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def same_files(beam_db: pathlib.Path, ref_db: pathlib.Path) -> dict:
  """Every file of the two databases but build_times.json, by sha256 (the global index's
  manifest records its build times, so it is compared without them)."""
  a, b = _digests(beam_db), _digests(ref_db)
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != layout.BUILD_TIMES)
  manifest = "index/global/manifest.json"
  if manifest in differ:
    m = [json.loads((d / manifest).read_text()) for d in (beam_db, ref_db)]
    for x in m:
      x.pop("build_seconds", None)
    if m[0] == m[1]:
      differ.remove(manifest)
  return {"files": len(b) - 1, "differing_files": differ, "byte_identical": not differ}


def same_chunk_store(beam_db: pathlib.Path, ref_db: pathlib.Path) -> dict:
  a, b = _digests(beam_db / layout.CHUNKS_DIR), _digests(ref_db / layout.CHUNKS_DIR)
  differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return {"files": len(b), "bytes": sum((ref_db / layout.CHUNKS_DIR / k).stat().st_size for k in b),
          "differing_files": differ, "byte_identical": not differ and a == b}


def neighbours_recall(db: pathlib.Path, queries: int, seed: int = 0) -> dict:
  store = chunk_store_lib.ChunkStore.open(db)
  arrays, offsets = neighbours_lib.open_neighbours(db, store)
  k = arrays[0].shape[1]
  emb_NxD = np.concatenate([np.load(layout.embeddings_path(db, s), mmap_mode="r")
                            for s, _, _ in store.shard_spans()]).astype(np.float32)
  n = emb_NxD.shape[0]
  docs_N = np.asarray(store.doc_ids(np.arange(n, dtype=np.int64)), np.int64)
  banned_N = np.isin(docs_N, store.heldout_doc_ids)
  q_ids = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
  stored_QxK = np.concatenate([
      arrays[int(np.searchsorted(offsets, i, side="right") - 1)][
          i - offsets[np.searchsorted(offsets, i, side="right") - 1]][None] for i in q_ids])
  hits = 0
  for start in range(0, len(q_ids), 256):
    ids = q_ids[start:start + 256]
    scores = emb_NxD[ids] @ emb_NxD.T
    scores[banned_N[None, :] | (docs_N[None, :] == docs_N[ids][:, None])] = -np.inf
    exact = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    got = stored_QxK[start:start + 256]
    hits += sum(len(set(e.tolist()) & set(g.tolist())) for e, g in zip(exact, got))
  return {"queries": len(q_ids), "k": k, f"recall@{k}": hits / (len(q_ids) * k),
          "num_chunks": n}


def _run(cmd: list[str], env: dict, log: pathlib.Path) -> float:
  t0 = time.perf_counter()
  with log.open("w") as f:  # cwd: `python -m` imports the package from the working directory
    subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True,
                   cwd=env["PYTHONPATH"])
  return time.perf_counter() - t0


def timed_builds(tokenizer: str, out: dict) -> dict:
  work = pathlib.Path(FLAGS.work)
  work.mkdir(parents=True, exist_ok=True)
  common = [f"--corpus={FLAGS.corpus}", f"--tokenizer={tokenizer}"]
  if FLAGS.max_docs:
    common.append(f"--max_docs={FLAGS.max_docs}")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  old_env = {**env, "PYTHONPATH": FLAGS.old_code}
  new_env = {**env, "PYTHONPATH": os.getcwd()}
  runs = {"old": [], "beam": []}
  stages = {"old": [], "beam": []}
  for r in range(FLAGS.repeats):
    for kind in ("old", "beam"):
      db = work / f"{kind}_{r}"
      shutil.rmtree(db, ignore_errors=True)
      if kind == "old":
        cmd = [FLAGS.old_python, "-m", "retro_jax.build_db", f"--db={db}", *common]
        seconds = _run(cmd, old_env, work / f"{kind}_{r}.log")
      else:
        cmd = [sys.executable, "-m", "retro_jax.build_db", f"--db={db}", *common,
               "--runner=DirectRunner", "--direct_running_mode=multi_processing",
               f"--direct_num_workers={FLAGS.workers}"]
        seconds = _run(cmd, new_env, work / f"{kind}_{r}.log")
      times = json.loads((db / layout.BUILD_TIMES).read_text())
      runs[kind].append(seconds)
      stages[kind].append({s: round(v["seconds"], 1) for s, v in times["stages"].items()})
      print(f"{kind} build {r}: {seconds:.1f} s {stages[kind][-1]}", flush=True)
      out["timed"] = {"wall_seconds": runs, "stage_seconds": stages, "finished": False}
      out["provenance"] = run_provenance("bench.beam_build")
      pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=1) + "\n")  # after every build
      if r:  # the first of each kind is kept for the chunk-store comparison
        shutil.rmtree(db, ignore_errors=True)
  best = {k: min(v) for k, v in runs.items()}
  return {"finished": True, "corpus": FLAGS.corpus, "max_docs": FLAGS.max_docs, "workers": FLAGS.workers,
          "wall_seconds": runs, "stage_seconds": stages, "best_seconds": best,
          "beam_over_old": best["beam"] / best["old"],
          "same_chunk_store_as_old": same_chunk_store(work / "beam_0", work / "old_0")
          if (work / "old_0").exists() else None}


def _copy_inputs(ref_db: pathlib.Path, db: pathlib.Path, stages: list[str]) -> None:
  """The reference database but the given stages' outputs and provenance records."""
  shutil.rmtree(db, ignore_errors=True)
  db.mkdir(parents=True)
  for sub in ("tokenizer", layout.CHUNKS_DIR, layout.EMBEDDINGS_DIR):
    shutil.copytree(ref_db / sub, db / sub)
  (db / "provenance").mkdir()
  for rec in (ref_db / "provenance").iterdir():
    if rec.stem not in stages:
      shutil.copy(rec, db / "provenance" / rec.name)


def timed_stages(ref_db: pathlib.Path, stages: list[str]) -> dict:
  work = pathlib.Path(FLAGS.work)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  seconds: dict[str, list] = {"old": [], "beam": []}
  for r in range(FLAGS.repeats):
    for kind in ("old", "beam"):
      db = work / f"stages_{kind}_{r}"
      _copy_inputs(ref_db, db, stages)
      cmd = [FLAGS.old_python if kind == "old" else sys.executable, "-m", "retro_jax.build_db",
             f"--db={db}", f"--stages={','.join(stages)}"]
      if kind == "beam":
        cmd += ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                f"--direct_num_workers={FLAGS.workers}"]
      wall = _run(cmd, {**env, "PYTHONPATH": FLAGS.old_code if kind == "old" else os.getcwd()},
                  work / f"stages_{kind}_{r}.log")
      times = json.loads((db / layout.BUILD_TIMES).read_text())["stages"]
      seconds[kind].append({"wall": round(wall, 2),
                            **{s: round(times[s]["seconds"], 2) for s in stages}})
      print(f"{kind} {r}: {seconds[kind][-1]}", flush=True)
  best = {k: {s: min(x[s] for x in v) for s in ["wall", *stages]} for k, v in seconds.items()}
  old, new = work / "stages_old_0", work / "stages_beam_0"
  same = {}
  for s in stages:
    if s == "index":
      same[s] = _same_index(new, old)
      continue
    a, b = _digests(new / s), _digests(old / s)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    same[s] = {"files": len(b), "differing_files": differ, "byte_identical": not differ}
  return {"stages": stages, "workers": FLAGS.workers, "seconds": seconds, "best_seconds": best,
          "beam_over_old": {s: round(best["beam"][s] / best["old"][s], 3)
                            for s in ["wall", *stages]},
          "same_bytes_as_old": same,
          "neighbours_beam": neighbours_recall(new, FLAGS.queries) if "neighbours" in stages
          else None,
          "neighbours_old": neighbours_recall(old, FLAGS.queries) if "neighbours" in stages
          else None}


def _same_index(a: pathlib.Path, b: pathlib.Path) -> dict:
  """The global indexes' files by sha256, their manifests without build times."""
  a, b = a / "index" / "global", b / "index" / "global"
  da, db_ = _digests(a), _digests(b)
  differ = sorted(k for k in set(da) | set(db_) if da.get(k) != db_.get(k) and k != "manifest.json")
  m = [json.loads((d / "manifest.json").read_text()) for d in (a, b)]
  for x in m:
    x.pop("build_seconds", None)
  if m[0] != m[1]:
    differ.append("manifest.json")
  return {"files": len(db_), "differing_files": differ, "byte_identical": not differ}


def main(argv) -> None:
  del argv
  if FLAGS.stages:
    out = {"machine": {"cpus": os.cpu_count(), "note": "shared, loaded machine: compare ratios"},
           "reference_db": FLAGS.reference_db, "old_code": FLAGS.old_code,
           "timed": timed_stages(pathlib.Path(FLAGS.reference_db), FLAGS.stages)}
    out["provenance"] = run_provenance("bench.beam_build")
    pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["timed"]["beam_over_old"]), flush=True)
    return
  beam_db, ref_db = pathlib.Path(FLAGS.beam_db), pathlib.Path(FLAGS.reference_db)
  out = {"machine": {"cpus": os.cpu_count(), "note": "shared, loaded machine: compare ratios"},
         "beam_db": str(beam_db), "reference_db": str(ref_db)}
  if FLAGS.old_code:
    out["timed"] = timed_builds(str(ref_db / layout.TOKENIZER_PATH), out)
    print("timed:", {k: out["timed"][k] for k in ("best_seconds", "beam_over_old")}, flush=True)
    if not (beam_db / layout.CHUNKS_DIR).exists():  # compare the first timed Beam build (kept)
      beam_db = pathlib.Path(FLAGS.work) / "beam_0"
      out["beam_db"] = str(beam_db)
  if (beam_db / layout.CHUNKS_DIR).exists():
    out["chunk_store"] = same_chunk_store(beam_db, ref_db)
    print("chunk store:", out["chunk_store"], flush=True)
    out["whole_database"] = same_files(beam_db, ref_db)
    print("whole database:", out["whole_database"], flush=True)
    out["neighbours"] = neighbours_recall(beam_db, FLAGS.queries)
    print("neighbours:", out["neighbours"], flush=True)
    times = json.loads((beam_db / layout.BUILD_TIMES).read_text())
    ref_times = json.loads((ref_db / layout.BUILD_TIMES).read_text())
    out["full_builds"] = {
        "beam": {s: round(v["seconds"], 1) for s, v in times["stages"].items()},
        "reference": {s: round(v["seconds"], 1) for s, v in ref_times["stages"].items()},
        "note": "each measured on its own at a different time (load differs); see timed"}
  out["provenance"] = run_provenance("bench.beam_build")
  pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
