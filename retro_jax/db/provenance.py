"""What each database stage was built from, so that a rerun skips a stage only when it matches.

`DB/provenance/<stage>.json` records, when the
stage finishes:
  settings   the build settings the stage depends on (corpus, vocabulary, held-out fraction, ...),
  tokenizer  the sha256 of the database's tokenizer file (the tokenizer's fingerprint),
  inputs     the checksums of the stage's inputs: the chunk-store shards' token files for the
             embeddings, the embeddings shards for the index, the index manifests and the held-out
             documents for the neighbours.
`retro_jax.build.stages` compares the record with what this run would build from. A difference is a
`ProvenanceMismatchError` naming it, unless `--rebuild`, which deletes that stage's outputs and builds
them again (and so every later stage, whose inputs then change). An input present in only one of the
two records is not a difference (`retro_jax.edit_db --add` appends shards).

Every input is read from one small file, so checking a stage costs the launching process the same
few requests at any database size. `repair` (`build_db --audit`: it reads the whole database)
removes outputs that are missing parts or whose recorded checksum no longer matches, so the stage
(resumable) rebuilds them: e.g. a deleted neighbours shard whose progress file remains.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from retro_jax.db import chunk_store, layout, verify
from retro_jax.errors import UserError

PROVENANCE_DIR = "provenance"
FORMAT_VERSION = 1

# The build settings each stage's outputs depend on.
STAGE_SETTINGS = {
    "tokenizer": ("corpus", "max_docs", "heldout_fraction", "seed", "vocab_size", "tokenizer"),
    "chunks": ("corpus", "max_docs", "heldout_fraction", "seed", "chunk_size", "docs_per_shard"),
    "embeddings": ("embed_dtype",),
    "index": ("backend", "index_searcher"),
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


# Settings recorded only when not at their default, so records written before they existed match.
_RECORDED_IF_SET = {"index_searcher": "faiss"}


def _settings(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
  out = {k: cfg.get(k, _RECORDED_IF_SET.get(k)) for k in STAGE_SETTINGS[stage]}
  out = {k: v for k, v in out.items() if k not in _RECORDED_IF_SET or v != _RECORDED_IF_SET[k]}
  if stage == "tokenizer":
    given = cfg["tokenizer"]
    if given and epath.Path(given).is_file():
      out["tokenizer"] = "sha256:" + layout.sha256_file(given)  # the file, not its path
    if given:  # a given tokenizer is not trained: neither corpus nor vocabulary matters
      out = {"tokenizer": out["tokenizer"]}
  return out


def _my_shards(db: epath.Path, cfg: dict[str, Any]) -> list[dict]:
  """Every store shard's manifest entry (the whole list: --rebuild and --audit only)."""
  store_dir = db / layout.CHUNKS_DIR
  if not (store_dir / layout.MANIFEST).exists():
    return []
  return list(chunk_store.read_manifest(store_dir)["shards"])


def _store_top(db: epath.Path) -> dict | None:
  """The chunk store's manifest (manifest.json only: its shard list is read if asked for)."""
  store_dir = db / layout.CHUNKS_DIR
  return chunk_store.read_manifest(store_dir) if (store_dir / layout.MANIFEST).exists() else None


# A finished embeddings or neighbours stage: DB/provenance/<stage>.outputs.json, written when its
# last shard is assembled: {"num_shards", "sha256" over every shard's recorded checksum}. The build
# reads this one file to know the stage is finished (not every shard's progress record).
OUTPUTS = ".outputs.json"


def outputs_path(db: str | os.PathLike, stage: str) -> epath.Path:
  return epath.Path(db) / PROVENANCE_DIR / f"{stage}{OUTPUTS}"


_SHARD_PATH = {"embeddings": layout.embeddings_path, "neighbours": layout.neighbours_path}


# The outputs record's checksum is over groups of this many shards' checksums, each group's
# progress records read by one element, the groups in parallel (over a thousand at 2.8e10 chunks); with one
# group (up to this many shards) it is the checksum over the shards' own, as in format 1.
OUTPUTS_GROUP_SHARDS = 256


