"""What each database stage was built from, so that a rerun skips a stage only when it matches.

`DB/provenance/<stage>.json` records, when the
stage finishes:
  settings   the build settings the stage depends on (corpus, vocabulary, held-out fraction, ...),
  tokenizer  the sha256 of the database's tokenizer file (the tokenizer's fingerprint),
  inputs     the checksums of the stage's inputs: the chunk-store shards' token files for the
             embeddings, the embeddings shards for the index, the index manifests and the held-out
             documents for the neighbours.
`retro_jax.db.build` compares the record with what this run would build from. A difference is a
`ProvenanceMismatchError` naming it, unless `--rebuild`, which deletes that stage's outputs and builds
them again (and so every later stage, whose inputs then change). An input present in only one of the
two records is not a difference (`retro_jax.edit_db --add` appends shards).

`repair` removes outputs that are missing parts or whose recorded checksum no longer matches, so the
stage (resumable) rebuilds them: e.g. a deleted neighbours shard whose progress file remains.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from retro_jax.db import layout, verify
from retro_jax.errors import UserError

PROVENANCE_DIR = "provenance"
FORMAT_VERSION = 1

# The build settings each stage's outputs depend on.
STAGE_SETTINGS = {
    "tokenizer": ("corpus", "max_docs", "heldout_fraction", "seed", "vocab_size", "tokenizer"),
    "chunks": ("corpus", "max_docs", "heldout_fraction", "seed", "chunk_size", "docs_per_shard"),
    "embeddings": ("embed_dtype",),
    "index": ("backend",),
    "neighbours": ("backend", "k"),
}


class ProvenanceMismatchError(UserError, RuntimeError):
  """A finished stage built from other settings, another tokenizer or other inputs."""


def record_path(db: str | os.PathLike, stage: str, cfg: dict[str, Any]) -> epath.Path:
  del cfg  # one record per stage (the whole database)
  return epath.Path(db) / PROVENANCE_DIR / f"{stage}.json"


def _tokenizer_file(db: epath.Path) -> epath.Path | None:
  found = [db / p for p in (layout.TOKENIZER_PATH, layout.BPE_TOKENIZER_PATH) if (db / p).exists()]
  return found[0] if found else None


def _settings(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
  out = {k: cfg[k] for k in STAGE_SETTINGS[stage]}
  if stage == "tokenizer":
    given = cfg["tokenizer"]
    if given and epath.Path(given).is_file():
      out["tokenizer"] = "sha256:" + layout.sha256_file(given)  # the file, not its path
    if given:  # a given tokenizer is not trained: neither corpus nor vocabulary matters
      out = {"tokenizer": out["tokenizer"]}
  return out


def _my_shards(db: epath.Path, cfg: dict[str, Any]) -> list[dict]:
  manifest = db / layout.CHUNKS_DIR / layout.MANIFEST
  shards = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
  return shards


def _inputs(stage: str, db: epath.Path, cfg: dict[str, Any]) -> dict[str, str]:
  out: dict[str, str] = {}
  if stage == "embeddings":
    for s in _my_shards(db, cfg):
      out[f"{layout.CHUNKS_DIR}/{s['path']}/tokens.npy"] = s["files"]["tokens.npy"]["sha256"]
  elif stage == "index":
    for s in _my_shards(db, cfg):
      path = layout.embeddings_path(db, int(s["index"]))
      if layout.is_finished(path):
        out[f"{layout.EMBEDDINGS_DIR}/{path.name}"] = (verify.recorded_sha256(path)
                                                        or layout.sha256_file(path))
  elif stage == "neighbours":
    root = layout.index_dir(db, cfg["backend"])
    if root.exists():
      for d in sorted(root.iterdir()):
        if (d / "manifest.json").exists():
          out[f"{layout.INDEX_DIR}/{cfg['backend']}/{d.name}"] = layout.sha256_file(
              d / "manifest.json")
    manifest = db / layout.CHUNKS_DIR / layout.MANIFEST
    if manifest.exists():
      held = json.loads(manifest.read_text())["heldout"]["doc_ids"]
      out["heldout_doc_ids"] = layout.sha256_bytes(json.dumps(held).encode())
  return out


def expected(stage: str, db: str | os.PathLike, cfg: dict[str, Any]) -> dict[str, Any]:
  """What this run would build `stage` from."""
  db = epath.Path(db)
  tok = _tokenizer_file(db) if stage != "tokenizer" else None
  return {"format_version": FORMAT_VERSION, "stage": stage, "settings": _settings(stage, cfg),
          "tokenizer": layout.sha256_file(tok) if tok is not None else None,
          "inputs": _inputs(stage, db, cfg)}


def _derived(stage: str, db: epath.Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
  """For a database built before these records: what its chunk-store manifest says about the
  tokenizer and chunks stages' settings (None for other stages or without a manifest)."""
  path = db / layout.CHUNKS_DIR / layout.MANIFEST
  if stage not in ("tokenizer", "chunks") or not path.exists():
    return None
  m = json.loads(path.read_text())
  known = {"corpus": m["corpus"]["spec"], "max_docs": m["corpus"]["max_docs"],
           "heldout_fraction": m["heldout"]["fraction"], "seed": m["heldout"]["seed"],
           "chunk_size": m["chunk_size"], "docs_per_shard": m["corpus"]["docs_per_shard"],
           "vocab_size": m["tokenizer"]["vocab_size"]}
  want = expected(stage, db, cfg)
  settings = {k: known.get(k, v) if k in known else v for k, v in want["settings"].items()}
  return {**want, "settings": settings}


