"""Multi-head attention with Transformer-XL relative positions, used by every attention in RETRO.

Logits between query position q and key position s (Dai et al. 2019, as the paper's baseline):

    a(q, s) = (x_q Wq + u) . (y_s Wk) + (x_q Wq + v) . (phi(dist(q, s)) Wr)

with phi a sinusoid ("a linear transform of a cosine vector") and dist(q, s) = q - s + offset:
  - decoder self-attention: q - s (causal);
  - chunked cross-attention: i - i' + m - 1 (paper, Listing 1 and section B.1);
  - encoder self-attention: q - s (bidirectional); encoder cross-attention: i' - i.
Wr is a (d x heads*head_size) projection: it is the d x d per layer that Table 2's counts include.

Keys may come in G groups that share positions (the k neighbours of a chunk, each r long): their
position logits are computed once over S = r positions and broadcast over the groups.

`positions="rope"` (a Llama decoder's self-attention, e.g. a pretrained baseline to retrofit)
replaces the relative terms (no Wr, u, v) with rotary positions on queries and keys: query q sits
at position q + offset, key s at s, so a(q, s) still depends only on dist(q, s). With
num_kv_heads < num_heads (grouped-query attention) query head i reads key/value head
i // (num_heads / num_kv_heads), as in Llama.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.cpu_forms import MatmulForms
from retro_jax.model.layers import dense_init, param

NEG_INF = -1e30


def sinusoid(dist_P: jax.Array, dim: int) -> jax.Array:
  """phi(d): [sin(d w_i), cos(d w_i)] with w_i = 10000^(-2i/dim); dist may be negative."""
  half = dim // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_PxH = dist_P.astype(jnp.float32)[:, None] * freq[None, :]
  out = jnp.concatenate([jnp.sin(angle_PxH), jnp.cos(angle_PxH)], axis=-1)
  return jnp.pad(out, ((0, 0), (0, dim - 2 * half)))


def rope(x_XxTxHxK: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary positions in the Llama / GPT-NeoX layout: dims i and i + K/2 rotate together by the
  angle pos * theta^(-2i/K). T is the third axis from the end; computed in float32."""
  half = x_XxTxHxK.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
  angle_TxH = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angle_TxH)[:, None, :], jnp.sin(angle_TxH)[:, None, :]  # [T, 1, K/2]
  x = x_XxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_XxTxHxK.dtype)


def skew(x_XxQxP: jax.Array, num_keys: int) -> jax.Array:
  """out[..., q, s] = x[..., q, (Q - 1 - q) + s] for s < num_keys.

  The Transformer-XL "relative shift" done with a pad, a flat slice and a reshape (no gather):
  row q of the result is row q of x read from column Q-1-q on. Full use: P = Q + S - 1. A causal
  caller may pass only the first P >= S columns (distances >= 0); entries whose column
  Q-1-q+s >= P then hold other rows' values, and the caller masks them.
  """
  *lead, q_len, p_len = x_XxQxP.shape
  if not num_keys <= p_len <= q_len + num_keys - 1:
    raise ValueError(f"skew needs S <= P <= Q + S - 1, got Q={q_len} S={num_keys} P={p_len}")
  x = jnp.pad(x_XxQxP, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])  # [..., Q, P+1]
  flat = x.reshape(*lead, q_len * (p_len + 1))
  flat = jax.lax.slice_in_dim(flat, q_len - 1, q_len - 1 + q_len * p_len, axis=-1)
  return flat.reshape(*lead, q_len, p_len)[..., :num_keys]


