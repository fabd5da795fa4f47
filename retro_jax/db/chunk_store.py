r"""The chunk store: documents tokenised and cut into fixed-size chunks, as sharded on-disk arrays.

Layout (paths via etils.epath, so gs:// works; local reads are memory-mapped, gs:// ones are
ranged row reads, retro_jax.db.npy_rows), format 3:

  STORE/manifest.json                 written by `finalize_chunk_store` once every shard is done:
                                      totals, settings, content fingerprint (a fixed size: what
                                      opening a store reads)
  STORE/records/shard-00000.json      one shard's record: offsets, counts, each file's sha256 and
                                      size, and its block checksums (read when the shard is first
                                      read, no other shard's record)
  STORE/offsets.npy                   int64 [S + 1, 2]: each shard's first chunk id and first
                                      document id, then the totals (read whole while small, else
                                      bisected by ranged row reads)
  STORE/heldout.json                  the held-out document ids and keys (read when first asked)
  STORE/shard-00000/tokens.npy        int32 [n, m]   chunk tokens, a document's last chunk padded
  STORE/shard-00000/doc_ids.npy       int64 [n]      global document id of each chunk
  STORE/shard-00000/doc_table.npy     int64 [d, 5]   (doc_id, first_row, num_chunks, num_utf8_bytes,
                                                      heldout) for the shard's documents
  STORE/shard-00000/doc_keys.json     [d] document keys
  STORE/shard-00000.done.json         commit marker: counts, settings, sha256 of every file and of
                                      every 128 KiB block of rows of the .npy files

Verify on read hashes only the blocks of rows a read touches (once per process; verify.blocks_once)
and range-checks the token ids it returns; `ChunkStore.check` (and `build_db --audit`) audits every
file whole. Formats 1 (shard list inside manifest.json) and 2 (one STORE/shards.json) still open,
with whole-file checks; finalizing such a store again (`build_db --stages=finalize`) rewrites it
as format 3, its block checksums computed from its files after their whole checksums are checked.

Documents get global ids in corpus order (bad ones skipped, see corpus.py); store shard s holds
documents [s * docs_per_shard, (s + 1) * docs_per_shard), so shards are contiguous chunk-id ranges
aligned to documents. A chunk's global id is its shard's `first_chunk_id` (the running sum of
earlier shards' chunk counts, fixed by finalize) plus its row. Each document's tokens end with EOS.

Worker i of N writes the store shards s with s % N == i. Each file is written to a temporary name and
renamed; the done marker is written last, so a killed run resumes at the first unfinished shard and
the rerun's files are byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import sentencepiece
import tqdm
from etils import epath

from retro_jax.db import corpus as corpus_lib
from retro_jax.db import layout, npy_rows, verify
from retro_jax.db import tokenizer as tokenizer_lib
from retro_jax.db.layout import (
  DELETIONS,
  MANIFEST,
  sha256_bytes,
  sha256_file,
  shard_name,
  write_bytes_atomic,
)
from retro_jax.errors import UserError

# Of the manifest. 1: shards and held-out ids inside manifest.json; 2: every shard's record in one
# STORE/shards.json (both still read); 3: one record per shard and an offsets array.
FORMAT_VERSION = 3
SHARD_FORMAT_VERSION = 1  # of a shard's files (its done marker's settings): unchanged by 2 and 3
SHARDS = "shards.json"  # format 2's shard list
RECORDS = "records"  # STORE/records/shard-XXXXX.json: one store shard's record (format 3)
OFFSETS = "offsets.npy"  # int64 [S + 1, 2]: each shard's first chunk id and first doc id, then totals
# Block checksums (verify.BLOCK_BYTES of rows: 512 rows of 64 tokens, 16,384 document ids, 3,276
# document-table rows) of these files, recorded when a shard is written, checked when a read first
# touches the block (verify.blocks_once).
BLOCK_FILES = ("tokens.npy", "doc_ids.npy", "doc_table.npy")
# An offsets array of at most this many rows is read whole on first use; a longer one is bisected by
# ranged row reads (npy_rows.bisect_rows), so a lookup never reads every shard's offset.
WHOLE_OFFSETS_ROWS = 1 << 16
HELDOUT = "heldout.json"
SHARD_FILES = ("tokens.npy", "doc_ids.npy", "doc_table.npy", "doc_keys.json")
DOC_TABLE_COLUMNS = ("doc_id", "first_row", "num_chunks", "num_utf8_bytes", "heldout")
# Documents removed by `retro_jax.build.edit --remove_docs/--remove_keys`: STORE/deletions.json, read by
# the retriever, the retrieval service, the neighbours and the loader (none of them returns a chunk
# of a removed document). Format: {"format_version": 1, "doc_ids": [sorted ids],
# "requests": [{"time": ISO-8601 UTC, "doc_ids": [...], "doc_keys": [...]}]}.


class ChunkStoreError(UserError, ValueError):
  """A chunk store that is missing, incomplete, corrupt or built with other settings."""


def _json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def package_versions() -> dict[str, str]:
  return {"numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
          "python": sys.version.split()[0]}


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def chunk_document(ids: Sequence[int], chunk_size: int, pad_id: int) -> np.ndarray:
  """int32 [ceil(len / m), m]: the ids cut into chunks, the last one padded with pad_id."""
  n = max(1, math.ceil(len(ids) / chunk_size))
  out = np.full((n * chunk_size,), pad_id, np.int32)
  out[:len(ids)] = ids
  return out.reshape(n, chunk_size)


def _settings(tokenizer, chunk_size, docs_per_shard, corpus_spec, max_docs, heldout_fraction, seed,
              append_eos) -> dict:
  return {"format_version": SHARD_FORMAT_VERSION, "tokenizer": tokenizer.info(),
          "chunk_size": chunk_size,
          "docs_per_shard": docs_per_shard, "corpus": corpus_spec, "max_docs": max_docs,
          "heldout_fraction": heldout_fraction, "seed": seed, "append_eos": append_eos}


def _shard_done(out: epath.Path, index: int, settings: dict) -> dict | None:
  """The done marker of a finished shard (files verified), or None when it must be (re)written."""
  marker_path = out / (shard_name(index) + ".done.json")
  if not marker_path.exists():
    return None
  marker = json.loads(marker_path.read_text())
  if marker["settings"] != settings:
    raise ChunkStoreError(
        f"{marker_path} was written with other settings ({marker['settings']}) than this run "
        f"({settings}); use another --db, rebuild with `build_db --rebuild`, or delete {out}")
  for name, rec in marker["files"].items():
    path = out / shard_name(index) / name
    if not path.exists() or sha256_file(path) != rec["sha256"]:
      marker_path.unlink()  # Damaged after it was written: redo it.
      return None
  return marker


def _write_shard(out: epath.Path, index: int, docs: list[tuple[int, corpus_lib.Document, bool]],
                 tokenizer, chunk_size: int, append_eos: bool, settings: dict,
                 corpus_stats: dict) -> dict:
  """Tokenises and writes one shard; the done marker (written last) is the commit point."""
  shard_dir = out / shard_name(index)
  if shard_dir.exists():
    shard_dir.rmtree()  # Leftovers of a killed run.
  shard_dir.mkdir(parents=True)
  token_lists = tokenizer.encode_batch([d.text for _, d, _ in docs])
  chunk_blocks, doc_rows, keys, row, num_tokens, short = [], [], [], 0, 0, 0
  for (doc_id, doc, heldout), ids in zip(docs, token_lists):
    if append_eos:
      ids = list(ids) + [tokenizer.eos_id]
    if len(ids) < chunk_size:
      short += 1
    chunks = chunk_document(ids, chunk_size, tokenizer.pad_id)
    chunk_blocks.append(chunks)
    doc_rows.append((doc_id, row, len(chunks), len(doc.text.encode("utf-8")), int(heldout)))
    keys.append(doc.key)
    row += len(chunks)
    num_tokens += len(ids)
  tokens_NxM = (np.concatenate(chunk_blocks) if chunk_blocks
                else np.zeros((0, chunk_size), np.int32)).astype(np.int32)
  doc_table_Dx5 = np.asarray(doc_rows, np.int64).reshape(-1, len(DOC_TABLE_COLUMNS))
  doc_ids_N = np.repeat(doc_table_Dx5[:, 0], doc_table_Dx5[:, 2]).astype(np.int64)
  payloads = {"tokens.npy": layout.npy_bytes(tokens_NxM), "doc_ids.npy": layout.npy_bytes(doc_ids_N),
              "doc_table.npy": layout.npy_bytes(doc_table_Dx5), "doc_keys.json": _json_bytes(keys)}
  blocks = {"tokens.npy": tokens_NxM, "doc_ids.npy": doc_ids_N, "doc_table.npy": doc_table_Dx5}
  files = {}
  for name in SHARD_FILES:
    write_bytes_atomic(shard_dir / name, payloads[name])
    files[name] = {"sha256": sha256_bytes(payloads[name]),
                   "bytes": len(payloads[name])}
    if name in blocks:
      rows = verify.block_rows(blocks[name][:1].nbytes or 1)
      files[name].update(block_rows=rows, block_sha256=verify.block_digests(blocks[name], rows))
    if os.environ.get("RETRO_JAX_TEST_KILL_MIDSHARD") == str(index) and name == "tokens.npy":
      os.kill(os.getpid(), signal.SIGKILL)  # Test hook: die with a half-written shard.
  marker = {
      "index": index, "settings": settings, "files": files, "num_chunks": int(len(tokens_NxM)),
      "num_docs": len(docs), "num_tokens": num_tokens, "docs_shorter_than_chunk": short,
      "num_utf8_bytes": int(doc_table_Dx5[:, 3].sum()),
      "first_doc_id": int(docs[0][0]) if docs else 0,
      "heldout_doc_ids": [int(d) for d, _, h in docs if h],
      "heldout_doc_keys": [d.key for _, d, h in docs if h],
      "corpus_stats": corpus_stats,
  }
  write_bytes_atomic(out / (shard_name(index) + ".done.json"), _json_bytes(marker))
  return marker


def build_chunk_store(corpus_spec: str, out_dir: str | os.PathLike, tokenizer,
                      chunk_size: int = 64, docs_per_shard: int = 4096,
                      heldout_fraction: float = 0.01, seed: int = 0, max_docs: int | None = None,
                      append_eos: bool = True, finalize: bool = True, progress: bool = True) -> dict:
  """Writes every store shard (finished ones are kept), then finalizes if asked. Returns
  {"seconds", "written", "skipped", "num_store_shards", ...}. The Beam build
  (retro_jax/build/pipeline.py) writes the same shards one element each with `write_store_shard`."""
  if chunk_size < 1 or docs_per_shard < 1:
    raise ValueError(f"chunk_size={chunk_size} and docs_per_shard={docs_per_shard} must be >= 1")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  settings = _settings(tokenizer, chunk_size, docs_per_shard, corpus_spec, max_docs,
                       heldout_fraction, seed, append_eos)
  t0 = time.perf_counter()
  stats = corpus_lib.CorpusStats()
  # Every worker walks the whole corpus (cheap next to tokenising) so doc ids agree everywhere.
  docs = corpus_lib.read_documents(corpus_spec, stats, max_docs=max_docs)
  num_store_shards = math.ceil(len(docs) / docs_per_shard)
  corpus_stats = {**stats.to_json(), "num_store_shards": num_store_shards}
  mine = list(range(num_store_shards))
  written, skipped = [], []
  bar = tqdm.tqdm(total=len(mine), unit="shard", desc="chunk store", disable=not progress)
  for s in mine:
    if not write_store_shard(out, s, docs, tokenizer, settings, corpus_stats):
      skipped.append(s)
      bar.update(1)
      continue
    written.append(s)
    bar.update(1)
  bar.close()
  result = {"seconds": time.perf_counter() - t0, "written": written, "skipped": skipped,
            "num_store_shards": num_store_shards, "num_docs": len(docs)}
  if finalize:
    result["manifest"] = finalize_chunk_store(out)
  return result


def store_settings(tokenizer, corpus_spec: str, chunk_size: int = 64, docs_per_shard: int = 4096,
                   heldout_fraction: float = 0.01, seed: int = 0, max_docs: int | None = None,
                   append_eos: bool = True) -> dict:
  """The settings every shard's done marker records (a shard with others is refused)."""
  return _settings(tokenizer, chunk_size, docs_per_shard, corpus_spec, max_docs, heldout_fraction,
                   seed, append_eos)


