r"""Build a retrieval database: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours.

    python -m retro_jax.build_db --corpus=default --db=runs/default_db \
        --runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2
    python -m retro_jax.build_db --corpus=DIR_OR_JSONL --db=/tmp/small_db --max_docs=200 --vocab_size=2000
    python -m retro_jax.build_db --corpus=default --db=runs/smollm2_db --tokenizer=smollm2
    python -m retro_jax.build_db --db=runs/default_db --stages=examples \
        --config=experiments/tiny.py      # the training examples, joined ahead of time

Each stage is an Apache Beam pipeline (retro_jax.build.pipeline); flags this command does not define
(`--runner`, `--direct_num_workers`, `--direct_running_mode`, Dataflow's `--project`, `--region`,
`--temp_location`, `--setup_file`, ...) go to Beam's PipelineOptions (docs/beam.md); one that Beam
does not define either is refused before anything runs (exit 2, naming it). Every stage
is restartable and a finished one is skipped (retro_jax.build.stages); stage times go to
DB/build_times.json. The `examples` stage (not run by default: it is an experiment's) writes the
experiment's training examples joined with their neighbours (retro_jax.training.examples_stage),
which training then reads sequentially (`--config.input`, retro_jax.training.input_pipeline).
"""

from absl import app, flags

from retro_jax import flags as shared
from retro_jax.build import stages as build
from retro_jax.build.settings import DEFAULTS
from retro_jax.errors import guard
from retro_jax.training import examples_stage, experiment
from retro_jax.training import joined_examples

FLAGS = flags.FLAGS
D = DEFAULTS  # every setting's default, defined once in retro_jax.build.settings
shared.define("db", required=True, note="the one to build")
flags.DEFINE_string("corpus", D["corpus"], "corpus spec (retro_jax/db/corpus.py)")
flags.DEFINE_integer("vocab_size", D["vocab_size"], "SentencePiece vocabulary size")
flags.DEFINE_string("tokenizer", D["tokenizer"], "an existing SentencePiece .model to use instead "
                    "of training one, or a pretrained byte-level BPE: 'smollm2' (or a saved "
                    "bpe.json)")
flags.DEFINE_integer("chunk_size", D["chunk_size"], "tokens per chunk")
flags.DEFINE_integer("docs_per_shard", D["docs_per_shard"], "documents per chunk-store shard")
flags.DEFINE_float("heldout_fraction", D["heldout_fraction"], "fraction of documents held out (by "
                   "document)")
flags.DEFINE_integer("seed", D["seed"], "seed of the held-out split and tokenizer sampling")
shared.define("max_docs")
flags.DEFINE_list("stages", list(build.STAGES),
                  f"stages to run, in order, from {build.STAGES} (+ 'finalize'), then 'examples' "
                  "if named (the --config experiment's training examples with their neighbours)")
shared.define("config", note="examples stage: the experiment whose training examples to write "
              "(sequence length, seed, neighbours; default: the experiment defaults)")
flags.DEFINE_integer("examples_epochs", 1, "examples stage: epochs of the training order to write "
                     "(past them the loader reads them again from the start)")
flags.DEFINE_integer("examples_per_shard", joined_examples.EXAMPLES_PER_SHARD,
                     "examples stage: records per ArrayRecord shard")
flags.DEFINE_enum("embed_dtype", D["embed_dtype"], ["bfloat16", "float32"], "embedder matmul dtype")
shared.define("embed_batch_size")
shared.define("backend", note=f"the one to build (default: {D['backend']})")
shared.define("num_neighbours", note=f"training neighbours stored per chunk (default: {D['k']})")
shared.renamed("k")
flags.DEFINE_enum("index_searcher", D["index_searcher"], ["faiss", "scann"], "the global index's "
                  "searcher within a serving shard: faiss fast-scan codes, or a ScaNN searcher "
                  "built over each serving shard too (routing and the int8 rerank are the same)")
flags.DEFINE_bool("audit", False, "read every output of every stage (the whole database) and "
                  "rebuild the missing or damaged ones; a run without it reads a few small files "
                  "per stage to know what is finished")
flags.DEFINE_bool("rebuild", False, "rebuild a finished stage whose recorded settings, tokenizer "
                  "or inputs differ from this run's (default: stop with an error naming them)")


def main(argv) -> None:
  # The settings keep their recorded names (a database's provenance): --num_neighbours is `k`.
  settings = {name: FLAGS[name].value for name in D if name != "k"}
  settings["k"] = FLAGS.num_neighbours
  stages = tuple(s for s in FLAGS.stages if s != "examples")
  if stages or "examples" not in FLAGS.stages:
    build.build(FLAGS.db, stages=stages, rebuild=FLAGS.rebuild, beam_args=argv[1:],
                audit=FLAGS.audit,  # a flag left None: DEFAULTS
                **{name: v for name, v in settings.items() if v is not None})
  if "examples" in FLAGS.stages:
    build.check_beam_args(argv[1:])
    c = FLAGS.config if FLAGS.config is not None else experiment.defaults()
    examples = examples_stage.settings_from_experiment(c)
    examples_stage.run(FLAGS.db, examples, epochs=FLAGS.examples_epochs,
                       examples_per_shard=FLAGS.examples_per_shard, beam_args=argv[1:],
                       rebuild=FLAGS.rebuild)


if __name__ == "__main__":
  # Flags this command does not define are Beam's (--runner, --direct_num_workers, ...).
  app.run(guard(main), flags_parser=shared.parse_known_only)
