r"""What the tokenizer stage costs at any size: its two parts, measured in CPU seconds.

    python -m bench.tokenizer_cost [--corpus=default] [--out=bench/results/tokenizer_cost.json]

The tokenizer stage of a large corpus (retro_jax/build/pipeline.py) counts the training lines of
every document in parallel (ranges of TOKENIZER_RANGE_DOCS documents), picks the sample, then
trains SentencePiece on at most prepare.INPUT_SENTENCE_SIZE lines in one element. The first part
grows with the corpus, the second does not. Measured here:
  count   the corpus's documents read, decoded and checked, and their lines as
          `tokenizer.training_sentences` yields them: documents and bytes per CPU second (one
          process);
  train   SentencePiece on INPUT_SENTENCE_SIZE lines (the corpus's own lines, cycled when it has
          fewer; the database's vocabulary size): CPU seconds (every thread) and wall seconds.
CPU seconds (getrusage of this process, every thread included) do not depend on what else runs
on the machine; wall seconds do, and the record keeps the load average beside them.
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import tempfile
import time

from absl import app, flags

from retro_jax.db import corpus as corpus_lib
from retro_jax.db import prepare as prepare_lib
from retro_jax.db import tokenizer as tokenizer_lib
from retro_jax.evaluation.figures import provenance

_CORPUS = flags.DEFINE_string("corpus", "default", "Corpus spec whose documents are counted.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192,
                              "The tokenizer's vocabulary (build_db's default).")
_THREADS = flags.DEFINE_integer("threads", 2, "SentencePiece training threads.")
_OUT = flags.DEFINE_string("out", "bench/results/tokenizer_cost.json", "Output JSON.")


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv):
  del argv
  c0, w0 = cpu_seconds(), time.perf_counter()
  docs = corpus_lib.read_documents(_CORPUS.value)  # read, decoded and checked
  texts = [d.text for d in docs]
  lines = list(tokenizer_lib.training_sentences(texts))
  count_cpu, count_wall = cpu_seconds() - c0, time.perf_counter() - w0
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  k = prepare_lib.INPUT_SENTENCE_SIZE
  sample = list(itertools.islice(itertools.cycle(lines), k))
  with tempfile.TemporaryDirectory() as tmp:
    load0 = os.getloadavg()
    c0, w0 = cpu_seconds(), time.perf_counter()
    tokenizer_lib.train_sentencepiece((), os.path.join(tmp, "spm.model"),
                                      vocab_size=_VOCAB.value, input_sentence_size=k,
                                      num_threads=_THREADS.value, lines=sample)
    train_cpu, train_wall = cpu_seconds() - c0, time.perf_counter() - w0
  out = {"corpus": _CORPUS.value, "documents": len(docs), "bytes": num_bytes,
         "corpus_lines": len(lines),
         "count": {"cpu_seconds": count_cpu, "wall_seconds": count_wall,
                   "documents_per_cpu_second": len(docs) / count_cpu,
                   "bytes_per_cpu_second": num_bytes / count_cpu},
         "train": {"lines": k, "distinct_lines": min(k, len(lines)), "vocab_size": _VOCAB.value,
                   "threads": _THREADS.value, "cpu_seconds": train_cpu,
                   "wall_seconds": train_wall,
                   "load_average_start": [round(x, 2) for x in load0],
                   "load_average_end": [round(x, 2) for x in os.getloadavg()]},
         "cores": os.cpu_count(),
         "provenance": provenance("python -m bench.tokenizer_cost " + " ".join(sys.argv[1:]))}
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
  print(json.dumps({k: out[k] for k in ("documents", "corpus_lines", "count", "train")}, indent=1))


if __name__ == "__main__":
  app.run(main)
