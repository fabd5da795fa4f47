"""The RETRO model: a pre-norm decoder whose CCA layers read the encoded neighbours.

    x = Emb(tokens)
    for layer p = 1..num_layers:
        x = x + SelfAttention(norm(x))                        # causal, relative (or rotary) positions
        if p in cca_layers and neighbours given:
            if p == min(cca_layers): E = Encoder(Emb(neighbours), H = x)
            x = x + CCA(norm(x), E)
        x = x + FeedForward(norm(x))
    logits = Unembed(norm(x))

With `neighbours=None` the CCA layers and the encoder are skipped: the same weights run as a plain
decoder (RETRO[OFF]); a config with `cca_layers=()` is the baseline.

A Llama-architecture decoder is a config too (`positions="rope"`, `num_kv_heads`,
`ffw_activation="swiglu"`, `tie_embeddings=True`; see retro_jax/pretrained/ for SmolLM2): its CCA
layers and encoder, when added, keep the paper's relative positions and GELU feed-forward.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.attention import Attention, causal_mask
from retro_jax.model.cca import ChunkedCrossAttention
from retro_jax.model.config import RetroConfig
from retro_jax.model.encoder import NeighbourEncoder
from retro_jax.model.layers import Embed, FeedForward, Linear, RMSNorm
from retro_jax.model.partitioning import constrain

ACT = ("batch", "length", "act_embed")


class DecoderBlock(nnx.Module):

  def __init__(self, cfg: RetroConfig, *, cca: bool, rngs: nnx.Rngs):
    d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(d, d, cfg.num_heads, cfg.head_dim, param_dtype=pd,
                          positions=cfg.positions, rope_theta=cfg.rope_theta,
                          num_kv_heads=cfg.kv_heads, cpu_forms=cfg.cpu_matmul_forms, rngs=rngs)
    self.q_block = cfg.attention_q_block
    if cca:
      self.cca_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
      self.cca = ChunkedCrossAttention(d, cfg.enc_d_model, cfg.num_heads, cfg.head_dim,
                                       cfg.chunk_size, param_dtype=pd,
                                       cpu_forms=cfg.cpu_matmul_forms, rngs=rngs)
    else:
      self.cca = None
    self.ffw_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.ffw = FeedForward(d, cfg.ffw_size, param_dtype=pd, activation=cfg.ffw_activation,
                           rngs=rngs)

  def self_attention(self, x_BxTxD: jax.Array) -> jax.Array:
    h = self.attn_norm(x_BxTxD)
    x_BxTxD = x_BxTxD + self.attn(h, h[:, None], causal_mask(h.shape[1]),
                                  q_block=self.q_block, causal=True)
    return constrain(x_BxTxD, ACT)

  def decode_self_attention(self, x_BxTxD: jax.Array, cache: dict, t) -> tuple[jax.Array, dict]:
    """`self_attention` of T new positions t .. t+T-1 over the cache (model/decode.py)."""
    out_BxTxD, cache = self.attn.extend(self.attn_norm(x_BxTxD), cache, t)
    return x_BxTxD + out_BxTxD, cache

  def decode_cross_attention_and_ffw(self, x_BxTxD: jax.Array, cca_slot: dict | None, t):
    """`cross_attention_and_ffw` of positions t .. t+T-1 against one chunk's neighbours."""
    if cca_slot is not None:
      x_BxTxD = x_BxTxD + self.cca.extend(self.cca_norm(x_BxTxD), cca_slot, t)
    return x_BxTxD + self.ffw(self.ffw_norm(x_BxTxD))

  def cross_attention_and_ffw(self, x_BxTxD, enc_BxLxNxRxE, enc_mask_BxLxNxR):
    if enc_BxLxNxRxE is not None:
      x_BxTxD = x_BxTxD + self.cca(self.cca_norm(x_BxTxD), enc_BxLxNxRxE, enc_mask_BxLxNxR)
    x_BxTxD = x_BxTxD + self.ffw(self.ffw_norm(x_BxTxD))
    return constrain(x_BxTxD, ACT)


class Retro(nnx.Module):

  def __init__(self, config: RetroConfig, *, rngs: nnx.Rngs):
    cfg, pd = config, jnp.dtype(config.param_dtype)
    self.config = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, param_dtype=pd, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(cfg, cca=(p in cfg.cca_layers), rngs=rngs)
                            for p in range(1, cfg.num_layers + 1)])
    self.encoder = NeighbourEncoder(cfg, rngs=rngs) if cfg.retrieval else None
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    # Tied embeddings (a Llama baseline such as SmolLM2): logits against the embedding table.
    self.unembed = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, rngs=rngs)

  def __call__(self, tokens_BxT: jax.Array,
               neighbours_BxLxNxR: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    if neighbours_BxLxNxR is not None:
      if not cfg.retrieval:
        raise ValueError("neighbours given to a model without CCA layers (cca_layers=())")
      want = cfg.num_chunks(tokens_BxT.shape[1])
      if neighbours_BxLxNxR.ndim != 4 or neighbours_BxLxNxR.shape[1] != want:
        raise ValueError(f"neighbours must be [B, L={want}, N, R] for T={tokens_BxT.shape[1]}, "
                         f"got {neighbours_BxLxNxR.shape}")
    x_BxTxD = constrain(self.embed(tokens_BxT, dt), ACT)
    enc = enc_mask = None
    for p, block in enumerate(self.blocks, start=1):
      x_BxTxD = _maybe_remat(DecoderBlock.self_attention, cfg.remat)(block, x_BxTxD)
      use_cca = block.cca is not None and neighbours_BxLxNxR is not None
      if use_cca and enc is None:  # the first CCA layer: encode the neighbours, conditioned on H
        enc_mask = neighbours_BxLxNxR != cfg.pad_id
        enc = _maybe_remat(NeighbourEncoder.__call__, cfg.remat)(
            self.encoder, self.embed(neighbours_BxLxNxR, dt), enc_mask, x_BxTxD)
      x_BxTxD = _maybe_remat(DecoderBlock.cross_attention_and_ffw, cfg.remat)(
          block, x_BxTxD, enc if use_cca else None, enc_mask if use_cca else None)
    return constrain(self.logits(x_BxTxD), ("batch", "length", "act_vocab"))

  def logits(self, x_BxTxD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] from the last block's output."""
    h_BxTxD = self.final_norm(x_BxTxD)
    unembed = self.embed.attend if self.unembed is None else self.unembed
    return unembed(h_BxTxD).astype(jnp.float32)


def _maybe_remat(fn, remat: bool):
  return nnx.remat(fn) if remat else fn


def count_params(model: nnx.Module, *, non_embedding: bool = True) -> int:
  """Parameter count (works on an abstract model from nnx.eval_shape: nothing is allocated).

  non_embedding=True leaves out the token embedding and the unembedding, as Table 2 does.
  """
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    top = getattr(path[0], "key", None)
    if non_embedding and top in ("embed", "unembed"):
      continue
    total += math.prod(leaf.shape)
  return total
