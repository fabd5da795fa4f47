"""Basic layers: parameters with logical axes, RMSNorm, embedding, feed-forward."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.cpu_forms import project

Initializer = jax.nn.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter that carries its logical axis names (mapped to the mesh in partitioning.py)."""
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def dense_init(fan_in: int) -> Initializer:
  return jax.nn.initializers.truncated_normal(stddev=fan_in ** -0.5)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale.value.astype(jnp.float32)).astype(x_BxTxD.dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` gives logits against the same table when embeddings are tied."""

  def __init__(self, vocab_size: int, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.table = param(rngs, jax.nn.initializers.normal(1.0), (vocab_size, dim),
                       ("vocab", "embed"), param_dtype)

  def __call__(self, tokens_BxT: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table.value, tokens_BxT, axis=0).astype(dtype)

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    return project(x_BxTxD, self.table.value.T)


class Linear(nnx.Module):
  """y = x @ W over the last axis, W with logical axes (in, out)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.w = param(rngs, dense_init(d_in), (d_in, d_out), axes, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return project(x, self.w.value)


class FeedForward(nnx.Module):
  """Two-layer GELU MLP (the paper's GPT-2-like blocks), or Llama's SwiGLU:
  w_out(silu(x w_gate) * (x w_in)) with activation="swiglu" (w_in is Llama's up projection)."""

  def __init__(self, dim: int, hidden: int, *, axis: str = "embed", param_dtype=jnp.float32,
               activation: str = "gelu", rngs: nnx.Rngs):
    if activation not in ("gelu", "swiglu"):
      raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
    self.w_in = param(rngs, dense_init(dim), (dim, hidden), (axis, "mlp"), param_dtype)
    self.w_out = param(rngs, dense_init(hidden), (hidden, dim), ("mlp", axis), param_dtype)
    if activation == "swiglu":
      self.w_gate = param(rngs, dense_init(dim), (dim, hidden), (axis, "mlp"), param_dtype)
    self.activation = activation

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = project(x_BxTxD, self.w_in.value)
    if self.activation == "swiglu":
      gate_BxTxF = project(x_BxTxD, self.w_gate.value)
      h_BxTxF = jax.nn.silu(gate_BxTxF) * h_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(h_BxTxF)
    return project(h_BxTxF, self.w_out.value)
