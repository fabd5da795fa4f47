r"""A fact present only in the database, completed with retrieval on, not off, and gone after deletion.

    python scripts/retrieval_example.py --checkpoint=runs/demo/retro --db=runs/default_db \
        --work=runs/example [--out=bench/results/retrieval_example.json]

1. Copies the database to WORK/db (the edits below must not touch the original).
2. Adds one new document (WORK/facts/*.txt, written here: invented facts the model never trained on)
   with `retro_jax.edit_db.add_documents` -- a new shard, its embeddings, index and neighbours.
3. Prompts the trained RETRO with the document's first chunk (64 tokens) and generates greedily
   (the prompt's last chunk is the query, so the retrieved neighbour is that chunk plus its
   continuation), with retrieval on and off, and prints the neighbours with their documents.
4. Removes the document (`edit_db.remove_documents`) and generates again with retrieval on.
Reports, per run, the fraction of the document's true next-chunk tokens reproduced.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "runs/demo/retro", "trained RETRO workdir")
flags.DEFINE_string("db", "runs/default_db", "database the model trained on (copied, not edited)")
flags.DEFINE_string("work", "runs/example", "scratch directory")
flags.DEFINE_integer("new_tokens", 48, "tokens to generate")
flags.DEFINE_string("out", "bench/results/retrieval_example.json", "results JSON")

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


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import numpy as np

  from retro_jax import checkpoint as ckpt_lib
  from retro_jax import edit_db
  from retro_jax.data.chunk_store import ChunkStore
  from retro_jax.generate import DatabaseRetrieval, generate

  work = os.path.abspath(FLAGS.work)
  db = os.path.join(work, "db")
  if os.path.exists(work):
    shutil.rmtree(work)
  os.makedirs(os.path.join(work, "facts"))
  print(f"copying {FLAGS.db} to {db}", flush=True)
  shutil.copytree(FLAGS.db, db)
  with open(os.path.join(work, "facts", "varnholt-lighthouse.txt"), "w") as f:
    f.write(FACT)
  edit_db.add_documents(db, os.path.join(work, "facts"))
  store = ChunkStore.open(db)
  doc = store.num_docs - 1
  first, n = int(store.doc_first_chunk[doc]), int(store.doc_num_chunks[doc])
  key = store.doc_key(doc)
  assert n >= 2, f"the fact document has {n} chunks; make it longer"
  toks = np.asarray(store.tokens(np.arange(first, first + 2, dtype=np.int64)))
  prompt, truth = [int(t) for t in toks[0]], [int(t) for t in toks[1]]

  model, cfg, info = ckpt_lib.load_model(FLAGS.checkpoint)
  report = {"checkpoint": info["path"], "step": info["step"], "document": key, "runs": {}}

  def run(name, retrieval: bool, db_dir: str):
    ret = DatabaseRetrieval.from_db(db_dir, cfg.num_neighbours, cfg.neighbour_len)
    if getattr(cfg, "positions", "relative") == "relative":
      res = generate(model, cfg, prompt, ret if retrieval else None,
                     max_new_tokens=FLAGS.new_tokens, temperature=0.0)
      new = [int(t) for t in res.new_ids]
    else:  # the KV-cache decoder is for relative positions: greedy by full recompute
      new = greedy_full(prompt, ret if retrieval else None)
    k = min(len(new), len(truth))
    # position-wise agreement with the document's true continuation (after the prompt's last token)
    match = float(np.mean(np.asarray(new[:k]) == np.asarray(truth[:k])))
    text = ret.tokenizer.decode(new)
    nbrs = []
    for query, chunks in ret.history if retrieval else []:
      for c in chunks:
        nbrs.append({"doc_key": c.doc_key, "doc_id": int(c.doc_id), "score": float(c.score),
                     "text": c.text[:200]})
    report["runs"][name] = {"continuation": text, "match_fraction": match, "neighbours": nbrs}
    print(f"\n--- {name}: {match:.0%} of the true next tokens\n{text}")
    for nb in nbrs:
      print(f"   neighbour from {nb['doc_key']} (doc {nb['doc_id']}, score {nb['score']:.3f}): "
            f"{nb['text'][:120]!r}")

  tok = DatabaseRetrieval.from_db(db, cfg.num_neighbours, cfg.neighbour_len).tokenizer
  report["prompt"] = tok.decode(prompt)
  report["truth"] = tok.decode(truth)
  print(f"prompt (the new document's first chunk):\n{report['prompt']}\n\ntrue continuation:\n"
        f"{report['truth']}")
  def greedy_full(prompt_ids, retrieve_fn):
    """Greedy decoding by recomputing the whole (fixed-length, padded) sequence every token."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    m, total = cfg.chunk_size, len(prompt_ids) + FLAGS.new_tokens
    T = -(-total // m) * m
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t, n: nnx.merge(graphdef, st)(t, n))
    ids = list(prompt_ids)
    nbrs = np.zeros((T // m, cfg.num_neighbours, cfg.neighbour_len), np.int32)
    done = 0
    while len(ids) < total:
      while retrieve_fn is not None and (done + 1) * m <= len(ids):  # chunk `done` completed
        nbrs[done] = np.asarray(retrieve_fn(np.asarray(ids[done * m:(done + 1) * m], np.int32)))
        done += 1
      toks = np.zeros((1, T), np.int32)
      toks[0, :len(ids)] = ids
      logits = fwd(state, jnp.asarray(toks), None if retrieve_fn is None else jnp.asarray(nbrs[None]))
      ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return ids[len(prompt_ids):]

  def teacher_forced(name, retrieval: bool, db_dir: str):
    """Mean loss (nats) of the true next chunk given the prompt, with the retrieved neighbours."""
    import jax.numpy as jnp
    ret = DatabaseRetrieval.from_db(db_dir, cfg.num_neighbours, cfg.neighbour_len)
    toks = jnp.asarray([prompt + truth], jnp.int32)
    nbrs = None
    if retrieval:
      n0 = np.asarray(ret(np.asarray(prompt, np.int32)))          # neighbours of chunk 0 [K, R]
      nbrs = jnp.asarray(np.stack([n0, np.zeros_like(n0)])[None])  # chunk 1's are not used
    logits = model(toks, nbrs)[0, len(prompt) - 1:-1]
    nll = -np.take_along_axis(np.asarray(jax_log_softmax(logits)), np.asarray(truth)[:, None], 1)
    report["runs"].setdefault(name, {})["true_continuation_nll"] = float(nll.mean())
    print(f"    teacher-forced loss of the true continuation, {name}: {float(nll.mean()):.3f} nats/token")

  import jax
  jax_log_softmax = jax.nn.log_softmax
  run("retrieval on", True, db)
  teacher_forced("retrieval on", True, db)
  run("retrieval off", False, db)
  teacher_forced("retrieval off", False, db)
  edit_db.remove_documents(db, keys=[key])
  run("retrieval on, document removed", True, db)
  teacher_forced("retrieval on, document removed", True, db)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