class Attention(nnx.Module):
  """Queries from x (width d_q), keys/values from y (width d_kv), relative (or rotary) positions."""

  def __init__(self, d_q: int, d_kv: int, num_heads: int, head_dim: int, *,
               q_axis: str = "embed", kv_axis: str = "embed", param_dtype=jnp.float32,
               positions: str = "relative", rope_theta: float = 10000.0,
               num_kv_heads: int | None = None, cpu_forms: bool | None = None, rngs: nnx.Rngs):
    h, k = num_heads, head_dim
    kvh = num_kv_heads or h
    if positions not in ("relative", "rope"):
      raise ValueError(f"positions must be 'relative' or 'rope', got {positions!r}")
    if h % kvh:
      raise ValueError(f"num_kv_heads={kvh} does not divide num_heads={h}")
    if kvh != h and positions != "rope":
      raise ValueError("grouped-query attention (num_kv_heads < num_heads) needs positions='rope'")
    self.wq = param(rngs, dense_init(d_q), (d_q, h, k), (q_axis, "heads", "head_dim"), param_dtype)
    self.wk = param(rngs, dense_init(d_kv), (d_kv, kvh, k), (kv_axis, "heads", "head_dim"),
                    param_dtype)
    self.wv = param(rngs, dense_init(d_kv), (d_kv, kvh, k), (kv_axis, "heads", "head_dim"),
                    param_dtype)
    self.wo = param(rngs, dense_init(h * k), (h, k, d_q), ("heads", "head_dim", q_axis),
                    param_dtype)
    if positions == "relative":
      # Relative positions: phi(dist) (width d_q) -> per-head key space, and the u, v biases.
      self.wr = param(rngs, dense_init(d_q), (d_q, h, k), ("rel_embed", "heads", "head_dim"),
                      param_dtype)
      zeros = jax.nn.initializers.zeros
      self.u = param(rngs, zeros, (h, k), ("heads", "head_dim"), param_dtype)
      self.v = param(rngs, zeros, (h, k), ("heads", "head_dim"), param_dtype)
    self.positions, self.rope_theta, self.num_heads = positions, rope_theta, h
    self.d_q, self.head_dim = d_q, k
    self.mm = MatmulForms(cpu_forms)  # how the contractions are spelled (retro_jax.model.cpu_forms)

  def __call__(self, x_BxQxD: jax.Array, y_BxGxSxE: jax.Array, mask_BxQxGxS: jax.Array | None,
               *, offset: int = 0, q_block: int = 0, causal: bool = False) -> jax.Array:
    """Attends each of Q queries to all G*S keys; dist(q, s) = q - s + offset.

    q_block > 0 processes the queries in blocks of that size (each block rematerialised in the
    backward pass), so the [Q, S] logits never exist at once: O(q_block * S) memory.
    causal=True promises that the mask hides every negative distance, so that (unblocked) only
    the non-negative distances get position logits.
    """
    k_BxGxSxHxK, v_BxGxSxHxK = self.keys_values(y_BxGxSxE)
    b, num_q, d = x_BxQxD.shape
    if not q_block or q_block >= num_q:
      return self.attend(x_BxQxD, k_BxGxSxHxK, v_BxGxSxHxK, mask_BxQxGxS, offset, causal)
    if num_q % q_block:
      raise ValueError(f"{num_q} queries are not a multiple of q_block={q_block}")
    # An unrolled loop of rematerialised blocks (XLA's cost analysis counts every block; a
    # lax.map body would be counted once).
    block = jax.checkpoint(self.attend, static_argnums=(4, 5))
    outs = []
    for start in range(0, num_q, q_block):
      end = start + q_block
      # Causal self-attention (offset 0): the block's queries see only keys before `end`.
      keys = end if causal and offset == 0 else k_BxGxSxHxK.shape[2]
      mask = None if mask_BxQxGxS is None else mask_BxQxGxS[:, start:end, :, :keys]
      outs.append(block(x_BxQxD[:, start:end], k_BxGxSxHxK[:, :, :keys], v_BxGxSxHxK[:, :, :keys],
                        mask, offset + start, causal))
    return jnp.concatenate(outs, axis=1)

  def keys_values(self, y_BxGxSxE: jax.Array, positions_S: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, G, S, H, K] (H: the key/value heads); with rotary positions the keys
    are rotated to positions_S (default 0..S-1)."""
    k_BxGxSxHxK = self.mm.project(y_BxGxSxE, self.wk.value)
    v_BxGxSxHxK = self.mm.project(y_BxGxSxE, self.wv.value)
    if self.positions == "rope":
      if positions_S is None:
        positions_S = jnp.arange(k_BxGxSxHxK.shape[2])
      k_BxGxSxHxK = rope(k_BxGxSxHxK, positions_S, self.rope_theta)
    return k_BxGxSxHxK, v_BxGxSxHxK

  def position_table(self, dist_min: int, num: int, dtype) -> jax.Array | None:
    """phi(d) Wr for d = dist_min .. dist_min + num - 1 as [P, H, K] (None with rotary
    positions): what a cache keeps so that each decoded token skips the projection."""
    if self.positions == "rope":
      return None
    dist_P = dist_min + jnp.arange(num)
    return jnp.einsum("pd,dhk->phk", sinusoid(dist_P, self.d_q).astype(dtype),
                      self.wr.value.astype(dtype))

  # ----------------------------------------------------------------------------------------------
  # Incremental decoding: a cache of keys and values (and the position table) per attention.

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """An empty self-attention cache for max_len positions."""
    shape = (batch, max_len, self.wk.value.shape[1], self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": self.position_table(0, max_len, dtype)}

  def extend(self, x_BxTxD: jax.Array, cache: dict, t) -> tuple[jax.Array, dict]:
    """Causal self-attention of T new positions t .. t+T-1 (t may be traced): their keys and
    values go into the cache, their queries see every cached position up to their own."""
    num_t, max_len = x_BxTxD.shape[1], cache["k"].shape[1]
    new_k, new_v = self.keys_values(x_BxTxD[:, None], t + jnp.arange(num_t))
    k_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache["k"], new_k[:, 0].astype(
        cache["k"].dtype), t, axis=1)
    v_BxSxHxK = jax.lax.dynamic_update_slice_in_dim(cache["v"], new_v[:, 0].astype(
        cache["v"].dtype), t, axis=1)
    keys_S = jnp.arange(max_len)
    mask_1xTx1xS = (keys_S[None, :] <= t + jnp.arange(num_t)[:, None])[None, :, None, :]
    out_BxTxD = self.attend(x_BxTxD, k_BxSxHxK[:, None], v_BxSxHxK[:, None], mask_1xTx1xS, t,
                            pos_table=cache["pos"])
    return out_BxTxD, {**cache, "k": k_BxSxHxK, "v": v_BxSxHxK}

  # ----------------------------------------------------------------------------------------------

  def attend(self, x_BxQxD, k_BxGxSxHxK, v_BxGxSxHxK, mask_BxQxGxS, offset, causal=False, *,
             pos_table=None, pos_table_min: int = 0):
    """Queries from x at positions offset + q against projected keys/values (`keys_values`).

    pos_table: phi(d) Wr for d = pos_table_min, ... (`position_table`), read for each distance
    instead of projected here; a distance outside it must be masked.
    """
    if self.positions == "rope":
      return self._attend_rope(x_BxQxD, k_BxGxSxHxK, v_BxGxSxHxK, mask_BxQxGxS, offset)
    dt = x_BxQxD.dtype
    b, num_q, num_s = x_BxQxD.shape[0], x_BxQxD.shape[1], k_BxGxSxHxK.shape[2]
    q_BxQxHxK = self.mm.project(x_BxQxD, self.wq.value)
    q_BxQxHxK = q_BxQxHxK * jnp.asarray(self.head_dim ** -0.5, dt)
    content_BxHxQxGxS = self.mm.einsum("bqhk,bgshk->bhqgs", q_BxQxHxK + self.u.value.astype(dt),
                                     k_BxGxSxHxK, jnp.float32)
    qv_BxQxHxK = q_BxQxHxK + self.v.value.astype(dt)
    if pos_table is None:
      # Distances, largest first, so that row q of the skewed logits starts at column Q-1-q.
      num_p = num_q + num_s - 1
      # Causal: distances below 0 are masked, so only offset+Q-1 .. 0 need position logits.
      if causal and isinstance(offset, int):
        num_p = max(num_s, min(num_p, offset + num_q))
      dist_P = offset + num_q - 1 - jnp.arange(num_p)
      r_HxPxK = jnp.einsum("pd,dhk->hpk", sinusoid(dist_P, self.d_q).astype(dt),
                           self.wr.value.astype(dt))
      pos_BxHxQxP = self.mm.position_logits(qv_BxQxHxK, r_HxPxK)
      pos_BxHxQxS = skew(pos_BxHxQxP, num_s)
    else:
      pos_BxHxQxP = jnp.einsum("bqhk,phk->bhqp", qv_BxQxHxK, pos_table.astype(dt),
                               preferred_element_type=jnp.float32)
      num_p = pos_table.shape[0]
      dist_QxS = offset + jnp.arange(num_q)[:, None] - jnp.arange(num_s)[None, :]
      row_QxS = jnp.clip(dist_QxS - pos_table_min, 0, num_p - 1)
      pos_BxHxQxS = pos_BxHxQxP[:, :, jnp.arange(num_q)[:, None], row_QxS]
    logits_BxHxQxGxS = content_BxHxQxGxS + pos_BxHxQxS[:, :, :, None, :]
    if mask_BxQxGxS is not None:
      logits_BxHxQxGxS = jnp.where(mask_BxQxGxS[:, None], logits_BxHxQxGxS, NEG_INF)
    b, h, q, g, s = logits_BxHxQxGxS.shape
    probs = jax.nn.softmax(logits_BxHxQxGxS.reshape(b, h, q, g * s), axis=-1)
    probs_BxHxQxGxS = probs.reshape(b, h, q, g, s).astype(dt)
    out_BxQxHxK = self.mm.einsum("bhqgs,bgshk->bqhk", probs_BxHxQxGxS, v_BxGxSxHxK)
    return self.mm.project(out_BxQxHxK, self.wo.value, n_in=2)

  def _attend_rope(self, x_BxQxD, k_BxGxSxCxK, v_BxGxSxCxK, mask_BxQxGxS, offset):
    """Rotary positions, C key/value heads each shared by R = num_heads / C query heads."""
    dt = x_BxQxD.dtype
    b, num_q, _ = x_BxQxD.shape
    c = k_BxGxSxCxK.shape[3]
    q_BxQxHxK = self.mm.project(x_BxQxD, self.wq.value)
    q_BxQxHxK = q_BxQxHxK * jnp.asarray(self.head_dim ** -0.5, dt)
    q_BxQxHxK = rope(q_BxQxHxK, offset + jnp.arange(num_q), self.rope_theta)
    q_BxQxCxRxK = q_BxQxHxK.reshape(b, num_q, c, self.num_heads // c, self.head_dim)
    logits_BxCxRxQxGxS = self.mm.einsum("bqcrk,bgsck->bcrqgs", q_BxQxCxRxK, k_BxGxSxCxK,
                                      jnp.float32)
    if mask_BxQxGxS is not None:
      logits_BxCxRxQxGxS = jnp.where(mask_BxQxGxS[:, None, None], logits_BxCxRxQxGxS, NEG_INF)
    shape = logits_BxCxRxQxGxS.shape
    probs = jax.nn.softmax(logits_BxCxRxQxGxS.reshape(*shape[:4], -1), axis=-1)
    probs_BxCxRxQxGxS = probs.reshape(shape).astype(dt)
    out_BxQxCxRxK = self.mm.einsum("bcrqgs,bgsck->bqcrk", probs_BxCxRxQxGxS, v_BxGxSxCxK)
    out_BxQxHxK = out_BxQxCxRxK.reshape(b, num_q, self.num_heads, self.head_dim)
    return self.mm.project(out_BxQxHxK, self.wo.value, n_in=2)


def causal_mask(seq_len: int) -> jax.Array:
  """[1, T, 1, T]: query t sees keys <= t."""
  idx = jnp.arange(seq_len)
  return (idx[None, :] <= idx[:, None])[None, :, None, :]
