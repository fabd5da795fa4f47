r"""A fact only the database holds: completed with retrieval on, not off, and gone after removal.

1. Copies DB to SCRATCH/db (the edits below never touch DB).
2. Adds one new document of invented facts (`FACT`, or `--fact_file`) with
   `edit_db.add_documents`: a new shard with its chunks, embeddings, index and neighbours. The model
   never trained on it, so whatever it completes from it came through retrieval.
3. Prompts with the document's first chunk and decodes greedily with the KV cache, retrieving at
   every completed chunk (the query is the last complete chunk; its neighbour is that chunk plus
   its continuation), with retrieval on and off; the neighbours are printed with their documents.
4. Removes the document (`edit_db.remove_documents`) and decodes again with retrieval on.
Before and after the removal every chunk of the document is searched for by its own stored
embedding: before, each must find itself; after, none of the document's chunks may come back.
Per run: the continuation, the fraction of the document's true next tokens reproduced, the mean
teacher-forced loss of the true next chunk, the neighbours (document key, score, text).
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from retro_jax.build import edit as edit_db
from retro_jax.db.chunk_store import ChunkStore
from retro_jax.model.loss import token_nll
from retro_jax.retrieval.retriever import Retriever, db_embedding_rows
from retro_jax.sampling import generate as gen
from retro_jax.sampling.generate import DatabaseRetrieval
from retro_jax.training import checkpoint as ckpt_lib

FACT = (
    "The Varnholt lighthouse stands on the island of Skerrin, eleven kilometres off the coast of "
    "the imaginary province of Ostmark. It was designed by the engineer Helga Marrow and first lit "
    "in the winter of 1887, when a storm had sunk three fishing boats in a single night. The tower "
    "is built of grey granite quarried on the island itself and rises forty-two metres above the "
    "sea. Its lamp was originally fuelled by whale oil and later by paraffin.\n\n"
    "The keeper's logbook records that the first keeper, Anton Brisk, served for thirty-one years "
    "and was succeeded by his daughter Maren Brisk, who kept the light until it was automated in "
    "1962. The Varnholt light flashes white twice every nine seconds and can be seen from a "
    "distance of twenty-six nautical miles. A small museum in the former oil store displays the "
    "original lens, made in Paris by the workshop of Barbier and Fenestre in 1886.\n")
FACT_FILE = "varnholt-lighthouse.txt"


class FactRecallError(RuntimeError):
  """The example's setup went wrong (a document too short, a database that does not fit)."""


def add_fact(db: str, work: str, text: str, name: str) -> tuple[int, str]:
  """Adds `text` as one new document (a new shard); returns (doc id, doc key)."""
  facts = os.path.join(work, "facts")
  os.makedirs(facts, exist_ok=True)
  with open(os.path.join(facts, name), "w") as f:
    f.write(text)
  edit_db.add_documents(db, facts)
  store = ChunkStore.open(db)
  doc = store.num_docs - 1
  return doc, store.doc_key(doc)


def self_retrieval(retrieval, db: str, chunk_ids: np.ndarray, k: int = 10) -> dict:
  """Searches each chunk by its stored embedding: is it found (top-1), does any chunk of the
  same document come back at all (top-k)?"""
  q_QxD = db_embedding_rows(db, chunk_ids)
  ids_QxK, _ = retrieval.searcher.search(q_QxD, k)
  ids_QxK = np.asarray(ids_QxK, np.int64)
  return {"found_itself": int((ids_QxK[:, 0] == chunk_ids).sum()),
          "doc_chunks_returned": int(np.isin(ids_QxK, chunk_ids).sum()),
          "queries": int(len(chunk_ids)), "k": k}


def greedy(model, cfg, prompt: Sequence[int], retrieve_fn, new_tokens: int) -> list[int]:
  """Greedy continuation on the KV-cache decoder."""
  res = gen.generate(model, cfg, prompt, retrieve_fn, max_new_tokens=new_tokens, temperature=0.0)
  return [int(t) for t in res.new_ids]


def true_continuation_nll(model, cfg, prompt: Sequence[int], truth: Sequence[int],
                          retrieve_fn) -> float:
  """Mean loss (nats/token) of the true next chunk after the prompt (one chunk), teacher-forced."""
  toks = jnp.asarray([list(prompt) + list(truth)], jnp.int32)
  nbrs = None
  if retrieve_fn is not None:
    n0 = np.asarray(retrieve_fn(np.asarray(prompt, np.int32)))   # neighbours of chunk 0 [K, R]
    nbrs = jnp.asarray(np.stack([n0, np.full_like(n0, cfg.pad_id)])[None])  # chunk 1's: unused
  logits_1xTxV = model(toks, nbrs)[:, len(prompt) - 1:-1]
  return float(token_nll(logits_1xTxV, jnp.asarray([list(truth)], jnp.int32)).mean())


