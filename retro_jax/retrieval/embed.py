"""Embed stage: chunk texts -> `<db>/embeddings/shard-XXXXX.npy` (float32 [rows, 384]).

One `.npy` per chunk-store shard (same shard numbers, same row order as the shard's chunk ids),
written through `layout.NpyRowsWriter` (memory-mapped in place locally, one object per block on
gs://), never held whole in RAM. Work is done in fixed blocks
of `block_rows` rows; `shard-XXXXX.progress.json` records the finished rows, so a killed run resumes
at the next block, finished shards are skipped, and the output is byte-identical to an
uninterrupted run (block contents, and so batching, do not depend on where a run started).
`<db>/embeddings/embedder.json` records the embedder fingerprint, dtype, dim and max length; a run
with a different embedder refuses to touch existing embeddings.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, Iterator

import numpy as np
import tqdm
from etils import epath

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, npy_rows, verify
from retro_jax.db import prepare as prepare_lib
from retro_jax.db.layout import progress_path, write_json_atomic
from retro_jax.retrieval.embedder import Embedder, EmbedderMismatchError


def check_or_write_info(embedder: Embedder, out_dir: epath.Path) -> None:
  """Writes `embedder.json`, or raises EmbedderMismatchError if it names another embedder."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / layout.EMBEDDER_INFO
  if path.exists():
    embedder.check_info(json.loads(path.read_text()), where=str(path))
  else:
    write_json_atomic(path, embedder.info)


def load_embeddings(db_dir: str | os.PathLike, shard: int, embedder: Embedder | None = None) -> np.ndarray:
  """A finished shard's embeddings for row reads (memory-mapped read-only locally, ranged reads on
  gs://, retro_jax.db.npy_rows), its checksum verified (once per process); checks the embedder if
  one is given."""
  path = layout.embeddings_path(db_dir, shard)
  if not layout.is_finished(path):
    raise FileNotFoundError(f"{path}: not finished; run `python -m retro_jax.build_db "
                            f"--db={db_dir} --stages=embeddings`")
  if embedder is not None:
    info = layout.embeddings_dir(db_dir) / layout.EMBEDDER_INFO
    embedder.check_info(json.loads(info.read_text()), where=str(info))
  verify.embeddings_shard(db_dir, shard)
  return npy_rows.open_rows(path)


def _blocks(batches: Iterable[tuple[np.ndarray, list[str]]], block_rows: int,
            first_id: int) -> Iterator[tuple[int, list[str]]]:
  """Regroups (chunk_ids, texts) batches into (row offset, texts) blocks of `block_rows` rows."""
  expected = first_id
  buf: list[str] = []
  start = 0
  for ids, texts in batches:
    ids = np.asarray(ids, np.int64)
    if len(ids) != len(texts):
      raise ValueError(f"batch of {len(ids)} chunk ids but {len(texts)} texts")
    if len(ids) and not np.array_equal(ids, np.arange(expected, expected + len(ids), dtype=np.int64)):
      raise ValueError(f"chunk ids must be contiguous from {first_id}: expected {expected}.., got "
                       f"{ids[:3].tolist()}..; the embeddings must stay aligned with the chunk store")
    expected += len(ids)
    buf.extend(texts)
    while len(buf) >= block_rows:
      yield start, buf[:block_rows]
      buf, start = buf[block_rows:], start + block_rows
  if buf:
    yield start, buf


def write_finished(out_path: str | os.PathLike, num_rows: int, block_rows: int, fingerprint: str,
                   dtype: str) -> None:
  """The finished progress record beside an embeddings shard (with its sha256, checked on every
  read): the one format both embed_to_npy and the Beam pipeline's assembly write."""
  state = {"rows_done": num_rows, "done": True, "num_rows": num_rows, "block_rows": block_rows,
           "fingerprint": fingerprint, "dtype": dtype}
  write_json_atomic(progress_path(out_path), verify.record_sha256(epath.Path(out_path), state))


