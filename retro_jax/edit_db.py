r"""Edit a built retrieval database without retraining: add documents, remove documents.

    python -m retro_jax.edit_db --db=DIR --add=CORPUS_SPEC [--upsert]
    python -m retro_jax.edit_db --db=DIR --remove_docs=ID,ID,...
    python -m retro_jax.edit_db --db=DIR --remove_keys=KEY,KEY,...

What an addition builds and how a removal is enforced: retro_jax.build.edit.
"""
import json
import sys

from absl import app, flags

from retro_jax import flags as shared
from retro_jax.build import edit
from retro_jax.errors import guard

FLAGS = flags.FLAGS
shared.define("db", required=True, note="the one to edit (built by retro_jax.build_db)")
flags.DEFINE_string("add", None, "corpus spec of documents to add as a new shard")
flags.DEFINE_bool("upsert", False, "with --add: replace documents whose key already exists")
flags.DEFINE_list("remove_docs", [], "global document ids to remove")
flags.DEFINE_list("remove_keys", [], "document keys to remove")
flags.DEFINE_string("note", "", "free text recorded with a removal request")
shared.define("backend", note="the one to update (default: the one built)")
shared.define("embed_batch_size")


def main(argv) -> None:
  del argv
  f = FLAGS
  if not f.add and not f.remove_docs and not f.remove_keys:
    raise app.UsageError("nothing to do: pass --add=SPEC, --remove_docs=ID,... or "
                         "--remove_keys=KEY,...")
  out = {}
  if f.remove_docs or f.remove_keys:
    try:
      ids = [int(x) for x in f.remove_docs]
    except ValueError as e:
      raise app.UsageError(f"--remove_docs must be integers: {f.remove_docs}") from e
    out["remove"] = edit.remove_documents(f.db, ids, f.remove_keys, backend=f.backend, note=f.note)
  if f.add:
    out["add"] = edit.add_documents(f.db, f.add, backend=f.backend, upsert=f.upsert,
                                    embed_batch_size=f.embed_batch_size)
  print(json.dumps(out, indent=1, sort_keys=True, default=str))
  if f.add:  # removals reach running shard processes by themselves; additions do not
    print("note: retrieval service processes started before this edit serve the old contents "
          "(their clients get an error naming them) until `python -m retro_jax.retrieval.serve "
          "--reload=HOST:PORT,...` (or a restart)", file=sys.stderr)


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
