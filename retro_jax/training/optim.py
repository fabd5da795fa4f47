"""The paper's optimiser: AdamW, linear warm-up from 1e-7, cosine decay to 0.1x, clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                           init_lr: float = 1e-7, final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up from init_lr to peak_lr, then cosine decay to final_fraction * peak_lr."""
  if total_steps <= warmup_steps:
    raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}")
  return optax.join_schedules(
      [optax.linear_schedule(init_lr, peak_lr, warmup_steps),
       optax.cosine_decay_schedule(peak_lr, total_steps - warmup_steps, alpha=final_fraction)],
      boundaries=[warmup_steps])


def adamw(peak_lr: float = 2e-4, warmup_steps: int = 750, total_steps: int = 100_000,
          weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW on the schedule above; no weight decay on vectors (norm scales, attention biases)."""
  schedule = learning_rate_schedule(peak_lr, warmup_steps, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
