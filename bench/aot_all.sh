#!/usr/bin/env bash
# Ahead-of-time compiles of the paper experiments (experiments/retro_*.py) for TPU slices where
# they fit (CPU only, libtpu).
# Results: bench/results/aot_compile.jsonl (one JSON line per run) and the printed summaries.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
OUT=bench/results/aot_compile.jsonl
mkdir -p bench/results
[ "${APPEND:-0}" = 1 ] || : > "$OUT"
run() { "$PY" -m retro_jax.aot_compile --out="$OUT" "$@" 2>&1 | grep -v -E '^(W|I|E)[0-9]{4} |^WARNING: Logging|^=== |^learning/'; }
# v5e (16 GiB HBM) needs the experiments' self-attention in query blocks of 512; v5p (95 GiB)
# runs it whole.
WHOLE=--config.model_overrides.attention_q_block=0
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