def write_store_shard(out_dir: str | os.PathLike, shard: int,
                      docs: Sequence[corpus_lib.Document], tokenizer, settings: dict,
                      corpus_stats: dict) -> bool:
  """Writes store shard `shard` (documents shard * docs_per_shard.. of the whole corpus `docs`)
  unless it is finished; returns whether it was written."""
  per = settings["docs_per_shard"]
  return write_store_shard_docs(out_dir, shard, lambda: docs[shard * per:(shard + 1) * per],
                                tokenizer, settings, corpus_stats)


def write_store_shard_docs(out_dir: str | os.PathLike, shard: int,
                           shard_docs: Callable[[], Sequence[corpus_lib.Document]], tokenizer,
                           settings: dict, corpus_stats: dict) -> bool:
  """`write_store_shard` given only the shard's own documents (ids shard * docs_per_shard..),
  read by `shard_docs()` only when the shard is not finished."""
  out = epath.Path(out_dir)
  if _shard_done(out, shard, settings) is not None:
    return False
  per, frac, seed = settings["docs_per_shard"], settings["heldout_fraction"], settings["seed"]
  part = [(shard * per + j, d, corpus_lib.is_heldout(d.key, frac, seed))
          for j, d in enumerate(shard_docs())]
  _write_shard(out, shard, part, tokenizer, settings["chunk_size"], settings["append_eos"],
               settings, corpus_stats)
  _WRITTEN_IN_PROCESS.append(shard)
  kill_after = os.environ.get("RETRO_JAX_TEST_KILL_AFTER_SHARDS")
  if kill_after is not None and len(_WRITTEN_IN_PROCESS) >= int(kill_after):
    os.kill(os.getpid(), signal.SIGKILL)  # Test hook: die between shards.
  return True


