r"""Edit a built retrieval database without retraining: add documents, remove documents.

Add (any corpus spec of retro_jax/db/corpus.py): the new documents become one new
chunk-store shard (doc ids and chunk ids continue after the existing ones; held out by the store's
own hash rule), then its embeddings (the database's embedder, checked against embedder.json), its
index (the global index: its vectors encoded with the trained partitioner and quantizer into the
serving shards of their partitions; a per-shard backend: a new index shard with the settings of
shard 0, size-dependent ones re-derived) and
the training neighbours of its chunks (searched over every shard). Existing shards are not touched:
their training neighbours keep pointing at the old documents (recompute them with
`python -m retro_jax.build_db --stages=neighbours` after deleting DB/neighbours/ if that matters); retrieval at
generation time (`Retriever.from_db`) sees the new shard at once, a running retrieval service after
`python -m retro_jax.retrieval.serve --reload=HOST:PORT,...` (its clients get an error until then).
A document key that is already in the database is an error unless `--upsert`, which
removes the old document first. Restartable: a rerun of the same `--add` finds its shard in the
manifest's edit log and finishes the stages that did not finish.

Remove (global doc ids or document keys): a deletion request, recorded
in DB/chunks/deletions.json (every request with its UTC time, ids and keys) and in the chunk
store's manifest. From then on no chunk of a removed document is returned by the in-process
`Retriever` (`from_db` reads the deletions), by the retrieval service (each shard server rereads the
file before every search), or handed out by the loader (neither its chunks in any split, nor as a
neighbour); the stored training neighbours that pointed at a removed chunk are recomputed (and the
removed chunks' own rows set to -1). Index files and embeddings keep the removed vectors (masked at
query time; rebuild the index shards to drop them physically). Idempotent.

Manifest: `chunks/manifest.json["edits"]` holds `log` (every add/remove with its time and inputs, in
order: replaying the commands on a database rebuilt from the same corpus reproduces this one),
`deletions` (file, sha256, count) and `fingerprint` (sha256 over every shard's file checksums and
the deletions file: it changes with every edit).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np
from etils import epath

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import corpus as corpus_lib
from retro_jax.db import layout, npy_rows, provenance
from retro_jax.db.prepare import load_db_tokenizer
from retro_jax.errors import UserError
from retro_jax.retrieval import build_index as build_index_lib
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib
from retro_jax.retrieval.embedder import Embedder

EDIT_LOG_VERSION = 1


class EditError(UserError, ValueError):
  """An edit request that cannot be applied (unknown ids/keys, duplicate keys, empty corpus)."""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def content_fingerprint(manifest: dict, deletions_sha256: str) -> str:
  """sha256 over every chunk-store shard's file checksums and the deletions file's checksum."""
  parts = [(s["index"], sorted((n, f["sha256"]) for n, f in s["files"].items()))
           for s in manifest["shards"]]
  return layout.sha256_bytes(json.dumps([parts, deletions_sha256], sort_keys=True).encode())


def _edits(manifest: dict) -> dict:
  return manifest.setdefault("edits", {"format_version": EDIT_LOG_VERSION, "log": [],
                                       "deletions": {"file": None, "sha256": "", "num_docs": 0}})


def _doc_keys(store) -> list[str]:
  return [k for s in store.manifest["shards"]
          for k in json.loads((store.root / s["path"] / "doc_keys.json").read_text())]


def _open(db: epath.Path):
  return chunk_store_lib.ChunkStore.open(db)


# ------------------------------------------------------------------------------------------------
# Removal.


def _write_deletions(store, new_ids: Sequence[int], keys: Sequence[str], note: str) -> None:
  """Appends a request to STORE/deletions.json (atomic), then records it in the manifest."""
  path = store.deletions_path
  if not path.exists() and not new_ids:
    return
  record = (json.loads(path.read_text()) if path.exists()
            else {"format_version": 1, "doc_ids": [], "requests": []})
  if new_ids:
    record["requests"].append({"request": len(record["requests"]), "time": _now(),
                               "doc_ids": [int(i) for i in new_ids], "doc_keys": list(keys),
                               "note": note})
    record["doc_ids"] = sorted(set(record["doc_ids"]) | {int(i) for i in new_ids})
    data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    layout.write_bytes_atomic(path, data)  # The deletion is in force from here on.
  # The manifest follows the file (a run killed in between is repaired by the rerun).
  manifest = store.manifest
  edits = _edits(manifest)
  sha = layout.sha256_bytes(path.read_bytes())
  logged = {e["request"] for e in edits["log"] if e["op"] == "remove"}
  for req in record["requests"]:
    if req["request"] not in logged:
      edits["log"].append({"op": "remove", **req})
  edits["deletions"] = {"file": layout.DELETIONS, "sha256": sha,
                        "num_docs": len(record["doc_ids"])}
  edits["fingerprint"] = content_fingerprint(manifest, sha)
  chunk_store_lib.write_manifest(store.root, manifest)


def remove_documents(db_dir: str | os.PathLike, doc_ids: Sequence[int] = (),
                     keys: Sequence[str] = (), backend: str | None = None, note: str = "") -> dict:
  """Records a deletion request and repairs the training neighbours. Returns stats."""
  backend = _backend(db_dir, backend)
  db = epath.Path(db_dir)  # local or gs://
  store = _open(db)
  ids = {int(i) for i in doc_ids}
  bad = sorted(i for i in ids if not 0 <= i < store.num_docs)
  if bad:
    raise EditError(f"--remove_docs: {bad} are not document ids of {db} (0..{store.num_docs - 1}).")
  already = set(store.deleted_doc_ids().tolist())
  all_keys = _doc_keys(store) if keys or ids else []
  if keys:
    where: dict[str, list[int]] = {}
    for i, k in enumerate(all_keys):
      where.setdefault(k, []).append(i)
    unknown = [k for k in keys if k not in where]
    if unknown:
      raise EditError(f"--remove_keys: no document of {db} has the key(s) {unknown} "
                      "(keys are as in chunks/shard-XXXXX/doc_keys.json, e.g. 'kernel:...').")
    for k in keys:
      ids.update(where[k])
  new = sorted(ids - already)
  _write_deletions(store, new, [all_keys[i] for i in new], note)
  store = _open(db)
  stats: dict[str, Any] = {"removed_docs": new, "already_removed": sorted(ids & already),
                           "deleted_docs_total": int(store.deleted_doc_ids().size)}
  if (db / layout.NEIGHBOURS_DIR).is_dir():
    retriever = retriever_lib.Retriever.from_db(str(db), backend, doc_ids=store.doc_ids)
    stats["neighbours"] = neighbours_lib.repair_after_deletion(db, retriever, store)
  return stats


# ------------------------------------------------------------------------------------------------
# Addition.


def _corpus_sha256(docs) -> str:
  h = hashlib.sha256()
  for d in docs:
    h.update(d.key.encode() + b"\x00" + d.text.encode() + b"\x00")
  return h.hexdigest()


def _backend(db_dir, backend: str | None) -> str:
  return retriever_lib.db_backend(str(db_dir), backend)


def _index_config(db: epath.Path, backend: str):
  """The existing shard 0's index settings, size-dependent fields left to be re-derived."""
  first = str(layout.index_shard_dir(layout.index_dir(db, backend), 0))
  if not (epath.Path(first) / index_lib.MANIFEST).exists():
    raise EditError(f"{db} has no {backend} index ({first}); build it first with "
                    f"`python -m retro_jax.build_db --db={db} --backend={backend}`.")
  config = index_lib.IndexConfig.from_json(index_lib.read_manifest(first)["config"])
  return dataclasses.replace(config, num_leaves=None, leaves_to_search=None)


