r"""Are two retrieval databases the same? Every file compared by sha256, and the manifests whose
format may differ between the builds compared by content.

    python -m bench.compare_dbs --a=runs/default_db --b=runs/default_db_check \
        --out=bench/results/make_db_same.json

Files: identical, different, or in one database only (build times, provenance records, the
manifests, the chunk-store shards' done markers and the neighbours shards' progress records are
compared by content below, not by bytes: a record may gain a field, e.g. `num_utf8_bytes` or
`block_sha256`, listed). The chunk store: totals, the shard list
(offsets, counts, file checksums) and the held-out ids, through `chunk_store.read_manifest` (so a
format-1 store compares with a format-2 one). The global index by content, in either format: the
trained partitioner and quantizer, each serving shard's faiss file, and the int8 rerank rows in id
order (format 1 keeps them per embeddings shard, format 2 per serving shard beside their ids); and
which configuration fields differ or only one side records. `--dirs=tokenizer,chunks` compares
those directories only (a database built with `--stages=tokenizer,chunks`).
"""
import hashlib
import json
import os
import sys

import numpy as np
from absl import app, flags

from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout
from retro_jax.evaluation.figures import provenance
from retro_jax.retrieval import global_index as global_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("a", "runs/default_db", "one database")
flags.DEFINE_string("b", "runs/default_db_check", "the other")
flags.DEFINE_string("out", "bench/results/make_db_same.json", "results JSON")
flags.DEFINE_list("dirs", [], "compare only these top-level directories (e.g. tokenizer,chunks: "
                  "a database built with --stages=tokenizer,chunks); the index only if listed")

# Compared by content (or not at all: wall times).
BY_CONTENT = ("build_times.json", "provenance/", "chunks/manifest.json", "chunks/shards.json",
              "chunks/records/", "chunks/offsets.npy",
              "chunks/heldout.json", "index/global/")


def _is_done_marker(rel: str) -> bool:
  return rel.startswith("chunks/") and rel.endswith(".done.json")


def _is_neighbours_record(rel: str) -> bool:
  return rel.startswith("neighbours/") and rel.endswith(".progress.json")


def _neighbours_records(root: str) -> dict[str, dict]:
  d = os.path.join(root, layout.NEIGHBOURS_DIR)
  return {f: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
          if f.endswith(".progress.json")} if os.path.isdir(d) else {}


def _markers(root: str) -> dict[str, dict]:
  d = os.path.join(root, "chunks")
  return {f: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
          if f.endswith(".done.json")}


def _digests(root: str) -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      rel = os.path.relpath(path, root)
      if not (rel.startswith(BY_CONTENT) or _is_done_marker(rel) or _is_neighbours_record(rel)):
        with open(path, "rb") as fh:
          out[rel] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _store(root: str) -> dict:
  m = chunk_store_lib.read_manifest(layout.chunks_dir(root))
  keep = ("chunk_size", "num_chunks", "num_docs", "num_tokens", "tokenizer", "corpus")
  return {**{k: m[k] for k in keep}, "shards": list(m["shards"]),
          "heldout_doc_ids": list(m["heldout"]["doc_ids"]),
          "heldout_doc_keys": list(m["heldout"]["doc_keys"])}


def _shared_file_fields(ra: dict, rb: dict, added: dict[str, set]) -> None:
  """Keeps in both records' `files` entries the fields both record; notes the others."""
  for name in ra.get("files", {}).keys() & rb.get("files", {}).keys():
    fa, fb = ra["files"][name], rb["files"][name]
    added["a"] |= fa.keys() - fb.keys()
    added["b"] |= fb.keys() - fa.keys()
    ra["files"][name] = {k: v for k, v in fa.items() if k in fb}
    rb["files"][name] = {k: v for k, v in fb.items() if k in fa}


def _index(root: str) -> dict:
  return global_lib.read_manifest(global_lib.index_dir(root))