_WRITTEN_IN_PROCESS: list[int] = []  # for the test hook above


def finalize_chunk_store(out_dir: str | os.PathLike) -> dict:
  """Checks every shard's done marker and writes STORE/manifest.json (offsets, counts, checksums)."""
  out = epath.Path(out_dir)
  first_path = out / (shard_name(0) + ".done.json")
  if not first_path.exists():
    raise ChunkStoreError(f"{out} has no finished shard 0 ({first_path}); run the chunking first")
  first = json.loads(first_path.read_text())
  num_store_shards = first["corpus_stats"]["num_store_shards"]
  markers = []
  missing = [s for s in range(num_store_shards)
             if not (out / (shard_name(s) + ".done.json")).exists()]
  if missing:
    raise ChunkStoreError(f"{out}: shards {missing} of {num_store_shards} are not done; run "
                          f"the chunks stage for them and finalize again")
  for s in range(num_store_shards):
    markers.append(json.loads((out / (shard_name(s) + ".done.json")).read_text()))
  settings = first["settings"]
  shards, offset, doc_offset = [], 0, 0
  for m in markers:
    if m["settings"] != settings:
      raise ChunkStoreError(f"{out}: shard {m['index']} was written with other settings")
    if m["first_doc_id"] != doc_offset:
      raise ChunkStoreError(f"{out}: shard {m['index']} starts at doc {m['first_doc_id']}, "
                            f"expected {doc_offset}")
    shards.append({"index": m["index"], "path": shard_name(m["index"]), "first_chunk_id": offset,
                   "num_chunks": m["num_chunks"], "first_doc_id": m["first_doc_id"],
                   "num_docs": m["num_docs"], "num_tokens": m["num_tokens"],
                   "files": _with_blocks(out, m)})
    offset += m["num_chunks"]
    doc_offset += m["num_docs"]
  heldout_ids = [i for m in markers for i in m["heldout_doc_ids"]]
  heldout_keys = [k for m in markers for k in m["heldout_doc_keys"]]
  manifest = {
      "format_version": FORMAT_VERSION,
      "chunk_size": settings["chunk_size"],
      "num_chunks": offset,
      "num_docs": doc_offset,
      "num_tokens": sum(m["num_tokens"] for m in markers),
      "num_utf8_bytes": sum(_utf8_bytes(out, m) for m in markers),
      "docs_shorter_than_chunk": sum(m["docs_shorter_than_chunk"] for m in markers),
      "append_eos": settings["append_eos"],
      "seed": settings["seed"],
      "tokenizer": settings["tokenizer"],
      "corpus": {"spec": settings["corpus"], "max_docs": settings["max_docs"],
                 "docs_per_shard": settings["docs_per_shard"], "bad_input": first["corpus_stats"]},
      "heldout": {"fraction": settings["heldout_fraction"], "seed": settings["seed"],
                  "num_docs": len(heldout_ids), "doc_ids": heldout_ids, "doc_keys": heldout_keys},
      "doc_table_columns": list(DOC_TABLE_COLUMNS),
      "shards": shards,
      "versions": package_versions(),
  }
  write_manifest(out, manifest)
  return manifest