def _finish_shard(db: epath.Path, shard: int, backend: str, embed_batch_size: int) -> dict:
  """Embeddings, index shard and training neighbours of store shard `shard` (finished parts kept)."""
  out: dict[str, Any] = {}
  store = _open(db)
  info_path = layout.embeddings_dir(db) / layout.EMBEDDER_INFO
  if not info_path.exists():
    raise EditError(f"{info_path} is missing: {db} was never embedded; build it with build_db.")
  info = json.loads(info_path.read_text())
  embedder = Embedder.load(max_length=info["max_length"], dtype=info["dtype"],
                           batch_size=embed_batch_size)
  out["embed"] = embed_lib.embed_chunk_store(db, embedder)  # Finished shards are skipped.
  if backend == index_lib.GLOBAL_BACKEND:
    # The trained partitioner and quantizer encode the new shard's vectors into the serving
    # shards of their partitions (a finished add is recognised by the manifest's shard list).
    manifest = build_index_lib.add_to_global_index(str(db))
    out["index"] = {"index_dir": str(layout.index_dir(db, backend)), "count": manifest["count"]}
    return _finish_neighbours(db, backend, store, out)
  config = _index_config(db, backend)
  [(_, emb_path, offset)] = retriever_lib.db_embedding_shards(str(db), lambda i: i == shard)
  shard_dir = str(layout.index_shard_dir(layout.index_dir(db, backend), shard))
  try:
    done = index_lib.read_manifest(shard_dir)["offset"] == offset
    index_lib.verify_shard(shard_dir)
  except index_lib.IndexError_:
    done = False
  if not done:
    index_lib.build_shard(emb_path, offset, config, shard_dir)
  out["index"] = {"shard_dir": shard_dir, "built": not done}
  return _finish_neighbours(db, backend, store, out)


