"""RETROfit SmolLM2-135M on the default corpus: frozen pretrained decoder, new CCA + encoder.

    python -m retro_jax.build_db --corpus=default --tokenizer=smollm2 --db=runs/smollm2_db
    python -m retro_jax.pretrained.export_smollm2 --workdir=runs/smollm2_baseline
    python -m retro_jax.retrofit --config=experiments/retrofit_smollm2.py --workdir=runs/smollm2_retrofit

The paper's retrofit: CCA every 3rd layer from 6 (6, 9, ..., 30 of SmolLM2's
30), a 2-layer neighbour encoder, k = 2 neighbours of r = 128 tokens, only CCA and encoder trained,
AdamW with LR 2e-4 cosine-decayed to 2e-5 (optim: 0.1x) after a short linear warm-up.
Sized for this 2-core CPU: encoder width 384 (6 heads of 64; the paper's is 896), sequences of
512 tokens, 2 per batch, 90 steps (92,160 token slots; results in docs/results.md). The paper's retrofit saw 6M sequences of
2048 tokens; for that, set --config.seq_len=2048 --config.global_batch=256
--config.total_steps=23_438 --config.warmup_steps=750 (and an accelerator).
"""
import ml_collections

from retro_jax.training import experiment


def get_config():
  c = experiment.defaults()
  c.model_size = "smollm2-135m"  # retro_jax.model.config.SIZES: the decoder as the GGUF loads it
  c.model_overrides = ml_collections.ConfigDict(dict(
      cca_layers=tuple(range(6, 31, 3)), chunk_size=64, num_neighbours=2, neighbour_len=128,
      encoder_layers=2, encoder_d_model=384))
  c.retrieval = True
  c.db = "runs/smollm2_db"  # built with SmolLM2's byte-level BPE (build_db --tokenizer=smollm2)
  c.init_from = "runs/smollm2_baseline"  # the baseline model directory
  c.train_only = "retrieval"
  c.seq_len = 512
  c.global_batch = 2
  c.total_steps = 90
  c.warmup_steps = 10
  # peak_lr 2e-4, weight decay 0.1, clipping 1.0: the defaults (the paper's).
  c.mesh = (-1, 1, 1)
  c.checkpoint_every = 30
  c.keep_checkpoints = 2
  c.log_every = 5
  return c
