r"""Generate text with RETRO, retrieving afresh at every chunk boundary.

    python -m retro_jax.sample --checkpoint=runs/tiny_retro --prompt="The kernel's page cache" \
        [--max_new_tokens=128 --temperature=0.8 --top_p=0.9 --seed=0] \
        [--num_neighbours=2 --retrieval=true --show_neighbours] \
        [--db=DIR (default: the database the checkpoint was trained on)] \
        [--retrieval_service=127.0.0.1:50051,127.0.0.1:50052 (shard servers instead of in-process)]

Every time a chunk of m tokens completes (the prompt's chunks, then generated ones), its text is
embedded with the database's embedder, the k nearest database chunks are searched, and each is fed
to the model with its continuation (r tokens): see retro_jax/generate.py. --show_neighbours prints
every query chunk and, per neighbour, its score, chunk id, document id and key, and text.
Without --checkpoint, --config=NAME (a PAPER_SIZES name) builds a randomly initialised model sized
to the database (its vocabulary and chunk size), for trying the pipeline out.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


class SampleError(ValueError):
  """Bad sampling flags."""


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ dir) to load.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("config", None, "Without --checkpoint: a PAPER_SIZES name for a randomly "
                      "initialised model (vocabulary and chunk size taken from --db).")
  flags.DEFINE_string("db", None, "Retrieval database (default: the checkpoint's training db).")
  flags.DEFINE_string("prompt", None, "Prompt text.")
  flags.DEFINE_string("prompt_file", None, "Read the prompt from this file instead.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
  flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("num_neighbours", None, "Neighbours per chunk (default: the model's k).")
  flags.DEFINE_boolean("retrieval", True, "Retrieve (RETRO[ON]) or not (RETRO[OFF]).")
  flags.DEFINE_boolean("show_neighbours", False, "Print each query chunk and its neighbours with "
                       "their documents.")
  flags.DEFINE_boolean("stop_at_eos", True, "Stop after the end-of-document token.")
  flags.DEFINE_string("backend", None, "In-process index backend under DB/index/ (default: the one built).")
  flags.DEFINE_list("retrieval_service", None, "host:port of every shard server "
                    "(retro_jax.retrieval.serve); default: search in-process.")
  flags.DEFINE_float("service_timeout_s", 10.0, "Deadline of each service search.")


def load_checkpoint(path: str, step: int | None):
  """(model, config, info) of a training checkpoint; info["db"] is its database. The one place
  that loads checkpoints for sampling."""
  from retro_jax.checkpoint import load_model
  return load_model(path, step=step)


def random_model(name: str, db: str):
  """A randomly initialised PAPER_SIZES[name], sized to the database's vocabulary and chunks."""
  from flax import nnx

  from retro_jax.data.chunk_store import ChunkStore
  from retro_jax.model import PAPER_SIZES, Retro
  if name not in PAPER_SIZES:
    raise SampleError(f"--config={name!r}: expected one of {sorted(PAPER_SIZES)}")
  store = ChunkStore.open(db)
  m = store.chunk_size
  config = PAPER_SIZES[name].replace(vocab_size=int(store.manifest["tokenizer"]["vocab_size"]),
                                     chunk_size=m, neighbour_len=2 * m)
  return Retro(config, rngs=nnx.Rngs(0)), config, {"db": db, "step": None}


def _one_line(text: str, limit: int = 300) -> str:
  text = text.replace("\n", "\\n")
  return text if len(text) <= limit else text[:limit] + "..."


def run(argv_flags=FLAGS, out=sys.stdout) -> dict:
  f = argv_flags
  if (f.prompt is None) == (f.prompt_file is None):
    raise SampleError("give exactly one of --prompt or --prompt_file")
  prompt = f.prompt if f.prompt is not None else open(f.prompt_file).read()
  if f.checkpoint:
    model, config, info = load_checkpoint(f.checkpoint, f.step)
  elif f.config:
    if not f.db:
      raise SampleError("--config builds a random model sized to a database: pass --db too")
    model, config, info = random_model(f.config, f.db)
  else:
    raise SampleError("pass --checkpoint=WORKDIR (or --config=NAME --db=DIR for a random model)")
  db = f.db or info.get("db")
  if not db:
    raise SampleError("the checkpoint records no database; pass --db=DIR")
  from retro_jax import generate as gen
  k = f.num_neighbours or config.num_neighbours
  searcher = None
  if f.retrieval and f.retrieval_service:
    from retro_jax.retrieval.client import ServiceRetriever
    searcher = ServiceRetriever(f.retrieval_service, timeout_s=f.service_timeout_s)
  retrieval = gen.DatabaseRetrieval.from_db(db, k, config.neighbour_len, searcher=searcher,
                                            backend=f.backend) if f.retrieval else None
  if retrieval is None:  # the tokenizer only
    from retro_jax.data.prepare import load_db_tokenizer
    tokenizer = load_db_tokenizer(db)  # SentencePiece or byte-level BPE
  else:
    retrieval.check_model(config)
    tokenizer = retrieval.tokenizer
  if not config.retrieval and retrieval is not None:
    raise SampleError("this model has no CCA layers (a baseline): pass --retrieval=false")
  prompt_ids = tokenizer.encode(prompt)
  t0 = time.perf_counter()
  result = gen.generate(model, config, prompt_ids, retrieval, max_new_tokens=f.max_new_tokens,
                        temperature=f.temperature, top_p=f.top_p, seed=f.seed,
                        eos_id=tokenizer.eos_id if f.stop_at_eos else None, num_neighbours=k)
  total = time.perf_counter() - t0
  ids = [t for t in result.new_ids if t != tokenizer.eos_id]
  continuation = tokenizer.decode_fragment(ids)
  n = len(result.new_ids)
  print("=== prompt ===", file=out)
  print(tokenizer.decode(prompt_ids), file=out)
  print(f"=== continuation (retrieval {'on' if retrieval else 'off'}, {n} tokens, "
        f"{n / total:.1f} tokens/s incl. compile) ===", file=out)
  print(continuation, file=out)
  if f.show_neighbours and retrieval is not None:
    m = config.chunk_size
    print("=== neighbours ===", file=out)
    for r, (query, chunks) in zip(result.retrievals, retrieval.history):
      u = r.chunk_index
      print(f"chunk {u} (tokens {u * m}-{(u + 1) * m - 1}) query: {_one_line(query)!r}", file=out)
      for j, c in enumerate(chunks):
        print(f"  [{j + 1}] score {c.score:.3f} doc {c.doc_id} {c.doc_key!r} chunk {c.chunk_id}: "
              f"{_one_line(c.text)!r}", file=out)
  return {"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": continuation,
          "retrievals": len(result.retrievals), "seconds": result.seconds}


def main(argv):
  del argv
  try:
    run()
  except (SampleError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