def embed_to_npy(embedder: Embedder, batches: Iterable[tuple[np.ndarray, list[str]]],
                 out_path: str | os.PathLike, num_rows: int, first_id: int = 0,
                 block_rows: int = 4096, desc: str | None = None) -> dict:
  """Embeds (chunk_ids, texts) batches with ids first_id.. first_id+num_rows-1 into a float32 .npy.

  Resumable: skips rows a previous run finished (per `<out>.progress.json`). Returns stats.
  """
  out_path = epath.Path(out_path)
  prog_path = progress_path(out_path)
  state = {"rows_done": 0, "done": False}
  if prog_path.exists() and layout.rows_output_exists(out_path):
    state = json.loads(prog_path.read_text())
    if state.get("num_rows") != num_rows or state.get("block_rows") != block_rows:
      raise ValueError(f"{prog_path}: made for num_rows={state.get('num_rows')}, block_rows="
                       f"{state.get('block_rows')}, now {num_rows}, {block_rows}; delete {out_path} "
                       "and its progress file to re-embed")
    if state.get("fingerprint") != embedder.fingerprint or state.get("dtype") != embedder.dtype:
      raise EmbedderMismatchError(f"{prog_path}: started by another embedder; delete it and {out_path}")
  if state.get("done"):
    return {"rows": 0, "seconds": 0.0, "skipped": True}
  resume = state["rows_done"] > 0 and layout.rows_output_exists(out_path)
  out = layout.NpyRowsWriter(out_path, (num_rows, embedder.dim), np.float32, resume=resume)
  if not resume:
    state = {"rows_done": 0, "done": False}
  elif out.found != ((num_rows, embedder.dim), np.float32):
    raise ValueError(f"{out_path}: shape {out.found[0]} {out.found[1]}, expected ({num_rows}, "
                     f"{embedder.dim}) float32; delete it and its progress file")
  state.update(num_rows=num_rows, block_rows=block_rows, fingerprint=embedder.fingerprint,
               dtype=embedder.dtype)
  t0, embedded = time.perf_counter(), 0
  with tqdm.tqdm(total=num_rows, initial=state["rows_done"], unit="chunk", desc=desc or out_path.name,
                 smoothing=0.1) as bar:
    for start, texts in _blocks(batches, block_rows, first_id):
      if start < state["rows_done"]:
        continue
      if start + len(texts) > num_rows:
        raise ValueError(f"{out_path}: the batches hold more than num_rows={num_rows} rows")
      out.write(start, embedder.embed(texts))
      state["rows_done"] = start + len(texts)
      write_json_atomic(prog_path, state)
      embedded += len(texts)
      bar.update(len(texts))
  if state["rows_done"] != num_rows:
    raise ValueError(f"{out_path}: the batches ended after {state['rows_done']} of {num_rows} rows")
  out.finish(block_rows)
  write_finished(out_path, num_rows, block_rows, embedder.fingerprint, embedder.dtype)
  seconds = time.perf_counter() - t0
  return {"rows": embedded, "seconds": seconds, "skipped": False}


def embed_shard(db_dir: str | os.PathLike, embedder: Embedder, shard: int, store=None,
                tokenizer=None, block_rows: int = 4096, text_batch_size: int = 1024) -> dict:
  """Embeds chunk-store shard `shard` into <db>/embeddings/shard-XXXXX.npy (resumable)."""
  store = store if store is not None else chunk_store_lib.ChunkStore.open(db_dir)
  tokenizer = tokenizer if tokenizer is not None else prepare_lib.load_db_tokenizer(db_dir)
  _, first_id, count = store.shard_spans()[shard]
  return embed_to_npy(
      embedder, store.iter_chunk_texts(tokenizer, shard=shard, batch_size=text_batch_size),
      layout.embeddings_path(db_dir, shard), num_rows=count, first_id=first_id,
      block_rows=block_rows, desc=f"embed shard {shard}")


def embed_chunk_store(db_dir: str | os.PathLike, embedder: Embedder, block_rows: int = 4096,
                      text_batch_size: int = 1024) -> dict:
  """Embeds every chunk-store shard into <db>/embeddings/ (finished shards are skipped)."""
  db_dir = epath.Path(db_dir)
  store = chunk_store_lib.ChunkStore.open(db_dir)
  tokenizer = prepare_lib.load_db_tokenizer(db_dir)  # SentencePiece or BPE (e.g. smollm2)
  check_or_write_info(embedder, layout.embeddings_dir(db_dir))
  totals = {"rows": 0, "seconds": 0.0, "shards": []}
  for shard, _, _ in store.shard_spans():
    stats = embed_shard(db_dir, embedder, shard, store, tokenizer, block_rows, text_batch_size)
    totals["rows"] += stats["rows"]
    totals["seconds"] += stats["seconds"]
    totals["shards"].append(shard)
  return totals
