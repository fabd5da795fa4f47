"""The neighbour encoder: bidirectional, conditioned on the decoder's chunk activations.

E_u^j = Encoder(Ret(C_u)^j, H_u): each retrieved neighbour (r tokens: chunk + continuation) is
encoded on its own with bidirectional self-attention; in the first layer it cross-attends to H_u,
the decoder activations of the chunk that retrieved it (taken after self-attention at the first
CCA layer), with relative positions i' - i.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.attention import Attention
from retro_jax.model.config import RetroConfig
from retro_jax.model.layers import FeedForward, Linear, RMSNorm
from retro_jax.model.partitioning import constrain


class EncoderBlock(nnx.Module):

  def __init__(self, cfg: RetroConfig, *, cross_attention: bool, rngs: nnx.Rngs):
    e, pd = cfg.enc_d_model, jnp.dtype(cfg.param_dtype)
    self.self_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.self_attention = Attention(e, e, cfg.enc_heads, cfg.head_dim, q_axis="enc_embed",
                                    kv_axis="enc_embed", param_dtype=pd,
                                    cpu_forms=cfg.cpu_matmul_forms, rngs=rngs)
    if cross_attention:
      self.cross_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
      self.chunk_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
      self.cross_attention = Attention(e, cfg.d_model, cfg.enc_heads, cfg.head_dim,
                                       q_axis="enc_embed", kv_axis="embed", param_dtype=pd,
                                       cpu_forms=cfg.cpu_matmul_forms, rngs=rngs)
    else:
      self.cross_attention = None
    self.ffw_norm = RMSNorm(e, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.ffw = FeedForward(e, cfg.enc_ffw, axis="enc_embed", param_dtype=pd, rngs=rngs)

  def __call__(self, x_XxRxE, mask_XxR, chunk_XxMxD, chunk_mask_XxM):
    """X = B*L*N neighbours; each attends to itself, then to its chunk's M decoder states."""
    mask_Xx1x1xR = mask_XxR[:, None, None, :]
    h = self.self_norm(x_XxRxE)
    x_XxRxE = x_XxRxE + self.self_attention(h, h[:, None], mask_Xx1x1xR)
    if self.cross_attention is not None:
      keys_Xx1xMxD = self.chunk_norm(chunk_XxMxD)[:, None]
      x_XxRxE = x_XxRxE + self.cross_attention(self.cross_norm(x_XxRxE), keys_Xx1xMxD,
                                               chunk_mask_XxM[:, None, None, :])
    return x_XxRxE + self.ffw(self.ffw_norm(x_XxRxE))


class NeighbourEncoder(nnx.Module):

  def __init__(self, cfg: RetroConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.input_proj = Linear(cfg.d_model, cfg.enc_d_model, ("embed", None),
                             param_dtype=pd, rngs=rngs)
    self.blocks = nnx.List([EncoderBlock(cfg, cross_attention=(i == 0), rngs=rngs)
                            for i in range(cfg.encoder_layers)])
    self.final_norm = RMSNorm(cfg.enc_d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.chunk_size = cfg.chunk_size

  def __call__(self, nbr_emb_BxLxNxRxD: jax.Array, nbr_mask_BxLxNxR: jax.Array,
               h_BxTxD: jax.Array) -> jax.Array:
    b, l, n, r, d = nbr_emb_BxLxNxRxD.shape
    m, t = self.chunk_size, h_BxTxD.shape[1]
    # H_u: the decoder activations of chunk u (the tail padded up to L*m and masked).
    chunks_BxLxMxD = jnp.pad(h_BxTxD, ((0, 0), (0, l * m - t), (0, 0))).reshape(b, l, m, d)
    chunk_mask_LxM = (jnp.arange(l * m) < t).reshape(l, m)
    # Every neighbour of chunk u sees the same H_u.
    chunk_XxMxD = jnp.broadcast_to(chunks_BxLxMxD[:, :, None], (b, l, n, m, d)).reshape(-1, m, d)
    chunk_mask_XxM = jnp.broadcast_to(chunk_mask_LxM[None, :, None], (b, l, n, m)).reshape(-1, m)
    x_XxRxE = self.input_proj(nbr_emb_BxLxNxRxD.reshape(b * l * n, r, d))
    x_XxRxE = constrain(x_XxRxE, ("batch", "neighbour_len", "act_embed"))
    mask_XxR = nbr_mask_BxLxNxR.reshape(b * l * n, r)
    for block in self.blocks:
      x_XxRxE = block(x_XxRxE, mask_XxR, chunk_XxMxD, chunk_mask_XxM)
    return self.final_norm(x_XxRxE).reshape(b, l, n, r, -1)
