"""The matmul forms XLA:CPU runs fastest, behind one switch, so that the attention reads as maths.

`project` is every dense layer: one 2-D matmul over the flattened leading axes. With einsums like
"...d,df->...f" over several batch-like axes, XLA:CPU transposes each activation gradient (for the
weight gradient) inside the fusion that produces it, with strided writes.

`MatmulForms` holds the attention's contractions. With the CPU forms on: the projections are 2-D
matmuls, the einsums use `einsum` (a custom VJP that orders each gradient's operands so that XLA
reads them in place instead of transposing the cotangent), and the relative-position logits treat
B and H both as batch axes. Off (RetroConfig.cpu_matmul_forms=False, as the TPU compiles use),
every one is the plain tensordot / einsum: on TPU the flattened forms cost memory.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, n_in: int = 1, *, flatten: bool = True) -> jax.Array:
  """Contracts the last n_in axes of x with the first n_in axes of w: x [..., *in] @ w [*in, *out]
  -> [..., *out], in x's dtype.

  flatten=True does it as one 2-D matmul over x's leading axes flattened (see the module
  docstring); flatten=False is the plain tensordot (the same HLO as the einsum).
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
  cotangent with strided writes.
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




@dataclasses.dataclass(frozen=True)
class MatmulForms:
  """The attention's contractions, in the CPU forms or plain; `setting` is
  RetroConfig.cpu_matmul_forms (None: decided when traced, on when the default backend is the CPU)."""
  setting: bool | None

  @property
  def on(self) -> bool:
    return use_cpu_forms(self.setting)

  def project(self, x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    return project(x, w, n_in, flatten=self.on)

  def einsum(self, spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    if self.on:
      return einsum(spec, a, b, out_dtype)
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)

  def position_logits(self, qv_BxQxHxK: jax.Array, r_HxPxK: jax.Array) -> jax.Array:
    """[B, H, Q, P] logits (q + v) . W_r phi(dist_p), in float32."""
    if not self.on:
      return jnp.einsum("bqhk,hpk->bhqp", qv_BxQxHxK, r_HxPxK, preferred_element_type=jnp.float32)
    # B and H both batch axes (the small table broadcast over B): no gradient then has to move H
    # in front of the [B, H, Q, P] cotangent.
    r_BxHxPxK = jnp.broadcast_to(r_HxPxK[None], (qv_BxQxHxK.shape[0], *r_HxPxK.shape))
    return einsum("bhqk,bhpk->bhqp", jnp.swapaxes(qv_BxQxHxK, 1, 2), r_BxHxPxK, jnp.float32)