def read(db: str | os.PathLike, stage: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
  """The stage's record; for a finished database built before records existed, the settings its
  chunk-store manifest records (tokenizer and chunks stages)."""
  path = record_path(db, stage, cfg)
  if not path.exists():
    return _derived(stage, epath.Path(db), cfg)
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError:
    return None  # A damaged record: treated as absent (the outputs are still checked).


def write(db: str | os.PathLike, stage: str, cfg: dict[str, Any], record: dict[str, Any]) -> None:
  path = record_path(db, stage, cfg)
  path.parent.mkdir(parents=True, exist_ok=True)
  layout.write_json_atomic(path, record)


def differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
  """Human-readable differences between a stage's record and this run ('' when they match)."""
  out = []
  for k in sorted(set(have.get("settings", {})) | set(want["settings"])):
    a, b = have.get("settings", {}).get(k), want["settings"].get(k)
    if a != b:
      out.append(f"{k}: built with {a!r}, now {b!r}")
  if have.get("tokenizer") != want["tokenizer"] and have.get("tokenizer") and want["tokenizer"]:
    out.append(f"tokenizer: built with sha256 {have['tokenizer'][:12]}, now "
               f"{want['tokenizer'][:12]}")
  for k in sorted(set(have.get("inputs", {})) & set(want["inputs"])):
    if have["inputs"][k] != want["inputs"][k]:
      out.append(f"input {k}: built from sha256 {have['inputs'][k][:12]}, now "
                 f"{want['inputs'][k][:12]}")
  return out


def _remove(path: epath.Path) -> None:
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def clear_outputs(stage: str, db: str | os.PathLike, cfg: dict[str, Any]) -> None:
  """Deletes the outputs of `stage` (--rebuild), and its record."""
  db = epath.Path(db)
  shards = [int(s["index"]) for s in _my_shards(db, cfg)]
  if stage == "tokenizer":
    _remove(db / "tokenizer")
  elif stage == "chunks":
    _remove(db / layout.CHUNKS_DIR)
  elif stage == "embeddings":
    for i in shards:
      layout.remove_rows_output(layout.embeddings_path(db, i))
      _remove(layout.progress_path(layout.embeddings_path(db, i)))
    _remove(layout.embeddings_dir(db) / layout.EMBEDDER_INFO)
    _remove(layout.embeddings_dir(db) / layout.EMBEDDING_PARTS_DIR)
  elif stage == "index":
    for i in shards:
      _remove(layout.index_shard_dir(layout.index_dir(db, cfg["backend"]), i))
  elif stage == "neighbours":
    for i in shards:
      layout.remove_rows_output(layout.neighbours_path(db, i))
      _remove(layout.progress_path(layout.neighbours_path(db, i)))
  _remove(record_path(db, stage, cfg))


def repair(stage: str, db: str | os.PathLike, cfg: dict[str, Any]) -> list[str]:
  """Removes the damaged or partial outputs of `stage` so that the stage rebuilds them;
  returns what was removed."""
  db = epath.Path(db)
  removed = []
  if stage in ("embeddings", "neighbours"):
    for s in _my_shards(db, cfg):
      npy = (layout.embeddings_path if stage == "embeddings" else layout.neighbours_path)(
          db, int(s["index"]))
      prog = layout.progress_path(npy)
      if not prog.exists():
        continue
      want = verify.recorded_sha256(npy)
      if not layout.rows_output_exists(npy) or (want and npy.exists()
                                                 and layout.sha256_file(npy) != want):
        layout.remove_rows_output(npy)
        _remove(prog)
        removed.append(str(npy))
  elif stage == "chunks" and (db / layout.CHUNKS_DIR / layout.MANIFEST).exists():
    store_dir = db / layout.CHUNKS_DIR
    manifest = json.loads((store_dir / layout.MANIFEST).read_text())
    for s in manifest["shards"]:
      bad = [n for n, rec in s["files"].items()
             if not (store_dir / s["path"] / n).exists()
             or layout.sha256_file(store_dir / s["path"] / n) != rec["sha256"]]
      if bad:
        _remove(store_dir / f"{s['path']}.done.json")
        removed.append(f"{store_dir / s['path']} ({', '.join(bad)})")
    if removed and manifest.get("edits"):
      raise ProvenanceMismatchError(
          f"damaged chunk-store shards {removed} in a store that was edited; rebuild it with "
          f"--rebuild (or restore the files)")
    if removed:  # Rewritten by the chunks stage (same bytes: the build is deterministic).
      _remove(store_dir / layout.MANIFEST)
  return removed
