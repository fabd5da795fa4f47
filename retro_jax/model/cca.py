"""Chunked cross-attention (CCA), as the paper's Listing 1.

A sequence of T tokens is cut into L = ceil(T / m) chunks C_1..C_L. The neighbours of chunk C_u
are encoded into E_u (k neighbours x r tokens each). The "attending chunk" H_u+ is the LAST token
of C_u followed by the first m-1 tokens of C_{u+1}; it attends to all k*r tokens of E_u together.
So the neighbours of chunk u (0-indexed) reach positions >= (u+1)*m - 1 and nothing before; the
first m-1 tokens of the sequence are left unchanged (CCA adds zero there).

Listing 1 (paper):
    attending_chunks = pad(h[m-1:], ((0, m-1), (0, 0))).reshape(l, m, d)
    chunked_output = cross_attention(attending_chunks, E)  # batched over the l chunks
    output = pad(chunked_output.reshape(n, d), ((m-1, 0), (0, 0)))[:n]
Here T need not be a multiple of m (generation), so the tail is padded up to L*m.

Decoding one token at a time (retro_jax/model/decode.py), position t >= m-1 belongs to the
attending chunk u = (t - (m-1)) // m, the last completed chunk, at query offset
i = (t - (m-1)) % m: `slot` keeps the keys and values of that one chunk's encoded neighbours and
`extend` attends to them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.attention import Attention


class ChunkedCrossAttention(nnx.Module):

  def __init__(self, d_model: int, enc_d_model: int, num_heads: int, head_dim: int,
               chunk_size: int, *, param_dtype=jnp.float32, cpu_forms: bool | None = None,
               rngs: nnx.Rngs):
    self.attention = Attention(d_model, enc_d_model, num_heads, head_dim, kv_axis="enc_embed",
                               param_dtype=param_dtype, cpu_forms=cpu_forms, rngs=rngs)
    self.chunk_size = chunk_size

  def __call__(self, h_BxTxD: jax.Array, enc_BxLxNxRxE: jax.Array,
               enc_mask_BxLxNxR: jax.Array | None) -> jax.Array:
    m = self.chunk_size
    b, t, d = h_BxTxD.shape
    _, l, n, r, e = enc_BxLxNxRxE.shape
    if l != -(-t // m):
      raise ValueError(f"{l} neighbour chunks for a sequence of {t} tokens (chunk size {m}); "
                       f"expected ceil(T / m) = {-(-t // m)}")
    # H_u+ = last token of C_u + first m-1 tokens of C_{u+1}, for u = 1..L (the tail padded).
    h = h_BxTxD[:, m - 1:]
    h = jnp.pad(h, ((0, 0), (0, l * m - h.shape[1]), (0, 0)))
    attending_BLxMxD = h.reshape(b * l, m, d)
    # All k*r encoded neighbour tokens of C_u: N groups of R keys sharing relative positions.
    keys_BLxNxRxE = enc_BxLxNxRxE.reshape(b * l, n, r, e)
    mask = None
    if enc_mask_BxLxNxR is not None:
      mask = jnp.broadcast_to(enc_mask_BxLxNxR.reshape(b * l, 1, n, r), (b * l, m, n, r))
    # d(i, i') = i - i' + m - 1: query i of H_u+ sits at position i + m - 1 of C_u.
    out_BLxMxD = self.attention(attending_BLxMxD, keys_BLxNxRxE, mask, offset=m - 1)
    if enc_mask_BxLxNxR is not None:  # a chunk without any neighbour token gets no update
      has_keys_BL = enc_mask_BxLxNxR.reshape(b * l, n * r).any(axis=-1)
      out_BLxMxD = out_BLxMxD * has_keys_BL[:, None, None].astype(out_BLxMxD.dtype)
    out = out_BLxMxD.reshape(b, l * m, d)
    return jnp.pad(out, ((0, 0), (m - 1, 0), (0, 0)))[:, :t]

  def slot(self, enc_BxNxRxE: jax.Array, enc_mask_BxNxR: jax.Array) -> dict:
    """The decoding cache: keys and values of one chunk's encoded neighbours, their mask, and the
    position table for every distance i - i' + m - 1 (m - r .. 2m - 2)."""
    m, r = self.chunk_size, enc_BxNxRxE.shape[2]
    k_BxNxRxHxK, v_BxNxRxHxK = self.attention.keys_values(enc_BxNxRxE)
    return {"k": k_BxNxRxHxK, "v": v_BxNxRxHxK, "mask": enc_mask_BxNxR,
            "pos": self.attention.position_table(m - r, m + r - 1, enc_BxNxRxE.dtype)}

  def extend(self, h_BxTxD: jax.Array, slot: dict, t) -> jax.Array:
    """CCA of the T positions t .. t+T-1, all in the attending chunk whose neighbours the slot
    holds (T = 1 when decoding); zero where the slot has no neighbour token."""
    m, r = self.chunk_size, slot["k"].shape[2]
    b, num_t, _ = h_BxTxD.shape
    i = (t - (m - 1)) % m  # query offset in the attending chunk
    mask_BxTxNxR = jnp.broadcast_to(slot["mask"][:, None], (b, num_t, *slot["mask"].shape[1:]))
    out_BxTxD = self.attention.attend(h_BxTxD, slot["k"], slot["v"], mask_BxTxNxR, i + m - 1,
                                      pos_table=slot["pos"], pos_table_min=m - r)
    has_keys_B = slot["mask"].reshape(b, -1).any(axis=-1)
    return out_BxTxD * has_keys_B[:, None, None].astype(out_BxTxD.dtype)