def outputs_groups(num_shards: int) -> int:
  return max(1, -(-int(num_shards) // OUTPUTS_GROUP_SHARDS))


def group_sha256(db: str | os.PathLike, stage: str, num_shards: int, group: int) -> str | None:
  """The checksum over group `group`'s shards' recorded checksums (one progress-record read per
  shard), or None when one of them is not finished."""
  shas = []
  for s in range(group * OUTPUTS_GROUP_SHARDS,
                 min(int(num_shards), (group + 1) * OUTPUTS_GROUP_SHARDS)):
    npy = _SHARD_PATH[stage](db, s)
    prog = layout.progress_path(npy)
    rec = json.loads(prog.read_text()) if prog.exists() else {}
    if not rec.get("done") or not npy.exists():
      return None
    shas.append(rec.get("sha256"))
  return layout.sha256_bytes(json.dumps(shas).encode())


def write_outputs(db: str | os.PathLike, stage: str, num_shards: int,
                  group_shas: list[str | None] | None = None) -> dict[str, Any] | None:
  """Records that `stage`'s shards 0..num_shards-1 are finished, from each one's progress record
  (`group_shas`: the groups' checksums, `group_sha256` of each, computed in parallel by the
  pipeline; read here, group by group, when not given: after an edit that added a shard).
  Returns the record, or None (nothing written) when a shard is not finished."""
  if group_shas is None:
    group_shas = []
    for g in range(outputs_groups(num_shards)):
      group_shas.append(group_sha256(db, stage, num_shards, g))
      if group_shas[-1] is None:
        return None
  if len(group_shas) != outputs_groups(num_shards) or any(x is None for x in group_shas):
    return None
  sha = (group_shas[0] if len(group_shas) == 1
         else layout.sha256_bytes(json.dumps(group_shas).encode()))
  rec = {"format_version": FORMAT_VERSION, "stage": stage, "num_shards": int(num_shards),
         "sha256": sha}
  out = outputs_path(db, stage)
  out.parent.mkdir(parents=True, exist_ok=True)
  layout.write_json_atomic(out, rec)
  return rec


def read_outputs(db: str | os.PathLike, stage: str) -> dict[str, Any] | None:
  path = outputs_path(db, stage)
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None


def _inputs(stage: str, db: epath.Path, cfg: dict[str, Any]) -> dict[str, str]:
  """The checksums a stage is built from, each read from one small file (never per shard):
  the chunk store's content fingerprint, the embeddings stage's outputs record, the index
  manifest and the held-out list's checksum."""
  out: dict[str, str] = {}
  top = _store_top(db)
  if stage == "embeddings" and top is not None:
    out[layout.CHUNKS_DIR] = (top.get("content_sha256")
                              or chunk_store.content_sha256(top.get("shards", [])))
  elif stage == "index":
    rec = read_outputs(db, "embeddings")
    if rec is not None:
      out[layout.EMBEDDINGS_DIR] = rec["sha256"]
  elif stage == "neighbours":
    root = layout.index_dir(db, cfg["backend"])
    if (root / layout.MANIFEST).exists():  # the global index: its files' checksums (not times)
      m = json.loads((root / layout.MANIFEST).read_text())
      out[f"{layout.INDEX_DIR}/{cfg['backend']}"] = layout.sha256_bytes(json.dumps(
          {k: m.get(k) for k in ("count", "config", "files", "content_sha256")}, sort_keys=True).encode())
    elif root.exists():  # per-shard backends: one manifest per index shard
      for d in sorted(root.iterdir()):
        if (d / "manifest.json").exists():
          out[f"{layout.INDEX_DIR}/{cfg['backend']}/{d.name}"] = layout.sha256_file(
              d / "manifest.json")
    if top is not None:
      held = top["heldout"]
      out["heldout_doc_ids"] = (held["sha256"] if "sha256" in held else
                                layout.sha256_bytes(json.dumps(held["doc_ids"]).encode()))
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
  m = _store_top(db)
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


# Each stage's whole output directory: --rebuild removes it, so nothing an earlier build wrote
# (a shard past the new store's last, a part file, a cached search) outlives it.
_OUTPUT_DIRS = {"tokenizer": lambda db, cfg: db / "tokenizer",
                "chunks": lambda db, cfg: db / layout.CHUNKS_DIR,
                "embeddings": lambda db, cfg: layout.embeddings_dir(db),
                "index": lambda db, cfg: layout.index_dir(db, cfg["backend"]),
                "neighbours": lambda db, cfg: db / layout.NEIGHBOURS_DIR}


def clear_outputs(stage: str, db: str | os.PathLike, cfg: dict[str, Any]) -> None:
  """Deletes the outputs of `stage` (--rebuild): its directory, outputs record and record."""
  db = epath.Path(db)
  _remove(_OUTPUT_DIRS[stage](db, cfg))
  if stage in _SHARD_PATH:
    _remove(outputs_path(db, stage))
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
        _remove(outputs_path(db, stage))
        removed.append(str(npy))
  elif stage == "chunks" and (db / layout.CHUNKS_DIR / layout.MANIFEST).exists():
    store_dir = db / layout.CHUNKS_DIR
    manifest = chunk_store.read_manifest(store_dir)
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


def refresh(db: str | os.PathLike) -> None:
  """After an edit that finished a new shard through every stage (`edit_db --add`): the outputs
  records name every shard again and each stage's record names its inputs as they now are."""
  db = epath.Path(db)
  n = chunk_store.ChunkStore.open(db).num_shards
  for stage in _SHARD_PATH:
    write_outputs(db, stage, n)
  for stage in ("embeddings", "index", "neighbours"):
    rec = read(db, stage, {})
    if rec is not None and "settings" in rec:
      write(db, stage, {}, {**rec, "inputs": _inputs(stage, db, rec["settings"])})
