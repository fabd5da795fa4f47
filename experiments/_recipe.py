"""The paper's training recipe, shared by the experiment files (ml_collections ConfigDicts)."""
import ml_collections

from retro_jax.training import experiment

# 419.4B tokens per model; batch 256 x 2048 (1024 for 7.5B); AdamW, weight decay 0.1; linear
# warm-up from 1e-7 over 750 steps, cosine decay to 0.1x; max LR 2e-4 (1e-4 for 7.5B).
PAPER_TOKENS = 419.4e9


def paper_recipe(size: str, *, batch: int = 256, peak_lr: float = 2e-4,
                 retrieval: bool = True) -> ml_collections.ConfigDict:
  seq_len = 2048
  c = experiment.defaults()
  c.model_size = size  # a key of retro_jax.model.config.SIZES
  c.retrieval = retrieval  # False: the matching baseline (cca_layers=())
  c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "remat": True,
                                                 "attention_q_block": 512})
  c.seq_len = seq_len
  c.global_batch = batch
  c.total_steps = int(PAPER_TOKENS // (batch * seq_len))
  c.warmup_steps = 750
  c.peak_lr = peak_lr
  c.weight_decay = 0.1
  c.clip_norm = 1.0
  c.mesh = (1, -1, 1)  # (data, fsdp, model): ZeRO-3 over all chips, as the paper shards state
  c.seed = 0
  return c