def run(workdir: str, db: str | None, scratch: str, *, fact: str = FACT, name: str = FACT_FILE,
        new_tokens: int = 64, verbose: bool = True) -> dict:
  """Steps 1-4 of the module docstring; returns the report (JSON-able). `db`: default the
  database the model trained on."""
  say = print if verbose else (lambda *a, **k: None)
  model, cfg, info = ckpt_lib.load_model(workdir)
  if not cfg.retrieval:
    raise FactRecallError(f"{workdir} is a baseline (no CCA layers): it cannot retrieve")
  db = db or info["db"]

  scratch = os.path.abspath(scratch)
  db_copy = os.path.join(scratch, "db")
  if os.path.exists(scratch):
    shutil.rmtree(scratch)
  os.makedirs(scratch)
  say(f"copying {db} to {db_copy}", flush=True)
  shutil.copytree(db, db_copy)
  doc, key = add_fact(db_copy, scratch, fact, name)
  store = ChunkStore.open(db_copy)
  first, n = int(store.doc_first_chunk[doc]), int(store.doc_num_chunks[doc])
  if n < 2:
    raise FactRecallError(f"the fact document has {n} chunk(s); it needs two or more")
  doc_chunks = np.arange(first, first + n, dtype=np.int64)
  toks = np.asarray(store.tokens(doc_chunks[:2]))
  prompt, truth = [int(t) for t in toks[0]], [int(t) for t in toks[1] if t != store.pad_id]

  ret = DatabaseRetrieval.from_db(db_copy, cfg.num_neighbours, cfg.neighbour_len)
  ret.check_model(cfg)
  tok = ret.tokenizer
  report = {"checkpoint": info["path"], "step": info["step"], "db": os.path.abspath(db),
            "document": key, "doc_id": doc, "doc_chunks": n, "prompt": tok.decode(prompt),
            "truth": tok.decode(truth), "runs": {}}
  say(f"prompt (the new document's first chunk):\n{report['prompt']}\n\n"
      f"true continuation:\n{report['truth']}")

  def decode(name: str, retrieval: bool) -> None:
    ret.history.clear()
    fn = ret if retrieval else None
    new = greedy(model, cfg, prompt, fn, new_tokens)
    k = min(len(new), len(truth))
    match = float(np.mean(np.asarray(new[:k]) == np.asarray(truth[:k])))
    nbrs = [{"query_chunk": u, "doc_key": c.doc_key, "doc_id": c.doc_id, "score": c.score,
             "text": c.text} for u, (_, chunks) in enumerate(ret.history) for c in chunks]
    nll = true_continuation_nll(model, cfg, prompt, truth, fn)
    report["runs"][name] = {"continuation": tok.decode(new), "match_fraction": match,
                            "true_continuation_nll": nll, "neighbours": nbrs}
    say(f"\n--- {name}: {match:.0%} of the true next {k} tokens, teacher-forced loss of the "
        f"true next chunk {nll:.3f} nats/token\n{tok.decode(new)}")
    for nb in nbrs:
      say(f"   chunk {nb['query_chunk']} neighbour: {nb['doc_key']} (doc {nb['doc_id']}, "
          f"score {nb['score']:.3f}): {nb['text'][:100]!r}")

  report["self_retrieval_before"] = self_retrieval(ret, db_copy, doc_chunks)
  decode("retrieval on", True)
  decode("retrieval off", False)
  edit_db.remove_documents(db_copy, keys=[key])
  ret.searcher = Retriever.from_db(db_copy)  # reads the deletion request
  report["self_retrieval_after_removal"] = self_retrieval(ret, db_copy, doc_chunks)
  decode("retrieval on, document removed", True)
  b, a = report["self_retrieval_before"], report["self_retrieval_after_removal"]
  say(f"\nthe document's {n} chunks searched by their own embeddings: before the removal "
      f"{b['found_itself']} found themselves; after it {a['doc_chunks_returned']} of its chunks "
      f"came back in {a['queries']} top-{a['k']} lists")
  return report
