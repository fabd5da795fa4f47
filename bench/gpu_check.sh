#!/usr/bin/env bash
# One short run on a lent GPU machine (the device tool): the model's tests and the training-step
# benchmark on a real accelerator. Results land in $OUT (or bench/results/gpu when run by hand).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run() { timeout "$1" python3 -m bench.train_step "${@:2}" 2>&1 | grep -v -E '^(W|I)[0-9]{4} '; }
run 120 --steps=10 --out="$OUT/reference_fp32.json"
run 120 --steps=10 --dtype=bfloat16 --out="$OUT/reference_bf16.json"
run 180 --size=172m --seq_len=2048 --batch=8 --dtype=bfloat16 --steps=5 --out="$OUT/172m_bf16.json"
timeout 120 python3 -m pytest -q -rf -p no:cacheprovider tests/model/test_retro.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | head -30
