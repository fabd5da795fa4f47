r"""Serve one index shard over gRPC (the retrieval service; retro_jax.retrieval.shard_server).

    python -m retro_jax.retrieval.serve --db=DIR --shard=I [--backend=faiss] [--port=0] \
        [--host=127.0.0.1] [--port_file=PATH] [--index_root=DIR/index/faiss] [--workers=4]
    python -m retro_jax.retrieval.serve --reload=HOST:PORT[,HOST:PORT...]

Binds 127.0.0.1 unless --host says otherwise; SIGTERM drains in-flight searches and exits.
`--reload` asks running shard processes to load the database again (after `edit_db`: each keeps
answering from what it loaded until the new contents are loaded) and prints what each serves now;
a client of a shard that was not reloaded gets an error naming this command.
"""
from absl import app, flags

from retro_jax import flags as shared
from retro_jax.errors import UserError, guard
from retro_jax.retrieval import client as client_lib
from retro_jax.retrieval import fingerprint as fingerprint_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import shard_server

FLAGS = flags.FLAGS
shared.define("db", note="its chunks/, embeddings/ and index/ are served")
flags.DEFINE_integer("shard", None, "index shard number to serve")
flags.DEFINE_list("reload", None, "instead of serving: host:port of running shard processes to "
                  "reload the database (after edit_db)")
flags.DEFINE_string("host", "127.0.0.1", "interface to bind (default: loopback only)")
flags.DEFINE_integer("port", 0, "port (0: a free one; see --port_file)")
flags.DEFINE_string("port_file", None, "write {address, shard, pid} here once serving")
shared.define("backend", note="the one served (default: the one built)")
flags.DEFINE_string("index_root", None, "serve <index_root>/shard-XXXXX instead of "
                    "DB/index/<backend>/shard-XXXXX (embeddings and offset from its manifest)")
flags.DEFINE_integer("workers", 4, "gRPC worker threads")
flags.DEFINE_integer("search_threads", 1, "ScaNN threads per search")
flags.DEFINE_integer("overfetch", 4, "candidates per result before exact rescoring")
flags.DEFINE_bool("verify", True, "verify the shard's checksums at load")
flags.DEFINE_integer("max_k", shard_server.Limits.max_k, "largest k a request may ask for")
flags.DEFINE_integer("max_queries", shard_server.Limits.max_queries, "most queries per request")
flags.DEFINE_integer("max_request_bytes", shard_server.Limits.max_request_bytes,
                     "largest request message")
flags.DEFINE_integer("max_work_bytes", shard_server.Limits.max_work_bytes,
                     "largest estimated search memory per request")


def main(argv) -> None:
  del argv
  f = FLAGS
  if f.reload:
    for info in client_lib.reload_shards(f.reload):
      print(f"shard {info.shard} at {info.address}: reloaded, serves "
            f"{fingerprint_lib.short(info.fingerprint)} ({info.count} chunks)", flush=True)
    return
  if f.db is None or f.shard is None:
    raise UserError("pass --db=DIR and --shard=I to serve a shard (or --reload=HOST:PORT,... to "
                    "reload running ones)")
  shard_server.serve(f.db, f.shard, host=f.host, port=f.port, backend=f.backend,
                     index_root=f.index_root, port_file=f.port_file, workers=f.workers,
                     search_threads=f.search_threads, overfetch=f.overfetch, verify=f.verify,
                     limits=shard_server.Limits(f.max_k, f.max_queries, f.max_request_bytes,
                                                f.max_work_bytes))


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