def _with_blocks(out: epath.Path, marker: dict) -> dict:
  """A done marker's file records, with block checksums: as recorded, or (a shard written before
  they were) computed now from its files, after each file's whole checksum is checked."""
  files = {k: dict(v) for k, v in marker["files"].items()}
  for name in BLOCK_FILES:
    rec = files.get(name)
    if rec is None or "block_sha256" in rec:
      continue
    path = out / shard_name(marker["index"]) / name
    if sha256_file(path) != rec["sha256"]:
      raise ChunkStoreError(f"{path} differs from the sha256 its done marker records; rebuild the "
                            f"shard (delete {path.parent}.done.json and rerun the chunks stage)")
    arr = npy_rows.open_rows(path)
    rows = verify.block_rows(int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    rec.update(block_rows=rows, block_sha256=verify.file_block_digests(path, rows))
  return files


def _utf8_bytes(out: epath.Path, marker: dict) -> int:
  """A shard's UTF-8 bytes: its done marker's total, or (a shard written before markers kept
  it) the sum of its document table's column."""
  if "num_utf8_bytes" in marker:
    return int(marker["num_utf8_bytes"])
  table = np.load(io.BytesIO((out / shard_name(marker["index"]) / "doc_table.npy").read_bytes()))
  return int(table[:, DOC_TABLE_COLUMNS.index("num_utf8_bytes")].sum())


def merge_ranges(ranges_Rx2: np.ndarray) -> np.ndarray:
  """Sorted, merged (overlapping or touching ones joined) int64 [R', 2] `[start, end)` ranges."""
  r = np.asarray(ranges_Rx2, np.int64).reshape(-1, 2)
  r = r[r[:, 1] > r[:, 0]]
  r = r[np.argsort(r[:, 0], kind="stable")]
  out: list[list[int]] = []
  for s, e in r.tolist():
    if out and s <= out[-1][1]:
      out[-1][1] = max(out[-1][1], e)
    else:
      out.append([s, e])
  return np.asarray(out, np.int64).reshape(-1, 2)


def in_ranges(ids, ranges_Rx2: np.ndarray) -> np.ndarray:
  """bool mask: ids inside any of the sorted, disjoint `[start, end)` ranges (-1 never is)."""
  ids = np.asarray(ids, np.int64)
  if len(ranges_Rx2) == 0:
    return np.zeros(ids.shape, bool)
  j = np.searchsorted(ranges_Rx2[:, 0], ids, side="right") - 1
  return (j >= 0) & (ids < ranges_Rx2[np.maximum(j, 0), 1])


def content_sha256(shards: Sequence[dict]) -> str:
  """sha256 over every shard's file checksums: what the later stages were built from."""
  parts = [(s["index"], sorted((n, f["sha256"]) for n, f in s["files"].items())) for s in shards]
  return sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def record_path(root: epath.Path, shard: int) -> epath.Path:
  return root / RECORDS / (shard_name(shard) + ".json")


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
  """Writes a whole manifest (as `read_manifest` gives it) in format 3: one record per shard
  (STORE/records/), the offsets array and STORE/heldout.json, then STORE/manifest.json (the commit
  point), each atomically. A run killed before the manifest leaves the store as it was: records and
  offsets rows of the shards the old manifest names are unchanged (shards are only appended)."""
  out = epath.Path(out_dir)
  shards = list(manifest["shards"])
  held_in = manifest["heldout"]
  ids, keys = list(held_in["doc_ids"]), list(held_in["doc_keys"])
  held = {k: v for k, v in held_in.items() if k not in ("doc_ids", "doc_keys", "file", "sha256")}
  held_bytes = _json_bytes({"doc_ids": ids, "doc_keys": keys})
  (out / RECORDS).mkdir(parents=True, exist_ok=True)
  for s in shards:
    write_bytes_atomic(record_path(out, int(s["index"])), _json_bytes(s))
  offsets_Sx2 = np.asarray([[s["first_chunk_id"], s["first_doc_id"]] for s in shards]
                           + [[manifest["num_chunks"], manifest["num_docs"]]], np.int64)
  write_bytes_atomic(out / OFFSETS, layout.npy_bytes(offsets_Sx2))
  write_bytes_atomic(out / HELDOUT, held_bytes)
  top = {k: v for k, v in manifest.items() if k not in ("shards", "shards_file")}
  top["heldout"] = {**held, "file": HELDOUT, "sha256": sha256_bytes(held_bytes)}
  top.update(format_version=FORMAT_VERSION, num_shards=len(shards), records_dir=RECORDS,
             offsets_file=OFFSETS, content_sha256=content_sha256(shards))
  write_bytes_atomic(out / MANIFEST, _json_bytes(top))
  if (out / SHARDS).exists():  # format 2's shard list, superseded by the records
    (out / SHARDS).unlink()


class _Lazy(dict):
  """A manifest dict whose big entries (`lazy`: key -> loader) are read on first access."""

  def __init__(self, data: dict, lazy: dict[str, Callable[[], Any]] | None = None):
    super().__init__(data)
    self._lazy = lazy or {}

  def __missing__(self, key):
    if key not in self._lazy:
      raise KeyError(key)
    self[key] = self._lazy.pop(key)()
    return self[key]


def _read_json(path: epath.Path, what: str) -> Any:
  if not path.exists():
    raise ChunkStoreError(f"{path} is missing: the store's {what} is gone; rebuild the store "
                          f"(`python -m retro_jax.build_db --stages=chunks`)")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ChunkStoreError(f"{path} is corrupt ({e}); rerun "
                          f"`python -m retro_jax.build_db --stages=finalize`") from e


def read_record(root: epath.Path, shard: int) -> dict:
  """Store shard `shard`'s record (format 3): offsets, counts, file and block checksums."""
  return _read_json(record_path(root, shard), f"record of shard {shard}")


def read_manifest(root: epath.Path, top: dict | None = None) -> dict:
  """STORE/manifest.json with its shards and held-out ids, each file read on first access (the
  whole shard list, every record, only when `["shards"]` is asked for: whole-store tools)."""
  root = epath.Path(root)
  top = top if top is not None else _read_json(root / MANIFEST, "manifest")
  if "shards" in top:  # format 1: everything inline
    return _Lazy(top)
  held = top["heldout"]
  held_lazy = {k: (lambda k=k: _read_json(root / held.get("file", HELDOUT), "held-out list")[k])
               for k in ("doc_ids", "doc_keys")}
  if "offsets_file" in top:  # format 3
    shards = lambda: [read_record(root, s) for s in range(int(top["num_shards"]))]  # noqa: E731
  else:
    shards = lambda: _read_json(root / top.get("shards_file", SHARDS), "shard list")  # noqa: E731
  return _Lazy({**top, "heldout": _Lazy(held, held_lazy)}, {"shards": shards})


def append_shard(out_dir: str | os.PathLike, docs: Sequence[corpus_lib.Document], tokenizer,
                 corpus_spec: str, corpus_stats: dict) -> dict:
  """Writes `docs` as a new last shard of a finished store (doc ids and chunk ids continue after
  the existing ones; held-out by the store's own rule) and returns the updated manifest, which the
  caller writes with `write_manifest` (until then the store is unchanged; rerunning rewrites the
  same shard). Existing shards are not touched."""
  out = epath.Path(out_dir)
  manifest = read_manifest(out)
  index, first_doc = int(manifest.get("num_shards", len(manifest["shards"]))), int(manifest["num_docs"])
  tokenizer_lib.check_tokenizer(tokenizer, manifest["tokenizer"], f"chunk store {out}")
  fraction, seed = manifest["heldout"]["fraction"], manifest["heldout"]["seed"]
  settings = _settings(tokenizer, manifest["chunk_size"], manifest["corpus"]["docs_per_shard"],
                       corpus_spec, None, fraction, seed, manifest["append_eos"])
  part = [(first_doc + j, d, corpus_lib.is_heldout(d.key, fraction, seed))
          for j, d in enumerate(docs)]
  m = _write_shard(out, index, part, tokenizer, manifest["chunk_size"], manifest["append_eos"],
                   settings, corpus_stats)
  manifest["shards"] = manifest["shards"] + [{
      "index": index, "path": shard_name(index), "first_chunk_id": int(manifest["num_chunks"]),
      "num_chunks": m["num_chunks"], "first_doc_id": first_doc, "num_docs": m["num_docs"],
      "num_tokens": m["num_tokens"], "files": m["files"], "corpus": corpus_spec}]
  manifest["num_shards"] = index + 1
  manifest["num_chunks"] += m["num_chunks"]
  manifest["num_docs"] += m["num_docs"]
  manifest["num_tokens"] += m["num_tokens"]
  if "num_utf8_bytes" in manifest:
    manifest["num_utf8_bytes"] += m["num_utf8_bytes"]
  manifest["docs_shorter_than_chunk"] += m["docs_shorter_than_chunk"]
  held = manifest["heldout"]
  held["doc_ids"] = held["doc_ids"] + m["heldout_doc_ids"]
  held["doc_keys"] = held["doc_keys"] + m["heldout_doc_keys"]
  held["num_docs"] = len(held["doc_ids"])
  return manifest


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


def _load_npy(path: epath.Path, mmap: bool = True, sized: bool = False) -> np.ndarray:
  """`sized`: its existence was just checked (by its size)."""
  if not sized and not path.exists():
    raise ChunkStoreError(f"chunk store file {path} is missing; rebuild its shard (delete the "
                          f"shard's .done.json and rerun `prepare --stage=chunks`)")
  if mmap:  # memory-mapped locally; ranged row reads on gs:// (no whole-shard copy, no cache)
    return npy_rows.open_rows(path)
  with path.open("rb") as f:
    return npy_rows.load(f)


class ChunkStore:
  """Read access to a finished store: memory-mapped gathers over int64 global chunk ids."""

  def __init__(self, root: epath.Path, manifest: dict):
    self.root = root
    self.manifest = manifest
    self.chunk_size = int(manifest["chunk_size"])
    self.num_chunks = int(manifest["num_chunks"])
    self.num_docs = int(manifest["num_docs"])
    self.pad_id = int(manifest["tokenizer"]["pad_id"])
    self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
    # Opening reads manifest.json only (a fixed size, whatever the store's size). A read of store
    # shard s then reads s's record (format 3: STORE/records/shard-s.json; formats 1 and 2: the
    # whole shard list), finds s by the offsets array (read whole when small, else bisected by
    # ranged row reads), checks s's file sizes, and hashes only the blocks of rows it touches;
    # s's document table (and keys) the first time one of its documents is asked about.
    self._per_shard = "offsets_file" in manifest  # format 3
    self._records: dict[int, dict] = {}
    self._offsets = None  # format 3: offsets.npy rows (npy_rows.open_rows)
    self._offsets_whole: np.ndarray | None = None  # ... all of them, when small
    self._sized: set[tuple[int, str]] = set()
    self._arrays: dict[tuple[int, str], tuple[Any, tuple]] = {}  # -> (array, verify.file_key)
    self._whole_checked: set[tuple[int, str]] = set()
    self._tables: dict[int, np.ndarray] = {}
    self._keys: dict[int, list[str]] = {}
    self._whole: np.ndarray | None = None

  # -- shard records and offsets ----------------------------------------------------------------
  def _damaged(self, what: str) -> ChunkStoreError:
    return ChunkStoreError(f"{self.root / MANIFEST}: {what}; the manifest is damaged, rerun "
                           f"`python -m retro_jax.build_db --stages=finalize`")

  def _offsets_rows(self):
    """Format 3: STORE/offsets.npy, its first and last rows checked against the manifest."""
    if self._offsets is None:
      path = self.root / self.manifest["offsets_file"]
      if not path.exists():
        raise ChunkStoreError(f"{path} is missing; rerun `python -m retro_jax.build_db "
                              f"--stages=finalize`")
      arr = npy_rows.open_rows(path)
      n = self.num_shards
      if arr.dtype != np.int64 or arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < n + 1:
        raise self._damaged(f"{path} is {arr.dtype} {arr.shape}, not int64 [{n + 1}, 2]")
      whole = np.asarray(arr[:n + 1]) if n + 1 <= WHOLE_OFFSETS_ROWS else None
      ends = whole[[0, n]] if whole is not None else np.asarray(arr[np.array([0, n])])
      if ends[0].tolist() != [0, 0] or ends[1].tolist() != [self.num_chunks, self.num_docs]:
        raise self._damaged(f"num_chunks {self.num_chunks} / num_docs {self.num_docs}, but its "
                            f"shards hold {ends[1, 0]} / {ends[1, 1]}")
      self._offsets, self._offsets_whole = arr, whole
    return self._offsets

  def _offset_rows(self, shards) -> np.ndarray:
    """int64 [n, 2]: (first chunk id, first doc id) of each shard (shard num_shards: the totals)."""
    shards = np.asarray(shards, np.int64)
    if not self._per_shard:
      return np.stack([self.shard_offsets[shards], self.doc_offsets[shards]], axis=-1)
    arr = self._offsets_rows()
    return self._offsets_whole[shards] if self._offsets_whole is not None else np.asarray(arr[shards])

  def _shard_of(self, values, col: int) -> np.ndarray:
    """int64: the shard holding each chunk id (col 0) or document id (col 1), in range."""
    if not self._per_shard:
      offsets = self.shard_offsets if col == 0 else self.doc_offsets
      return np.searchsorted(offsets, values, side="right") - 1
    arr = self._offsets_rows()
    if self._offsets_whole is not None:
      return np.searchsorted(self._offsets_whole[:, col], values, side="right") - 1
    return npy_rows.bisect_rows(arr, col, values, self.num_shards)

  def record(self, shard: int) -> dict:
    """Store shard `shard`'s record: {index, path, first_chunk_id, num_chunks, first_doc_id,
    num_docs, num_tokens, files: {name: {sha256, bytes[, block_rows, block_sha256]}}}; format 3
    reads its own record file only, checked against the offsets array."""
    shard = int(shard)
    rec = self._records.get(shard)
    if rec is not None:
      return rec
    if not 0 <= shard < self.num_shards:
      raise IndexError(f"store shard {shard} not in [0, {self.num_shards})")
    if not self._per_shard:
      self._check_counts()
      rec = self.manifest["shards"][shard]
    else:
      rec = read_record(self.root, shard)
      (c0, d0), (c1, d1) = self._offset_rows([shard, shard + 1]).tolist()
      got = [rec.get(k) for k in ("index", "first_chunk_id", "num_chunks", "first_doc_id",
                                  "num_docs")]
      if got != [shard, c0, c1 - c0, d0, d1 - d0]:
        raise self._damaged(f"shard {shard}'s record {record_path(self.root, shard)} says "
                            f"(index, first chunk, chunks, first doc, docs) {got}, its offsets "
                            f"{[shard, c0, c1 - c0, d0, d1 - d0]}")
    self._records[shard] = rec
    return rec

  @functools.cached_property
  def shard_offsets(self) -> np.ndarray:
    """int64 [S + 1]: shard s holds chunks [shard_offsets[s], shard_offsets[s + 1]) (every shard:
    whole-store tools; reads use the per-shard lookups)."""
    if self._per_shard:
      return np.asarray(self._offsets_rows()[:self.num_shards + 1])[:, 0].copy()
    self._check_counts()
    return np.asarray([s["first_chunk_id"] for s in self.manifest["shards"]] + [self.num_chunks],
                      np.int64)

  @functools.cached_property
  def doc_offsets(self) -> np.ndarray:
    """int64 [S + 1]: shard s holds documents [doc_offsets[s], doc_offsets[s + 1])."""
    if self._per_shard:
      return np.asarray(self._offsets_rows()[:self.num_shards + 1])[:, 1].copy()
    self._check_counts()
    return np.asarray([s["first_doc_id"] for s in self.manifest["shards"]] + [self.num_docs],
                      np.int64)

  def _first_read(self, shard: int, name: str) -> None:
    """A shard file's size against its record, the first time it is read."""
    if (shard, name) not in self._sized:
      s = self.record(shard)
      verify.size(self.root / s["path"] / name, s.get("files", {}).get(name, {}).get("bytes"),
                  self._fix(s), ChunkStoreError)
      self._sized.add((shard, name))

  def _fix(self, s: dict) -> str:
    return (f"rebuild shard {s['index']} (delete {self.root / s['path']}.done.json and rerun "
            f"`python -m retro_jax.build_db`, which rebuilds it)")

  def _check_counts(self) -> None:
    """Formats 1 and 2: the manifest's totals and offsets agree with its shards (a hand-edited or
    damaged manifest is refused at the first read, not at the first out-of-range gather)."""
    if getattr(self, "_counts_checked", False):
      return
    totals = {}
    for what, start_key, count_key in (("chunk", "first_chunk_id", "num_chunks"),
                                       ("document", "first_doc_id", "num_docs")):
      total = 0
      for s in self.manifest["shards"]:
        if int(s[start_key]) != total:
          raise self._damaged(f"shard {s['index']} starts at {what} {s[start_key]}, expected "
                              f"{total}")
        total += int(s[count_key])
      totals[what] = total
    first, docs = totals["chunk"], totals["document"]
    if first != self.num_chunks or docs != self.num_docs:
      raise self._damaged(f"num_chunks {self.num_chunks} / num_docs {self.num_docs}, but its "
                          f"shards hold {first} / {docs}")
    self._counts_checked = True

  @classmethod
  def open(cls, path: str | os.PathLike) -> "ChunkStore":
    """Opens STORE (or DB whose store is DB/chunks); a gs:// one after a quick reachability
    check (layout.db_root: one clear error, not minutes of client retries)."""
    root = layout.db_root(path)
    if not (root / MANIFEST).exists() and (root / "chunks" / MANIFEST).exists():
      root = root / "chunks"
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
      raise ChunkStoreError(f"no chunk store manifest at {manifest_path}: build the store with "
                            f"`python -m retro_jax.build_db --db=...` (its chunks stage)")
    try:
      manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
      raise ChunkStoreError(f"{manifest_path} is corrupt ({e}); rerun "
                            f"`python -m retro_jax.build_db --stages=finalize`") from e
    if manifest.get("format_version") not in (1, 2, FORMAT_VERSION):
      raise ChunkStoreError(f"{manifest_path}: format {manifest.get('format_version')}, this code "
                            f"reads 1 to {FORMAT_VERSION}; rebuild the store")
    return cls(root, read_manifest(root, manifest))

  # -- per-shard arrays -----------------------------------------------------------------------
  @property
  def num_shards(self) -> int:
    return int(self.manifest.get("num_shards") or len(self.manifest["shards"]))

  def _array(self, shard: int, name: str):
    """(rows of STORE/shard/name opened for row reads, its verify.file_key): sizes and shape
    checked, nothing hashed."""
    got = self._arrays.get((shard, name))
    if got is None:
      self._first_read(shard, name)
      s = self.record(shard)
      path = self.root / s["path"] / name
      arr = _load_npy(path, sized=True)
      want, dtype = {"tokens.npy": ((s["num_chunks"], self.chunk_size), np.int32),
                     "doc_ids.npy": ((s["num_chunks"],), np.int64),
                     "doc_table.npy": ((s["num_docs"], len(DOC_TABLE_COLUMNS)), np.int64)}[name]
      if arr.shape != want or arr.dtype != dtype:
        raise ChunkStoreError(f"{path}: shape {arr.shape} {arr.dtype}, its record says {want} "
                              f"{np.dtype(dtype)}; the file is corrupt, {self._fix(s)}")
      got = self._arrays[(shard, name)] = (arr, verify.file_key(path))
    return got

  def _verified_rows(self, shard: int, name: str, rows) -> np.ndarray:
    """Rows of STORE/shard/name, each block they touch hashed the first time (stores written
    before block checksums: the whole file, once per process)."""
    arr, key = self._array(shard, name)
    s = self.record(shard)
    rec = s.get("files", {}).get(name, {})
    path = self.root / s["path"] / name
    if "block_sha256" in rec:
      verify.blocks_once(path, arr, rows, int(rec["block_rows"]), rec["block_sha256"],
                         self._fix(s), ChunkStoreError, key=key)
    else:
      verify.file_once(path, rec.get("sha256"), self._fix(s), ChunkStoreError)
    return arr[rows] if len(rows) else np.empty((0,) + arr.shape[1:], arr.dtype)

  def _whole_array(self, shard: int, name: str):
    """Every row of STORE/shard/name for whole-shard readers, verified whole (every block)."""
    arr, _ = self._array(shard, name)
    if (shard, name) not in self._whole_checked:
      s = self.record(shard)
      rec = s.get("files", {}).get(name, {})
      path = self.root / s["path"] / name
      if "block_sha256" in rec:
        br = int(rec["block_rows"])
        verify.blocks_once(path, arr, np.arange(0, len(arr), br), br, rec["block_sha256"],
                           self._fix(s), ChunkStoreError, key=self._arrays[(shard, name)][1])
      else:
        verify.file_once(path, rec.get("sha256"), self._fix(s), ChunkStoreError)
      if name == "tokens.npy":
        verify.ids_in_range(arr, 0, self.vocab_size, f"chunk store file {path}", self._fix(s),
                            error=ChunkStoreError)
      self._whole_checked.add((shard, name))
    return arr

  def shard_tokens(self, shard: int) -> np.ndarray:
    """int32 [n, chunk_size]: store shard `shard`'s tokens, all verified (whole-shard readers;
    gathers verify only the blocks they touch)."""
    return self._whole_array(int(shard), "tokens.npy")

  def shard_doc_ids(self, shard: int) -> np.ndarray:
    return self._whole_array(int(shard), "doc_ids.npy")

  def shard_doc_table(self, shard: int) -> np.ndarray:
    """int64 [d, 5] (DOC_TABLE_COLUMNS; first_row within the shard) of store shard `shard`, read
    (checksum, document ids, chunk count) the first time it is needed."""
    table = self._tables.get(shard)
    if table is None:
      self._first_read(shard, "doc_table.npy")
      s = self.record(shard)
      path = self.root / s["path"] / "doc_table.npy"
      if "block_sha256" in s.get("files", {}).get("doc_table.npy", {}):
        table = np.asarray(self._whole_array(shard, "doc_table.npy"))
      else:
        verify.file_once(path, s.get("files", {}).get("doc_table.npy", {}).get("sha256"),
                         self._fix(s), ChunkStoreError)
        table = np.asarray(_load_npy(path, mmap=False), np.int64).reshape(
            -1, len(DOC_TABLE_COLUMNS))
      first, n = int(s["first_doc_id"]), int(s["num_docs"])
      if len(table) != n or not np.array_equal(table[:, 0], np.arange(first, first + n)):
        raise ChunkStoreError(f"{path}: the document table does not cover docs {first}.."
                              f"{first + n - 1} in order; the store is corrupt, {self._fix(s)}")
      if int(table[:, 2].sum()) != int(s["num_chunks"]):
        raise self._damaged(f"shard {s['index']} has num_chunks {s['num_chunks']} but its "
                            f"document table covers {int(table[:, 2].sum())} chunks")
      self._tables[shard] = table
    return table

  def _table_rows(self, shard: int, rows) -> np.ndarray:
    """Rows of store shard `shard`'s document table: from the whole table when it is held or has
    no block checksums, else by row reads (the blocks they touch verified), each row checked to be
    its document's and to lie inside the shard."""
    s = self.record(shard)
    if shard in self._tables or "block_sha256" not in s.get("files", {}).get("doc_table.npy", {}):
      return self.shard_doc_table(shard)[rows]
    uniq, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
    got = np.asarray(self._verified_rows(shard, "doc_table.npy", uniq), np.int64)
    first, n = int(s["first_doc_id"]), int(s["num_chunks"])
    if (not np.array_equal(got[:, 0], first + uniq) or (got[:, 1] < 0).any()
        or (got[:, 1] + got[:, 2] > n).any()):
      raise ChunkStoreError(f"{self.root / s['path'] / 'doc_table.npy'}: rows {uniq.tolist()[:5]} "
                            f"do not describe their documents inside the shard's {n} chunks; the "
                            f"store is corrupt, {self._fix(s)}")
    return got[inverse]

  def doc_rows(self, doc_ids) -> np.ndarray:
    """int64 [n, 5]: the document-table rows of these global document ids, first_row made a
    global chunk id (only the shards holding them are read)."""
    docs_N = np.asarray(doc_ids, np.int64).reshape(-1)
    if docs_N.size and (docs_N.min() < 0 or docs_N.max() >= self.num_docs):
      raise IndexError(f"doc ids must be in [0, {self.num_docs}); got "
                       f"[{docs_N.min()}, {docs_N.max()}]")
    out = np.empty((len(docs_N), len(DOC_TABLE_COLUMNS)), np.int64)
    shard_N = self._shard_of(docs_N, 1)
    for s in np.unique(shard_N).tolist():
      m = shard_N == s
      rec = self.record(s)
      out[m] = self._table_rows(s, docs_N[m] - int(rec["first_doc_id"]))
      out[m, 1] += int(rec["first_chunk_id"])
    return out

  def _whole_table(self) -> np.ndarray:
    """Every shard's document table (global first rows): O(documents) memory, built on first use
    by the whole-store views below (evaluation and statistics); lookups use `doc_rows`."""
    if self._whole is None:
      self._whole = self.doc_rows(np.arange(self.num_docs, dtype=np.int64))
    return self._whole

  @property
  def doc_first_chunk(self) -> np.ndarray:
    """int64 [num_docs]: each document's first global chunk id (whole store; see doc_rows)."""
    return self._whole_table()[:, 1]

  @property
  def doc_num_chunks(self) -> np.ndarray:
    return self._whole_table()[:, 2]

  @property
  def doc_num_bytes(self) -> np.ndarray:
    return self._whole_table()[:, 3]

  @property
  def doc_heldout(self) -> np.ndarray:
    return self._whole_table()[:, 4].astype(bool)

  def _check_ids(self, ids) -> np.ndarray:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.num_chunks):
      raise IndexError(f"chunk ids must be in [0, {self.num_chunks}); got "
                       f"[{ids_N.min()}, {ids_N.max()}]")
    return ids_N

  def _gather(self, ids_N: np.ndarray, name: str, tail: tuple, dtype) -> np.ndarray:
    out = np.empty((len(ids_N),) + tail, dtype)
    shard_N = self._shard_of(ids_N, 0)
    for s in np.unique(shard_N).tolist():
      sel = np.nonzero(shard_N == s)[0]
      rows = ids_N[sel] - int(self.record(s)["first_chunk_id"])
      order = np.argsort(rows, kind="stable")  # Sorted reads from the memmap.
      got = self._verified_rows(s, name, rows[order])
      if name == "tokens.npy" and got.size and (got.min() < 0 or got.max() >= self.vocab_size):
        s_rec = self.record(s)
        raise ChunkStoreError(f"chunk store file {self.root / s_rec['path'] / name} holds ids in "
                              f"[{got.min()}, {got.max()}], outside [0, {self.vocab_size}); "
                              f"{self._fix(s_rec)}")
      out[sel[order]] = got
    return out

  # -- public read API ------------------------------------------------------------------------
  def tokens(self, ids) -> np.ndarray:
    """int32 [n, chunk_size] tokens of global chunk ids (int64 [n])."""
    ids_N = self._check_ids(ids)
    return self._gather(ids_N, "tokens.npy", (self.chunk_size,), np.int32)

  def doc_ids(self, ids) -> np.ndarray:
    """int64 [n] document id of each chunk."""
    ids_N = self._check_ids(ids)
    return self._gather(ids_N, "doc_ids.npy", (), np.int64)

  def doc_range(self, doc_id: int) -> tuple[int, int]:
    """(first_chunk_id, end_chunk_id) of a document: its chunks are [first, end)."""
    if not 0 <= doc_id < self.num_docs:
      raise IndexError(f"doc id {doc_id} not in [0, {self.num_docs})")
    row = self.doc_rows([doc_id])[0]
    return int(row[1]), int(row[1] + row[2])

  def doc_key(self, doc_id: int) -> str:
    if not 0 <= doc_id < self.num_docs:
      raise IndexError(f"doc id {doc_id} not in [0, {self.num_docs})")
    shard = int(self._shard_of(np.int64(doc_id), 1))
    s = self.record(shard)
    if shard not in self._keys:
      self._first_read(shard, "doc_keys.json")
      self._keys[shard] = json.loads((self.root / s["path"] / "doc_keys.json").read_text())
    return self._keys[shard][doc_id - int(s["first_doc_id"])]

  def shard_of(self, ids) -> np.ndarray:
    """int64: the store shard holding each global chunk id (a few offsets rows read)."""
    return self._shard_of(self._check_ids(ids), 0).reshape(np.shape(ids))

  def shard_span(self, shard: int) -> tuple[int, int, int]:
    """(shard number, first global chunk id, chunk count) of one shard (its offsets rows only)."""
    if not 0 <= shard < self.num_shards:
      raise IndexError(f"store shard {shard} not in [0, {self.num_shards})")
    (a, _), (b, _) = self._offset_rows([shard, shard + 1]).tolist()
    return int(shard), int(a), int(b - a)

  def shard_spans(self) -> list[tuple[int, int, int]]:
    """(shard number, first global chunk id, chunk count) of each shard, in order (the offsets of
    every shard: whole-store tools)."""
    offsets = self.shard_offsets
    return [(s, int(offsets[s]), int(offsets[s + 1] - offsets[s])) for s in range(self.num_shards)]

  @property
  def heldout_doc_ids(self) -> np.ndarray:
    return np.asarray(self.manifest["heldout"]["doc_ids"], np.int64)

  # -- deletions (retro_jax.build.edit) -----------------------------------------------------------
  @property
  def deletions_path(self) -> epath.Path:
    return self.root / DELETIONS

  def deleted_doc_ids(self) -> np.ndarray:
    """Sorted int64 ids of the removed documents (STORE/deletions.json; empty when none), read
    afresh on every call so that a long-lived reader can pick up a new deletion."""
    path = self.deletions_path
    if not path.exists():
      if self.manifest.get("edits", {}).get("deletions", {}).get("num_docs"):
        raise ChunkStoreError(f"{path} is missing but {self.root / MANIFEST} records removed "
                              f"documents; restore it (rerun the removals of the manifest's "
                              f"edits.log with `python -m retro_jax.edit_db`)")
      return np.zeros((0,), np.int64)
    try:
      ids = np.unique(np.asarray(json.loads(path.read_text())["doc_ids"], np.int64))
    except (json.JSONDecodeError, KeyError) as e:
      raise ChunkStoreError(f"{path} is corrupt ({e}); restore it from the manifest's edit log "
                            f"(`edits.log`) by rerunning `python -m retro_jax.edit_db "
                            f"--remove_docs=...`") from e
    if ids.size and (ids[0] < 0 or ids[-1] >= self.num_docs):
      raise ChunkStoreError(f"{path} names documents outside [0, {self.num_docs})")
    return ids

  def deleted_chunk_ranges(self) -> np.ndarray:
    """int64 [R, 2]: sorted, merged `[start, end)` chunk-id ranges of the removed documents."""
    rows = self.doc_rows(self.deleted_doc_ids())
    starts = rows[:, 1]
    ends = starts + rows[:, 2]
    return merge_ranges(np.stack([starts, ends], axis=1))

  def is_deleted(self, ids, ranges_Rx2: np.ndarray | None = None) -> np.ndarray:
    """bool [n]: whether each global chunk id belongs to a removed document."""
    ranges = self.deleted_chunk_ranges() if ranges_Rx2 is None else ranges_Rx2
    return in_ranges(np.asarray(ids, np.int64), ranges)

  def neighbour_tokens(self, ids, r: int) -> np.ndarray:
    """int32 [n, r]: each chunk followed by its continuation within the same document, padded with
    pad_id after the document's last chunk (never reads into the next document)."""
    ids_N = self._check_ids(ids)
    m = self.chunk_size
    rows = self.doc_rows(self.doc_ids(ids_N))
    end_N = rows[:, 1] + rows[:, 2]
    n_steps = math.ceil(r / m)
    out = np.full((len(ids_N), n_steps * m), self.pad_id, np.int32)
    for j in range(n_steps):
      cid_N = ids_N + j
      valid = cid_N < end_N
      if not valid.any():
        break
      out[valid, j * m:(j + 1) * m] = self.tokens(cid_N[valid])
    return out[:, :r]

  def _texts(self, ids_N: np.ndarray, tokens_NxM: np.ndarray, tokenizer) -> list[str]:
    # A document's first chunk starts with SentencePiece's dummy-prefix space (dropped by decode);
    # any later chunk's leading space is real text (kept by decode_fragment).
    first_N = self.doc_rows(self.doc_ids(ids_N))[:, 1] == ids_N
    frag = getattr(tokenizer, "decode_fragment", tokenizer.decode)
    return [(tokenizer.decode if f else frag)(row[row != self.pad_id].tolist())
            for f, row in zip(first_N, tokens_NxM)]

  def chunk_text(self, ids, tokenizer) -> list[str]:
    """Detokenised text of each chunk (pad removed); a document's chunks concatenate back to it
    (except where a chunk boundary splits a byte-fallback character)."""
    ids_N = self._check_ids(ids)
    return self._texts(ids_N, self.tokens(ids_N), tokenizer)

  def iter_chunk_texts(self, tokenizer, shard: int | None = None,
                       batch_size: int = 1024) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Yields (chunk_ids int64 [b], texts) over one shard (or all) in chunk-id order."""
    shards = range(self.num_shards) if shard is None else [shard]
    for s in shards:
      toks = self.shard_tokens(s)
      first = self.shard_span(s)[1]
      for start in range(0, len(toks), batch_size):
        block = np.asarray(toks[start:start + batch_size])
        ids_B = np.arange(first + start, first + start + len(block), dtype=np.int64)
        yield ids_B, self._texts(ids_B, block, tokenizer)

  def check(self, tokenizer=None, verify_checksums: bool = True) -> None:
    """Raises TokenizerMismatchError / ChunkStoreError on a wrong tokenizer or a bad shard file."""
    if tokenizer is not None:
      tokenizer_lib.check_tokenizer(tokenizer, self.manifest["tokenizer"],
                                    f"chunk store {self.root}")
    if not verify_checksums:
      return
    for s in self.manifest["shards"]:
      for name, rec in s["files"].items():
        path = self.root / s["path"] / name
        if not path.exists():
          raise ChunkStoreError(f"chunk store file {path} is missing; rebuild shard {s['index']}")
        digest = sha256_file(path)
        if digest != rec["sha256"]:
          raise ChunkStoreError(f"chunk store file {path} is corrupt: sha256 {digest[:12]} != "
                                f"manifest {rec['sha256'][:12]}; rebuild shard {s['index']} "
                                f"(delete {s['path']}.done.json, rerun --stage=chunks and finalize)")
    recorded = self.manifest.get("edits", {}).get("deletions", {}).get("sha256")
    if recorded and (not self.deletions_path.exists()
                     or sha256_file(self.deletions_path) != recorded):
      raise ChunkStoreError(f"{self.deletions_path} is missing or differs from the deletions "
                            f"recorded in {self.root / MANIFEST}; rerun the removals of the "
                            f"manifest's edits.log with `python -m retro_jax.edit_db`")