def _sha(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _index_content(root: str) -> dict:
  """sha256 of the trained files, of each serving shard's faiss file, and of every int8 rerank
  row in id order, whichever format the index is in."""
  d = global_lib.index_dir(root)
  m = _index(root)
  if m["format_version"] == 1:
    scale = d / "rerank" / "scale.npy"
    serving = sorted((d / "serving").glob("*.faiss"))
    rows = np.concatenate([np.load(d / "rerank" / f"{layout.shard_name(e['shard'])}.npy")
                           for e in m["embeddings_shards"]])
  else:
    scale = d / global_lib.SCALE
    serving = [global_lib.serving_path(d, s, "faiss") for s in global_lib.serving_shard_ids(m)]
    ids = np.concatenate([np.load(global_lib.serving_path(d, s, "ids"))
                          for s in global_lib.serving_shard_ids(m)])
    rows = np.concatenate([np.load(global_lib.serving_path(d, s, "rerank"))
                           for s in global_lib.serving_shard_ids(m)])[np.argsort(ids)]
  return {"trained": _sha(d / global_lib.TRAINED),
          "scale": hashlib.sha256(np.load(scale).tobytes()).hexdigest(),
          "serving_faiss": [_sha(p) for p in serving],
          "rerank_rows_in_id_order": hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()}


def main(argv):
  del argv
  a, b = _digests(FLAGS.a), _digests(FLAGS.b)
  if FLAGS.dirs:
    a, b = ({k: v for k, v in d.items() if k.split("/")[0] in FLAGS.dirs} for d in (a, b))
  same = sorted(k for k in a.keys() & b.keys() if a[k] == b[k])
  res = {**provenance(" ".join(["python -m bench.compare_dbs"] + sys.argv[1:])),
         "a": FLAGS.a, "b": FLAGS.b, "files_identical": len(same),
         "files_different": sorted(k for k in a.keys() & b.keys() if a[k] != b[k]),
         "only_in_a": sorted(a.keys() - b.keys()), "only_in_b": sorted(b.keys() - a.keys())}
  # The chunk-store shards' done markers and records: the fields both record, and the fields one
  # adds (format 3 adds block checksums to each file's entry).
  ma, mb = _markers(FLAGS.a), _markers(FLAGS.b)
  added: dict[str, set] = {"a": set(), "b": set()}
  for f in ma.keys() & mb.keys():
    _shared_file_fields(ma[f], mb[f], added)
  res["done_markers_differ"] = sorted(
      f for f in ma.keys() & mb.keys()
      if {k: v for k, v in ma[f].items() if k in mb[f]} != {k: v for k, v in mb[f].items()
                                                            if k in ma[f]})
  res["done_markers_only_in_one"] = sorted(ma.keys() ^ mb.keys())
  res["done_marker_fields_only_in_b"] = sorted({k for f in ma.keys() & mb.keys()
                                                for k in mb[f].keys() - ma[f].keys()})
  res["done_marker_fields_only_in_a"] = sorted({k for f in ma.keys() & mb.keys()
                                                for k in ma[f].keys() - mb[f].keys()})
  # The neighbours shards' progress records: the fields both record, and the fields one adds
  # (block checksums since issue 23; `build_db --stages=finalize` adds them to older ones).
  na, nb = ((_neighbours_records(r) if not FLAGS.dirs or "neighbours" in FLAGS.dirs else {})
            for r in (FLAGS.a, FLAGS.b))
  res["neighbours_records_differ"] = sorted(
      f for f in na.keys() & nb.keys()
      if {k: v for k, v in na[f].items() if k in nb[f]} != {k: v for k, v in nb[f].items()
                                                            if k in na[f]})
  res["neighbours_records_only_in_one"] = sorted(na.keys() ^ nb.keys())
  res["neighbours_record_fields_only_in_a"] = sorted({k for f in na.keys() & nb.keys()
                                                      for k in na[f].keys() - nb[f].keys()})
  res["neighbours_record_fields_only_in_b"] = sorted({k for f in na.keys() & nb.keys()
                                                      for k in nb[f].keys() - na[f].keys()})
  sa, sb = _store(FLAGS.a), _store(FLAGS.b)
  for ra, rb in zip(sa["shards"], sb["shards"]):
    _shared_file_fields(ra, rb, added)
  res["file_fields_only_in_a"] = sorted(added["a"])
  res["file_fields_only_in_b"] = sorted(added["b"])
  res["chunk_store_differs_in"] = sorted(k for k in sa if sa[k] != sb.get(k))
  res["index_files_identical"] = True
  if not FLAGS.dirs or "index" in FLAGS.dirs:
    ia, ib = _index(FLAGS.a), _index(FLAGS.b)
    ca, cb = _index_content(FLAGS.a), _index_content(FLAGS.b)
    res["index_formats"] = [ia["format_version"], ib["format_version"]]
    res["index_content_differs_in"] = sorted(k for k in ca if ca[k] != cb[k])
    res["index_files_identical"] = not res["index_content_differs_in"]
    res["index_config_differs_in"] = sorted(k for k in ia["config"].keys() & ib["config"].keys()
                                            if ia["config"][k] != ib["config"][k])
    res["index_config_only_in_one"] = sorted(ia["config"].keys() ^ ib["config"].keys())
  # The data: every file, the chunk store's contents and the index's files (its recorded
  # configuration may name settings that changed without changing a byte: listed above).
  res["same_database"] = (not res["files_different"] and not res["only_in_a"]
                          and not res["only_in_b"] and not res["chunk_store_differs_in"]
                          and not res["done_markers_differ"] and not res["done_markers_only_in_one"]
                          and not res["neighbours_records_differ"]
                          and not res["neighbours_records_only_in_one"]
                          and res["index_files_identical"])
  with open(FLAGS.out, "w") as f:
    json.dump(res, f, indent=1)
    f.write("\n")
  print(json.dumps({k: v for k, v in res.items() if k not in ("command",)}, indent=1))


if __name__ == "__main__":
  app.run(main)
