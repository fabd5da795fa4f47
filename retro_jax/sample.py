r"""Generate text with RETRO, retrieving afresh at every chunk boundary.

    python -m retro_jax.sample --workdir=runs/demo/retro --prompt="The kernel's page cache" \
        [--max_new_tokens=128 --temperature=0.8 --top_p=0.9 --seed=0] \
        [--num_neighbours=2 --retrieval=on,off --show_neighbours] \
        [--db=DIR (default: the database the model was trained on)] \
        [--service=127.0.0.1:50051,127.0.0.1:50052 (shard servers instead of in-process)] \
        [--mesh=-1,1,1 (data, fsdp, model: the default, every device data-parallel)]

Every time a chunk of m tokens completes (the prompt's chunks, then generated ones), its text is
embedded with the database's embedder, the k nearest database chunks are searched, and each is fed
to the model with its continuation (r tokens): retro_jax.sampling.generate. --retrieval lists the
modes to sample with, each from the same seed: on (RETRO[ON]) and off (RETRO[OFF], no neighbours);
the default, all, is both for a RETRO model and off for a baseline. --show_neighbours prints every
query chunk and, per neighbour, its score, chunk id, document id and key, and text.
The model is restored straight into its sharded layout on --mesh (the training rules: --mesh=1,1,-1
splits heads and the feed-forward over the devices, 1,-1,1 shards the weights FSDP) and the
decode caches are sharded the same way (retro_jax.model.placement); a single prompt is replicated
over the data-parallel devices.
Without --workdir, --size=NAME (a retro_jax.model.config.SIZES name) builds a randomly initialised
model sized to the database (its vocabulary and chunk size), for trying the pipeline out.
"""
import os
import sys
import time

from absl import app, flags
from flax import nnx

from retro_jax import flags as shared
from retro_jax.db import verify
from retro_jax.db.chunk_store import ChunkStore
from retro_jax.db.prepare import load_db_tokenizer
from retro_jax.errors import UserError, guard
from retro_jax.evaluation import bpb
from retro_jax.model import SIZES, Retro
from retro_jax.retrieval.client import ServiceRetriever
from retro_jax.sampling import generate as gen
from retro_jax.training.checkpoint import load_model

FLAGS = flags.FLAGS
shared.define("workdir", note="the model to load")
shared.define("step")
shared.define("size", note="without --workdir: a randomly initialised model of this size "
              "(vocabulary and chunk size taken from --db)")
shared.define("db", note="retrieved from (default: the one the model trained on)")
flags.DEFINE_string("prompt", None, "prompt text")
flags.DEFINE_string("prompt_file", None, "read the prompt from this file instead")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate")
flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
flags.DEFINE_float("top_p", 0.9, "nucleus sampling mass (1 = off)")
flags.DEFINE_integer("seed", 0, "sampling seed")
shared.define("num_neighbours", note="fed to the model (default: the model's)")
shared.define("retrieval", note="sample runs on and off; all = on,off (off alone for a "
              "baseline)")
flags.DEFINE_boolean("show_neighbours", False, "print each query chunk and its neighbours with "
                     "their documents")
flags.DEFINE_boolean("stop_at_eos", True, "stop after the end-of-document token")
shared.define("backend", note="searched in-process (default: the one built)")
shared.define("service", note="search them instead of the in-process index")
shared.renamed("retrieval_service")
shared.define("service_timeout_s", note="with --service")
shared.define("mesh", note="the model is restored, and decodes, sharded on it")
SAMPLE_MODES = ("on", "off")


class SampleError(UserError, ValueError):
  """Bad sampling flags."""


def random_model(name: str, db: str):
  """A randomly initialised SIZES[name], sized to the database's vocabulary and chunks."""
  store = ChunkStore.open(db)
  m = store.chunk_size
  config = SIZES[name].replace(vocab_size=int(store.manifest["tokenizer"]["vocab_size"]),
                               chunk_size=m, neighbour_len=2 * m)
  return Retro(config, rngs=nnx.Rngs(0)), config, {"db": db, "step": None}


def _one_line(text: str, limit: int = 300) -> str:
  text = text.replace("\n", "\\n")
  return text if len(text) <= limit else text[:limit] + "..."


