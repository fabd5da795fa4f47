r"""Builds one index shard per embedding shard of a database, each serialised with a manifest.

  python -m retro_jax.retrieval.build_index --db=runs/default_db [--backend=scann|exact|faiss] \
      [--shard_index=0 --num_shards=1] [--num_leaves=... --leaves_to_search=... --reorder=...]

Reads `DB/embeddings/shard-XXXXX.npy` (float32 [n, D], L2-normalised); writes
`DB/index/<backend>/shard-XXXXX/` (searcher files + manifest.json). Global id offsets come from
the chunk store's manifest (`DB/chunks/manifest.json`), else the running sum of the shards' row
counts. Host `shard_index` of `num_shards` builds the embedding shards i with
`i % num_shards == shard_index`. Finished shards (manifest present and checksums valid, same
config) are skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags, logging
from tqdm import tqdm

from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import retriever as retriever_lib

_DB = flags.DEFINE_string("db", None, "Database directory (holds embeddings/).", required=True)
_BACKEND = flags.DEFINE_enum("backend", index_lib.DEFAULT_BACKEND, list(index_lib.BACKENDS), "Index backend.")
_OUT = flags.DEFINE_string("out", None, "Output directory; default DB/index/<backend>.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This host's index among num_shards.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of hosts splitting the build.")
_NUM_LEAVES = flags.DEFINE_integer("num_leaves", None, "ScaNN tree leaves (default ~sqrt(n)).")
_LEAVES_TO_SEARCH = flags.DEFINE_integer("leaves_to_search", None, "ScaNN leaves searched.")
_REORDER = flags.DEFINE_integer("reorder", None, "ScaNN float32 reorder candidates.")
_SOAR = flags.DEFINE_float("soar_lambda", None, "ScaNN SOAR lambda (default 1.5).")
_FAISS = flags.DEFINE_string("faiss_factory", None, "faiss index_factory string.")
_THREADS = flags.DEFINE_integer("training_threads", None, "Training threads (1 = repeatable).")


def config_from_flags() -> index_lib.IndexConfig:
  over = {"num_leaves": _NUM_LEAVES.value, "leaves_to_search": _LEAVES_TO_SEARCH.value,
          "reorder": _REORDER.value, "soar_lambda": _SOAR.value,
          "faiss_factory": _FAISS.value, "training_threads": _THREADS.value}
  return dataclasses.replace(index_lib.IndexConfig(backend=_BACKEND.value),
                             **{k: v for k, v in over.items() if v is not None})


def shard_is_done(out: str, config: index_lib.IndexConfig, offset: int) -> bool:
  """True when `out` holds a verified shard built with the same config and offset."""
  if not os.path.isfile(os.path.join(out, index_lib.MANIFEST)):
    return False
  try:
    manifest = index_lib.read_manifest(out)
    index_lib.verify_shard(out, manifest)
  except index_lib.IndexError_ as e:
    logging.warning("Rebuilding %s: %s", out, e)
    return False
  built = index_lib.IndexConfig.from_json(manifest["config"])
  want = config.resolved(manifest["count"])
  if built != want or manifest["offset"] != offset:
    logging.warning("Rebuilding %s: built with another config or offset.", out)
    return False
  return True


def build_index(db_dir: str, config: index_lib.IndexConfig, out_dir: str | None = None,
                shard_index: int = 0, num_shards: int = 1) -> list[str]:
  """Builds (or skips when finished) this host's shards; returns their directories."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}).")
  mine = retriever_lib.db_embedding_shards(db_dir, lambda i: i % num_shards == shard_index)
  out_dir = out_dir or retriever_lib.index_dir(db_dir, config.backend)
  os.makedirs(out_dir, exist_ok=True)
  done = []
  for i, path, offset in tqdm(mine, desc=f"index shards ({config.backend})"):
    out = retriever_lib.shard_dir(out_dir, i)
    if shard_is_done(out, config, offset):
      logging.info("Shard %s already built; skipping.", out)
    else:
      t0 = time.time()
      index_lib.build_shard(path, offset, config, out)
      logging.info("Built %s in %.1f s.", out, time.time() - t0)
    done.append(out)
  return done


def main(argv):
  del argv
  dirs = build_index(_DB.value, config_from_flags(), _OUT.value, _SHARD_INDEX.value,
                     _NUM_SHARDS.value)
  print(f"{len(dirs)} index shard(s) ready under {os.path.dirname(dirs[0]) if dirs else '-'}")


if __name__ == "__main__":
  app.run(main)
