"""Basic layers: parameters with logical axes, RMSNorm, embedding, feed-forward."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = jax.nn.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter that carries its logical axis names (mapped to the mesh in partitioning.py)."""
  if len(axes) != len(shape):
    raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, flatten: bool = True) -> jax.Array:
  """Contracts the last n_in axes of x with the first n_in axes of w: x [..., *in] @ w [*in, *out]
  -> [..., *out], in x's dtype.

  flatten=True does it as one 2-D matmul over x's leading axes flattened. That matters on the CPU:
  an einsum with several batch-like axes ("...d,df->...f", "bqd,dhk->bqhk") made XLA transpose
  each activation gradient for the weight gradient inside the loop fusion producing it (strided
  writes; the encoder feed-forward's fwd+bwd at [64, 128, 512] x 2048 took 738 ms against 356 ms
  flattened). flatten=False is the plain tensordot (the same HLO as the einsum), for the
  attention's projections compiled for TPU (see Attention).
  """
  w = w.astype(x.dtype)
  if not flatten:
    return jnp.tensordot(x, w, n_in)
  lead, k = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(*lead, *w.shape[n_in:])


def use_cpu_forms(setting: bool | None) -> bool:
  """RetroConfig.cpu_matmul_forms resolved: None means "when jax's default backend is the CPU"."""
  return jax.default_backend() == "cpu" if setting is None else setting


def _cotangent_einsum(g_spec: str, g: jax.Array, o_spec: str, o: jax.Array, out_spec: str,
                      dtype) -> jax.Array:
  """g (the cotangent) contracted with o into out_spec, with g as the lhs only when the axes it
  loses are its minor ones: XLA then reads both operands in place instead of transposing g."""
  lost = [c for c in g_spec if c not in out_spec]
  if sorted(g_spec[len(g_spec) - len(lost):]) == sorted(lost):
    return jnp.einsum(f"{g_spec},{o_spec}->{out_spec}", g, o, preferred_element_type=dtype)
  return jnp.einsum(f"{o_spec},{g_spec}->{out_spec}", o, g, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
  """jnp.einsum of two operands (returned in out_dtype or a's dtype) whose backward pass orders
  each gradient's operands for the CPU (see _cotangent_einsum); gradients in the operands' dtypes.

  jax's own transpose rule puts the cotangent first; for the attention logits' gradients (the
  relative-position table's, the keys') that makes XLA transpose the whole [B, H, Q, S]
  cotangent with strided writes: those copies were 9% of the reference training step.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=out_dtype or a.dtype)


def _einsum_fwd(spec, a, b, out_dtype):
  return einsum(spec, a, b, out_dtype), (a, b)


def _einsum_bwd(spec, out_dtype, res, g):
  a, b = res
  ins, out = spec.split("->")
  spec_a, spec_b = ins.split(",")
  return (_cotangent_einsum(out, g, spec_b, b, spec_a, a.dtype),
          _cotangent_einsum(out, g, spec_a, a, spec_b, b.dtype))


einsum.defvjp(_einsum_fwd, _einsum_bwd)


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
