#!/usr/bin/env bash
# Ahead-of-time compiles of the paper experiments (experiments/retro_*.py) for TPU slices where
# they fit (CPU only, libtpu): the training steps, then the evaluation and sampling programs.
# Results: bench/results/aot_compile.jsonl (one JSON line per run) and the printed summaries.
# ONLY_SERVE=1 APPEND=1 runs only the evaluation and sampling rows, appended to the file.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
OUT=bench/results/aot_compile.jsonl
mkdir -p bench/results
[ "${APPEND:-0}" = 1 ] || : > "$OUT"
# What each row records as the command that wrote it (its provenance).
export AOT_COMMAND="${ONLY_SERVE:+ONLY_SERVE=1 }${ONLY_V5P:+ONLY_V5P=1 }${APPEND:+APPEND=$APPEND }bash bench/aot_all.sh"
run() { "$PY" -m retro_jax.aot_compile --out="$OUT" "$@" 2>&1 | grep -v -E '^(W|I|E)[0-9]{4} |^WARNING: Logging|^=== |^learning/'; }
# v5e (16 GiB HBM) needs the experiments' self-attention in query blocks of 512; v5p (95 GiB)
# runs it whole.
WHOLE=--config.model_overrides.attention_q_block=0
[ -n "${ONLY_SERVE:-}" ] || {
[ -n "${ONLY_V5P:-}" ] || {
run --config=experiments/retro_172m.py --topology=v5e:4x4   --per_chip_batch=4
run --config=experiments/retro_425m.py --topology=v5e:4x4   --per_chip_batch=2
}
run --config=experiments/retro_1p5b.py --topology=v5p:2x2x4 --per_chip_batch=4 $WHOLE
run --config=experiments/retro_7p5b.py --topology=v5p:4x4x4 --per_chip_batch=2 $WHOLE
# Two slices over DCN (hybrid mesh: the data axis across slices): the 1.5B at the single-slice
# per-chip batch, and the 7.5B at the paper's global batch 1,024 (2 x 64 chips x 2 x 4 micro-batches:
# 98.9 GiB per chip, over v5p's 95; and 2 x 64 x 1 x 8 micro-batches, which fits).
run --config=experiments/retro_1p5b.py --topology=v5p:2x2x4 --num_slices=2 --per_chip_batch=4 $WHOLE
run --config=experiments/retro_7p5b.py --topology=v5p:4x4x4 --num_slices=2 --per_chip_batch=2 \
  --config.grad_accum_steps=4 $WHOLE
run --config=experiments/retro_7p5b.py --topology=v5p:4x4x4 --num_slices=2 --per_chip_batch=1 \
  --config.grad_accum_steps=8 $WHOLE
}
# Evaluation (--program=evaluate: evaluate --mesh's step, float32 weights FSDP over the slice, one
# window of 2,048 tokens per chip): the 7.5B, which one v5e chip (16 GiB) cannot hold, on a v5e
# slice. Sampling (--program=sample: the prefill of a 1,024-token prompt and one chunk-completing
# decode step over a 2,048-token cache, one sequence per chip): the 172M and 425M data-parallel, the
# sample command's default mesh.
run --program=evaluate --config=experiments/retro_7p5b.py --topology=v5e:4x4 --per_chip_batch=1
run --program=sample --config=experiments/retro_172m.py --topology=v5e:4x4 --config.mesh=-1,1,1
run --program=sample --config=experiments/retro_425m.py --topology=v5e:4x4 --config.mesh=-1,1,1