def sample_modes(retrieval: list[str], config) -> tuple[str, ...]:
  """The --retrieval modes to sample with: `all` is on and off, or off alone for a baseline."""
  if list(retrieval) == ["all"]:
    return SAMPLE_MODES if config.retrieval else ("off",)
  try:
    modes = bpb.parse_modes(retrieval)
  except bpb.EvalError as e:
    raise SampleError(str(e)) from None
  other = [m for m in modes if m not in SAMPLE_MODES]
  if other:
    raise SampleError(f"--retrieval={','.join(retrieval)}: sample runs {SAMPLE_MODES}, not "
                      f"{other} (evaluate scores those)")
  if "on" in modes and not config.retrieval:
    raise SampleError("this model has no CCA layers (a baseline): pass --retrieval=off")
  return modes


def run(argv_flags=FLAGS, out=sys.stdout) -> dict:
  f = argv_flags
  if (f.prompt is None) == (f.prompt_file is None):
    raise SampleError("give exactly one of --prompt or --prompt_file")
  if f.num_neighbours is not None and f.num_neighbours < 1:
    raise SampleError(f"--num_neighbours={f.num_neighbours} must be >= 1 (omit it for the "
                      "model's).")
  if f.prompt_file is not None and not os.path.isfile(f.prompt_file):
    raise SampleError(f"--prompt_file={f.prompt_file} does not exist (or is not a file)")
  prompt = f.prompt if f.prompt is not None else open(f.prompt_file).read()
  mesh = shared.mesh_from_flag(f.mesh)
  if f.workdir:
    model, config, info = load_model(f.workdir, step=f.step, mesh=mesh)
  elif f.size:
    if not f.db:
      raise SampleError("--size builds a random model sized to a database: pass --db too")
    model, config, info = random_model(f.size, f.db)
  else:
    raise SampleError("pass --workdir=MODEL_DIR (or --size=NAME --db=DIR for a random model)")
  db = f.db or info.get("db")
  if not db:
    raise SampleError("the checkpoint records no database; pass --db=DIR")
  if f.workdir:
    verify.check_checkpoint_tokenizer(info.get("db_tokenizer"), info.get("db"), db, info["path"])
  modes = sample_modes(f.retrieval, config)
  k = f.num_neighbours or config.num_neighbours
  searcher = None
  if "on" in modes and f.service:
    searcher = ServiceRetriever(f.service, timeout_s=f.service_timeout_s,
                                connect_timeout_s=f.service_timeout_s, db=db)
  retrieval = gen.DatabaseRetrieval.from_db(db, k, config.neighbour_len, searcher=searcher,
                                            backend=f.backend) if "on" in modes else None
  if retrieval is None:  # the tokenizer only
    tokenizer = load_db_tokenizer(db)  # SentencePiece or byte-level BPE
  else:
    retrieval.check_model(config)
    tokenizer = retrieval.tokenizer
  prompt_ids = tokenizer.encode(prompt)
  print("=== prompt ===", file=out)
  print(tokenizer.decode(prompt_ids), file=out)
  results = {}
  for mode in modes:  # each from the same seed
    on = retrieval if mode == "on" else None
    t0 = time.perf_counter()
    result = gen.generate(model, config, prompt_ids, on, max_new_tokens=f.max_new_tokens,
                          temperature=f.temperature, top_p=f.top_p, seed=f.seed,
                          eos_id=tokenizer.eos_id if f.stop_at_eos else None, num_neighbours=k,
                          mesh=mesh)
    total = time.perf_counter() - t0
    ids = [t for t in result.new_ids if t != tokenizer.eos_id]
    continuation = tokenizer.decode_fragment(ids)
    n = len(result.new_ids)
    print(f"=== continuation (retrieval {mode}, {n} tokens, "
          f"{n / total:.1f} tokens/s incl. compile) ===", file=out)
    print(continuation, file=out)
    if f.show_neighbours and on is not None:
      m = config.chunk_size
      print("=== neighbours ===", file=out)
      for r, (query, chunks) in zip(result.retrievals, on.history):
        u = r.chunk_index
        print(f"chunk {u} (tokens {u * m}-{(u + 1) * m - 1}) query: {_one_line(query)!r}",
              file=out)
        for j, c in enumerate(chunks):
          print(f"  [{j + 1}] score {c.score:.3f} doc {c.doc_id} {c.doc_key!r} chunk "
                f"{c.chunk_id}: {_one_line(c.text)!r}", file=out)
    results[mode] = {"new_ids": result.new_ids, "text": continuation,
                     "retrievals": len(result.retrievals), "seconds": result.seconds}
  return {"prompt_ids": list(prompt_ids), "modes": results, "mesh": dict(mesh.shape)}


def main(argv):
  del argv
  try:
    run()
  except (SampleError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(guard(main), flags_parser=shared.parse)
