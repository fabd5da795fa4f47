r"""Build a retrieval database: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours.

    python -m retro_jax.build_db --corpus=default --db=runs/default_db \
        --runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2
    python -m retro_jax.build_db --corpus=DIR_OR_JSONL --db=/tmp/small_db --max_docs=200 --vocab_size=2000
    python -m retro_jax.build_db --corpus=default --db=runs/smollm2_db --tokenizer=smollm2

Each stage is an Apache Beam pipeline (retro_jax.build.pipeline); flags this command does not define
(`--runner`, `--direct_num_workers`, `--direct_running_mode`, Dataflow's `--project`, `--region`,
`--temp_location`, `--setup_file`, ...) go to Beam's PipelineOptions (docs/beam.md); one that Beam
does not define either is refused before anything runs (exit 2, naming it). Every stage
is restartable and a finished one is skipped (retro_jax.build.stages); stage times go to
DB/build_times.json.
"""

from absl import app, flags

from retro_jax.build import stages as build
from retro_jax.errors import guard
from retro_jax.retrieval import index as index_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("db", None, "retrieval database directory to build", required=True)
flags.DEFINE_string("corpus", "default", "corpus spec (retro_jax/db/corpus.py)")
flags.DEFINE_integer("vocab_size", 8192, "SentencePiece vocabulary size")
flags.DEFINE_string("tokenizer", None, "an existing SentencePiece .model to use instead of "
                    "training one, or a pretrained byte-level BPE: 'smollm2' (or a saved bpe.json)")
flags.DEFINE_integer("chunk_size", 64, "tokens per chunk")
flags.DEFINE_integer("docs_per_shard", 4096, "documents per chunk-store shard")
flags.DEFINE_float("heldout_fraction", 0.01, "fraction of documents held out (by document)")
flags.DEFINE_integer("seed", 0, "seed of the held-out split and tokenizer sampling")
flags.DEFINE_integer("max_docs", None, "keep only the first N documents")
flags.DEFINE_list("stages", list(build.STAGES),
                  f"stages to run, in order, from {build.STAGES} (+ 'finalize')")
flags.DEFINE_enum("embed_dtype", "bfloat16", ["bfloat16", "float32"], "embedder matmul dtype")
flags.DEFINE_integer("embed_batch_size", 32, "embedder rows per forward call")
flags.DEFINE_enum("backend", index_lib.GLOBAL_BACKEND, list(index_lib.ALL_BACKENDS), "index backend")
flags.DEFINE_integer("k", 2, "training neighbours per chunk")
flags.DEFINE_enum("index_searcher", "faiss", ["faiss", "scann"], "the global index's searcher "
                  "within a serving shard: faiss fast-scan codes, or a ScaNN searcher built over "
                  "each serving shard too (routing and the int8 rerank are the same)")
flags.DEFINE_bool("audit", False, "read every output of every stage (the whole database) and "
                  "rebuild the missing or damaged ones; a run without it reads a few small files "
                  "per stage to know what is finished")
flags.DEFINE_bool("rebuild", False, "rebuild a finished stage whose recorded settings, tokenizer "
                  "or inputs differ from this run's (default: stop with an error naming them)")


def main(argv) -> None:
  build.build(FLAGS.db, stages=tuple(FLAGS.stages), rebuild=FLAGS.rebuild, beam_args=argv[1:],
              audit=FLAGS.audit,
              **{name: FLAGS[name].value for name in build.DEFAULTS})


if __name__ == "__main__":
  # Flags this command does not define are Beam's (--runner, --direct_num_workers, ...).
  app.run(guard(main), flags_parser=lambda argv: FLAGS(argv, known_only=True))