def _finish_neighbours(db: epath.Path, backend: str, store, out: dict) -> dict:
  if layout.neighbours_path(db, 0).exists():
    k = int(npy_rows.open_rows(layout.neighbours_path(db, 0)).shape[1])
    out["neighbours"] = neighbours_lib.compute_neighbours(db, k=k, backend=backend, store=store)
  return out


def add_documents(db_dir: str | os.PathLike, corpus_spec: str, backend: str | None = None,
                  upsert: bool = False, embed_batch_size: int = 32) -> dict:
  """Appends the corpus's documents as a new shard and finishes its downstream stages."""
  backend = _backend(db_dir, backend)
  db = epath.Path(db_dir)  # local or gs://
  store = _open(db)
  stats = corpus_lib.CorpusStats()
  try:
    docs = corpus_lib.read_documents(corpus_spec, stats)
  except corpus_lib.CorpusError as e:
    raise EditError(f"--add: {e}") from None
  keys = [d.key for d in docs]
  digest = _corpus_sha256(docs)
  deleted_now = store.deleted_doc_ids()
  # The same addition again resumes it, unless documents it added were removed since: then it is
  # a new addition (the documents come back with new ids).
  prior = [e for e in _edits(store.manifest)["log"]
           if e["op"] == "add" and e["corpus_sha256"] == digest
           and not np.isin(np.arange(e["first_doc_id"], e["first_doc_id"] + e["num_docs"]),
                           deleted_now).any()]
  result: dict[str, Any] = {"resumed": bool(prior)}
  if prior:
    shard = int(prior[-1]["shard"])
  else:
    deleted = set(store.deleted_doc_ids().tolist())
    existing = {k: i for i, k in enumerate(_doc_keys(store)) if i not in deleted}
    clash = [k for k in keys if k in existing]
    if clash and not upsert:
      raise EditError(f"--add={corpus_spec!r}: {len(clash)} document key(s) are already in {db} "
                      f"(e.g. {clash[:3]}, doc ids {[existing[k] for k in clash[:3]]}); pass "
                      "--upsert to replace them, or remove them first with --remove_keys.")
    if clash:
      result["upsert_removed"] = remove_documents(
          db, [existing[k] for k in clash], backend=backend, note=f"upsert by --add={corpus_spec}")
      store = _open(db)
    tok = load_db_tokenizer(db)
    manifest = chunk_store_lib.append_shard(store.root, docs, tok, corpus_spec, stats.to_json())
    new = manifest["shards"][-1]
    shard = int(new["index"])
    edits = _edits(manifest)
    edits["log"].append({
        "op": "add", "time": _now(), "corpus": corpus_spec, "corpus_sha256": digest,
        "shard": shard, "first_doc_id": new["first_doc_id"], "num_docs": new["num_docs"],
        "first_chunk_id": new["first_chunk_id"], "num_chunks": new["num_chunks"],
        "upsert": bool(clash), "bad_input": {k: v for k, v in stats.to_json().items()
                                              if not k.endswith("keys")}})
    edits["fingerprint"] = content_fingerprint(manifest, edits["deletions"]["sha256"])
    chunk_store_lib.write_manifest(store.root, manifest)
  store = _open(db)
  s = store.manifest["shards"][shard]
  result.update(shard=shard, first_doc_id=s["first_doc_id"], num_docs=s["num_docs"],
                first_chunk_id=s["first_chunk_id"], num_chunks=s["num_chunks"])
  result.update(_finish_shard(db, shard, backend, embed_batch_size))
  provenance.refresh(db)
  return result


# ------------------------------------------------------------------------------------------------
# Command.
