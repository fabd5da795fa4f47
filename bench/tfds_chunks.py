r"""The Beam chunks stage reading a TFDS ArrayRecord corpus by random access, against the same
documents read whole (the embedded default corpus).

    python -m bench.tfds_chunks [--tokenizer=runs/default_db/tokenizer/spm.model --repeats=2]

1. Writes the default corpus's documents (keys kept) as a TFDS dataset in ArrayRecord format
   (retro_jax/db/tfds_writer.py) under --work.
2. Classifies every record by random access (`corpus.scan_block`, one process): records/s.
3. Builds the chunk store with the Beam pipeline (tokenizer given, local in-process runner) from
   `tfds:...&key_field=key` (each shard reads only its records) and from `default` (the whole
   corpus read by the planner and the worker), alternating --repeats times; checks every shard
   file is the same bytes; best stage seconds of each and the ratio.
The machine is shared: read the ratios, not the absolute seconds. Results:
bench/results/tfds_chunks.json.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time

from absl import app, flags

from retro_jax.build import stages as build_lib
from retro_jax.db import corpus, layout, tfds_writer
from bench.common import run_provenance

_TOKENIZER = flags.DEFINE_string("tokenizer", "runs/default_db/tokenizer/spm.model",
                                 "the default database's SentencePiece model")
_REPEATS = flags.DEFINE_integer("repeats", 2, "alternating builds of each kind")
_WORK = flags.DEFINE_string("work", "/tmp/tfds_chunks_bench", "scratch directory")
_OUT = flags.DEFINE_string("out", "bench/results/tfds_chunks.json", "results file")


def _shard_digests(chunks_dir: str) -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(chunks_dir):
    for f in files:
      if base != chunks_dir:  # shard files; markers and manifest record the corpus spec
        p = os.path.join(base, f)
        out[os.path.relpath(p, chunks_dir)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def main(argv):
  del argv
  load_start = os.getloadavg()[0]
  work = _WORK.value
  shutil.rmtree(work, ignore_errors=True)
  docs = corpus.read_documents("default")
  data_dir = os.path.join(work, "data")
  t0 = time.perf_counter()
  ds_dir = tfds_writer.write_text_dataset(data_dir, "default_corpus",
                                          {"train": [(d.key, d.text) for d in docs]})
  write_s = time.perf_counter() - t0
  ds_bytes = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(ds_dir) for f in fs)
  spec = f"tfds:default_corpus?split=train&data_dir={data_dir}&key_field=key"
  parts = corpus.random_access_parts(spec)
  t0 = time.perf_counter()
  scans = [corpus.scan_block(parts, b) for b in corpus.scan_blocks(parts, None)]
  scan_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  selection = corpus.select_documents(spec, parts, scans, None)
  select_s = time.perf_counter() - t0
  assert selection.num_docs == len(docs)

  settings = dict(tokenizer=os.path.abspath(_TOKENIZER.value))
  seconds: dict[str, list[float]] = {"tfds": [], "default": []}
  digests = {}
  for r in range(_REPEATS.value):
    for kind, corpus_spec in (("tfds", spec), ("default", "default"))[::1 if r % 2 == 0 else -1]:
      db = os.path.join(work, f"{kind}_{r}")
      record = build_lib.build(db, stages=("tokenizer", "chunks"), corpus=corpus_spec, **settings)
      seconds[kind].append(record["stages"]["chunks"]["build_seconds"])
      digests[kind] = _shard_digests(os.path.join(db, layout.CHUNKS_DIR))
  num_chunks = json.load(open(os.path.join(work, "tfds_0", layout.CHUNKS_DIR,
                                           "manifest.json")))["num_chunks"]
  best = {k: min(v) for k, v in seconds.items()}
  out = {
      "documents": len(docs), "chunks": num_chunks,
      "tfds_dataset": {"write_seconds": write_s, "bytes": ds_bytes,
                       "bytes_per_document": ds_bytes / len(docs)},
      "classify_records_per_second_one_process": len(docs) / scan_s,
      "select_seconds": select_s,
      "chunks_stage_seconds": seconds, "best_seconds": best,
      "tfds_over_whole_read": best["tfds"] / best["default"],
      "chunks_per_second_tfds_one_process": num_chunks / best["tfds"],
      "same_shard_files": digests["tfds"] == digests["default"],
      "shard_files": len(digests["tfds"]),
      "runner": "local in-process (the chunks stage runs in the launching process locally); "
                "SentencePiece encodes with every core (2)",
      "machine": f"x86_64, {os.cpu_count()} cores, shared with other jobs: compare within "
                 "this run",
      "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
  }
  out["provenance"] = run_provenance("bench.tfds_chunks")
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
