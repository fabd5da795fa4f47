"""RETROfit the CPU demo's tiny baseline (experiments/tiny.py with retrieval=False).

    python -m retro_jax.train --config=experiments/tiny.py --config.retrieval=false \
        --workdir=runs/demo/baseline
    python -m retro_jax.retrofit --config=experiments/retrofit_tiny.py --workdir=runs/demo/retrofit

The model fields are experiments/tiny.py's with retrieval (CCA at layers 2 and 4 of 4: the tiny
model has no layer 6, so not the paper's every-3rd-from-6), encoder 2 x 128, k = 2, r = 128; only
CCA and encoder train. The schedule is tiny.py's (peak LR 2e-3, cosine to 0.1x), as the paper's
retrofit reuses its pre-training schedule (2e-4 -> 2e-5). Steps: 112, so that baseline + retrofit
cost what the RETRO trained from scratch costs (300 steps): analytic FLOPs per token at T = 256
are 60.2M for RETRO and 37.7M for the baseline, 300 * (1 - 37.7 / 60.2) = 112 (a retrofit step
still runs the whole forward and most of the backward, so counted as a RETRO step).
"""
import ml_collections

from experiments import tiny


def get_config():
  c = tiny.get_config()  # same decoder, database, batch and sequence length as the baseline
  c.model_overrides = ml_collections.ConfigDict(dict(c.model_overrides))
  c.retrieval = True
  c.init_from = "runs/demo/baseline"  # the baseline model directory (--config.init_from=...)
  c.train_only = "retrieval"
  c.total_steps = 112
  c.warmup_steps = 10
  return c
