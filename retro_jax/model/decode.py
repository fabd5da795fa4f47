"""Incremental decoding for `Retro`: a self-attention KV cache and the current chunk's encoded
neighbours, so that each new token costs O(T) instead of a full O(T^2) recompute.

    dec = Decoder(model, max_len=1024)
    logits_BxV, state = dec.prefill(prompt_BxP, neighbours_BxLxNxR)  # L = ceil(P / m)
    for ...:
      nbrs_BxNxR = retrieve(...) if dec.completes_chunk(state) else None
      logits_BxV, state = dec.step(state, token_B, nbrs_BxNxR)

`prefill` runs the prompt through the model's own modules in one call (as `Retro.__call__` does) and
keeps, per decoder layer, the keys and values of every position. `step` feeds one token at position
t = state.length. What it caches, and why it is exact:

  * Self-attention (Transformer-XL relative positions): the new query row's logits are
    (q_t + u) . k_s + (q_t + v) . (phi(t - s) Wr) for s <= t. phi(d) Wr is tabled once per layer for
    d = 0..max_len-1 (`tables`), so the row costs O(T) with no recompute of earlier positions.
  * Chunked cross-attention (Listing 1): position t >= m-1 belongs to the attending chunk
    u = (t - (m-1)) // m, i.e. the LAST COMPLETED chunk, at query offset i = (t - (m-1)) % m, and
    attends to E_u with d(i, i') = i - i' + m - 1. Only E_u of the last completed chunk is ever
    read, so the cache holds just that one chunk's CCA keys/values (per CCA layer) and its mask.
    Before any chunk has completed (t < m-1) the slot is empty (all masked) and CCA adds zero,
    exactly as the full forward does for the first m-1 tokens.
  * The encoder: E_u depends only on Ret(C_u) and H_u, the decoder states of chunk u at the first
    CCA layer (after its self-attention). `step` stores each position's H in an m-slot buffer; the
    step whose token completes chunk u (t = (u+1)*m - 1, `completes_chunk`) must be given
    Ret(C_u) (the neighbours retrieved with C_u as query): it runs the encoder once on them with
    the full H_u, right after the first CCA layer's self-attention, and overwrites the CCA slot,
    which that same token already reads (the last token of C_u attends to E_u).
With `neighbours=None` at prefill the whole sequence decodes without retrieval (RETRO[OFF]).

All buffers have a fixed size (max_len rounded up to a multiple of m; batch fixed at prefill), so
`step` compiles twice (a plain step and a chunk-completing step) and then runs for every position;
`prefill` compiles once per prompt length rounded up to m. Cache buffers are donated to each step.
Only `positions="relative"` (the model's default, Transformer-XL) with one key/value head per
query head is supported.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.model.attention import NEG_INF, sinusoid
from retro_jax.model.config import RetroConfig


class DecodeError(ValueError):
  """A decode call with inputs that do not fit the cache (length, batch, neighbours)."""


@dataclasses.dataclass
class DecodeState:
  """The cache of one batch of sequences. `arrays` is the jitted pytree; `length` is the number of
  tokens consumed (the position of the next token); `retrieval` is fixed at prefill."""
  arrays: dict
  length: int
  retrieval: bool

  @property
  def batch_size(self) -> int:
    return self.arrays["k"][0].shape[0]


def _check_supported(cfg: RetroConfig, model) -> None:
  positions = cfg.positions
  if positions != "relative":
    raise NotImplementedError(
        f"incremental decoding supports positions='relative' (Transformer-XL) only, the config has "
        f"positions={positions!r}; decode with the full forward `model(tokens, neighbours)`")
  for block in model.blocks:
    for attn in [block.attn] + ([block.cca.attention] if block.cca is not None else []):
      if attn.wk.value.shape[1:] != attn.wq.value.shape[1:]:
        raise NotImplementedError(
            "incremental decoding supports one key/value head per query head (no GQA/MQA); "
            "decode with the full forward `model(tokens, neighbours)`")


class Decoder:
  """Jitted prefill / step over fixed-size cache buffers, reading the weights of a `Retro`.

  The weights are captured (split) at construction; after changing the model, build a new Decoder.
  """

  def __init__(self, model, max_len: int):
    cfg = model.config
    _check_supported(cfg, model)
    self.config = cfg
    m = cfg.chunk_size
    self.max_len = -(-int(max_len) // m) * m
    if self.max_len < 1:
      raise DecodeError(f"max_len={max_len} must be >= 1")
    self.dtype = jnp.dtype(cfg.dtype)
    self.graphdef, self.params = nnx.split(model)
    self.cca_layer_idx = [p - 1 for p in cfg.cca_layers]  # 0-indexed decoder blocks with CCA
    self._tables = jax.jit(self._tables_fn)(self.params)
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("retrieval",))
    self._step = jax.jit(self._step_fn, static_argnames=("retrieval", "completes"),
                         donate_argnums=(2,))

  # --------------------------------------------------------------------------------------------
  # Public API.

  def completes_chunk(self, state: DecodeState) -> bool:
    """Whether the next token (at position state.length) is the last of its chunk: the step that
    feeds it must be given that chunk's neighbours (when retrieval is on)."""
    return (state.length + 1) % self.config.chunk_size == 0

  def prefill(self, tokens_BxP, neighbours_BxLxNxR=None) -> tuple[jax.Array, DecodeState]:
    """Runs the prompt; returns the logits at its last position [B, V] and the cache.

    neighbours_BxLxNxR: Ret(C_u) of every chunk of the prompt, L = ceil(P / m) (the last,
    incomplete chunk's entry is never read), or None to decode without retrieval.
    """
    cfg, m = self.config, self.config.chunk_size
    tokens_BxP = jnp.asarray(tokens_BxP, jnp.int32)
    if tokens_BxP.ndim != 2 or tokens_BxP.shape[1] < 1:
      raise DecodeError(f"prompt must be [B, P] with P >= 1, got shape {tokens_BxP.shape}")
    b, p = tokens_BxP.shape
    if p > self.max_len:
      raise DecodeError(f"prompt of {p} tokens does not fit max_len={self.max_len}; build the "
                        f"Decoder with a larger max_len")
    num_l = cfg.num_chunks(p)
    padded = num_l * m
    tokens_BxP = jnp.pad(tokens_BxP, ((0, 0), (0, padded - p)), constant_values=cfg.pad_id)
    retrieval = neighbours_BxLxNxR is not None
    if retrieval:
      if not cfg.retrieval:
        raise DecodeError("neighbours given to a model without CCA layers (cca_layers=())")
      neighbours_BxLxNxR = jnp.asarray(neighbours_BxLxNxR, jnp.int32)
      want = (b, num_l, cfg.num_neighbours, cfg.neighbour_len)
      if neighbours_BxLxNxR.ndim != 4 or neighbours_BxLxNxR.shape[:2] != want[:2] or \
          neighbours_BxLxNxR.shape[3] != want[3]:
        raise DecodeError(f"prompt neighbours must be [B={b}, L={num_l}, N, R={want[3]}] for a "
                          f"prompt of {p} tokens, got {neighbours_BxLxNxR.shape}")
    arrays, logits_BxV = self._prefill(self.params, self._tables, tokens_BxP, neighbours_BxLxNxR,
                                       jnp.int32(p), retrieval=retrieval)
    return logits_BxV, DecodeState(arrays=arrays, length=p, retrieval=retrieval)

  def step(self, state: DecodeState, tokens_B, neighbours_BxNxR=None
           ) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per sequence at position state.length; returns its logits [B, V].

    When retrieval is on and this token completes a chunk (`completes_chunk(state)`),
    neighbours_BxNxR must be that chunk's neighbours; otherwise it must be None.
    `state` is consumed (its buffers are donated); use the returned one.
    """
    cfg = self.config
    if state.length >= self.max_len:
      raise DecodeError(f"the cache is full ({self.max_len} tokens); build the Decoder with a "
                        f"larger max_len")
    tokens_B = jnp.asarray(tokens_B, jnp.int32).reshape(-1)
    if tokens_B.shape[0] != state.batch_size:
      raise DecodeError(f"{tokens_B.shape[0]} tokens for a cache of batch {state.batch_size}")
    completes = state.retrieval and self.completes_chunk(state)
    if completes:
      if neighbours_BxNxR is None:
        raise DecodeError(f"the token at position {state.length} completes chunk "
                          f"{state.length // cfg.chunk_size}: pass that chunk's neighbours")
      neighbours_BxNxR = jnp.asarray(neighbours_BxNxR, jnp.int32)
      if neighbours_BxNxR.ndim != 3 or neighbours_BxNxR.shape[0] != state.batch_size or \
          neighbours_BxNxR.shape[2] != cfg.neighbour_len:
        raise DecodeError(f"neighbours must be [B={state.batch_size}, N, R={cfg.neighbour_len}], "
                          f"got {neighbours_BxNxR.shape}")
    elif neighbours_BxNxR is not None:
      raise DecodeError(f"neighbours given at position {state.length}, which completes no chunk"
                        + ("" if state.retrieval else " (this cache decodes without retrieval)"))
    arrays, logits_BxV = self._step(self.params, self._tables, state.arrays, tokens_B,
                                    neighbours_BxNxR, jnp.int32(state.length),
                                    retrieval=state.retrieval, completes=completes)
    state.arrays = None  # donated
    return logits_BxV, DecodeState(arrays=arrays, length=state.length + 1,
                                   retrieval=state.retrieval)

  # --------------------------------------------------------------------------------------------
  # Jitted bodies.

  def _tables_fn(self, params):
    """Position projections phi(d) Wr per layer: self-attention d = 0..S-1 -> [S, H, K]; CCA
    d = m-R .. 2m-2 (all of i - i' + m - 1) -> [m+R-1, H, K], row j holding d = j + m - R."""
    model = nnx.merge(self.graphdef, params)
    cfg, dt = self.config, self.dtype
    m, r = cfg.chunk_size, cfg.neighbour_len

    def table(attn, dist_P):
      return jnp.einsum("pd,dhk->phk", sinusoid(dist_P, attn.d_q).astype(dt),
                        attn.wr.value.astype(dt))

    self_dist = jnp.arange(self.max_len)
    cca_dist = jnp.arange(m + r - 1) + (m - r)
    return {"self": [table(b.attn, self_dist) for b in model.blocks],
            "cca": [table(model.blocks[i].cca.attention, cca_dist) for i in self.cca_layer_idx]}

  def _prefill_fn(self, params, tables, tokens_BxT, neighbours_BxLxNxR, length, *, retrieval):
    del tables
    model = nnx.merge(self.graphdef, params)
    cfg, dt, m = self.config, self.dtype, self.config.chunk_size
    b, t = tokens_BxT.shape
    s = self.max_len
    x_BxTxD = model.embed(tokens_BxT, dt)
    ks, vs = [], []
    enc = enc_mask = chunk_h_BxMxD = None
    for p, block in enumerate(model.blocks):
      h = block.attn_norm(x_BxTxD)
      k_BxTxHxK = jnp.einsum("btd,dhk->bthk", h, block.attn.wk.value.astype(dt))
      v_BxTxHxK = jnp.einsum("btd,dhk->bthk", h, block.attn.wv.value.astype(dt))
      pad = ((0, 0), (0, s - t), (0, 0), (0, 0))
      ks.append(jnp.pad(k_BxTxHxK, pad))
      vs.append(jnp.pad(v_BxTxHxK, pad))
      x_BxTxD = block.self_attention(x_BxTxD)
      use_cca = retrieval and block.cca is not None
      if use_cca and enc is None:
        enc_mask = neighbours_BxLxNxR != cfg.pad_id
        enc = model.encoder(model.embed(neighbours_BxLxNxR, dt), enc_mask, x_BxTxD)
        # H of the chunk holding position `length` (the next token): its first length % m rows.
        start = (length // m) * m
        chunk_h_BxMxD = jax.lax.dynamic_slice_in_dim(
            jnp.pad(x_BxTxD, ((0, 0), (0, m), (0, 0))), start, m, axis=1)
      x_BxTxD = block.cross_attention_and_ffw(x_BxTxD, enc if use_cca else None,
                                              enc_mask if use_cca else None)
    last_Bx1xD = jax.lax.dynamic_slice_in_dim(x_BxTxD, length - 1, 1, axis=1)
    logits_BxV = _unembed(model, last_Bx1xD)
    arrays = {"k": ks, "v": vs}
    if retrieval:
      # The CCA slot: E_u of the last completed chunk u = length // m - 1 (empty if none).
      u = jnp.maximum(length // m - 1, 0)
      enc_BxNxRxE = jax.lax.dynamic_index_in_dim(enc, u, axis=1, keepdims=False)
      mask_BxNxR = jax.lax.dynamic_index_in_dim(enc_mask, u, axis=1, keepdims=False)
      mask_BxNxR = mask_BxNxR & (length >= m)
      arrays.update(self._cca_slot(model, enc_BxNxRxE, mask_BxNxR), chunk_h=chunk_h_BxMxD)
    return arrays, logits_BxV

  def _cca_slot(self, model, enc_BxNxRxE, mask_BxNxR) -> dict:
    dt = self.dtype
    ck, cv = [], []
    for i in self.cca_layer_idx:
      attn = model.blocks[i].cca.attention
      ck.append(jnp.einsum("bnre,ehk->bnrhk", enc_BxNxRxE, attn.wk.value.astype(dt)))
      cv.append(jnp.einsum("bnre,ehk->bnrhk", enc_BxNxRxE, attn.wv.value.astype(dt)))
    return {"cca_k": ck, "cca_v": cv, "cca_mask": mask_BxNxR}

  def _step_fn(self, params, tables, arrays, tokens_B, neighbours_BxNxR, t, *, retrieval,
               completes):
    model = nnx.merge(self.graphdef, params)
    cfg, dt, m, s = self.config, self.dtype, self.config.chunk_size, self.max_len
    r = cfg.neighbour_len
    arrays = dict(arrays)
    ks, vs = list(arrays["k"]), list(arrays["v"])
    x_BxD = model.embed(tokens_B, dt)
    first_cca = self.cca_layer_idx[0] if self.cca_layer_idx else None
    keys_S = jnp.arange(s)
    # Self-attention: key s sits at distance t - s (>= 0 for the visible keys s <= t).
    dist_idx_S = jnp.clip(t - keys_S, 0, s - 1)
    visible_1x1xS = (keys_S <= t)[None, None, :]
    # CCA: query offset i in the attending chunk; key i' at table row i - i' + r - 1.
    i = (t - (m - 1)) % m
    cca_idx_R = i - jnp.arange(r) + r - 1
    c = 0
    for p, block in enumerate(model.blocks):
      attn = block.attn
      h_BxD = block.attn_norm(x_BxD)
      k_BxHxK = jnp.einsum("bd,dhk->bhk", h_BxD, attn.wk.value.astype(dt))
      v_BxHxK = jnp.einsum("bd,dhk->bhk", h_BxD, attn.wv.value.astype(dt))
      ks[p] = jax.lax.dynamic_update_slice_in_dim(ks[p], k_BxHxK[:, None], t, axis=1)
      vs[p] = jax.lax.dynamic_update_slice_in_dim(vs[p], v_BxHxK[:, None], t, axis=1)
      x_BxD = x_BxD + _attend_row(attn, h_BxD, ks[p], vs[p], tables["self"][p], dist_idx_S,
                                  visible_1x1xS, dt)
      if retrieval and p == first_cca:
        arrays["chunk_h"] = jax.lax.dynamic_update_slice_in_dim(
            arrays["chunk_h"], x_BxD[:, None], t % m, axis=1)
        if completes:  # the chunk is complete: encode its neighbours with the full H_u
          enc_mask_BxNxR = neighbours_BxNxR != cfg.pad_id
          enc = model.encoder(model.embed(neighbours_BxNxR[:, None], dt), enc_mask_BxNxR[:, None],
                              arrays["chunk_h"])
          arrays.update(self._cca_slot(model, enc[:, 0], enc_mask_BxNxR))
      if retrieval and block.cca is not None:
        b, n = arrays["cca_mask"].shape[:2]
        mask_Bx1xNR = arrays["cca_mask"].reshape(b, 1, n * r)
        out_BxD = _attend_row(block.cca.attention, block.cca_norm(x_BxD),
                              arrays["cca_k"][c].reshape(b, n * r, *arrays["cca_k"][c].shape[3:]),
                              arrays["cca_v"][c].reshape(b, n * r, *arrays["cca_v"][c].shape[3:]),
                              tables["cca"][c], jnp.tile(cca_idx_R, n), mask_Bx1xNR, dt)
        has_keys_B = arrays["cca_mask"].reshape(b, n * r).any(axis=-1)
        x_BxD = x_BxD + out_BxD * has_keys_B[:, None].astype(dt)
        c += 1
      x_BxD = x_BxD + block.ffw(block.ffw_norm(x_BxD))
    logits_BxV = _unembed(model, x_BxD[:, None])
    arrays["k"], arrays["v"] = ks, vs
    return arrays, logits_BxV


def _unembed(model, x_Bx1xD) -> jax.Array:
  """Logits [B, V] as `Retro.__call__` makes them (an unembedding, or the tied embedding table)."""
  h_Bx1xD = model.final_norm(x_Bx1xD)
  unembed = getattr(model, "unembed", None)
  logits = (model.embed.attend if unembed is None else unembed)(h_Bx1xD)
  return logits[:, 0].astype(jnp.float32)


def _attend_row(attn, x_BxD, k_BxSxHxK, v_BxSxHxK, table_PxHxK, pos_idx_S, mask_Bx1xS, dt):
  """One query row per sequence against S keys: content + relative-position logits, where key s
  reads the position logit of table row pos_idx_S[s] (its distance to the query)."""
  q_BxHxK = jnp.einsum("bd,dhk->bhk", x_BxD, attn.wq.value.astype(dt))
  q_BxHxK = q_BxHxK * jnp.asarray(attn.head_dim ** -0.5, dt)
  content_BxHxS = jnp.einsum("bhk,bshk->bhs", q_BxHxK + attn.u.value.astype(dt), k_BxSxHxK,
                             preferred_element_type=jnp.float32)
  pos_BxHxP = jnp.einsum("bhk,phk->bhp", q_BxHxK + attn.v.value.astype(dt), table_PxHxK,
                         preferred_element_type=jnp.float32)
  logits_BxHxS = content_BxHxS + jnp.take(pos_BxHxP, pos_idx_S, axis=-1)
  logits_BxHxS = jnp.where(mask_Bx1xS, logits_BxHxS, NEG_INF)
  probs_BxHxS = jax.nn.softmax(logits_BxHxS, axis=-1).astype(dt)
  out_BxHxK = jnp.einsum("bhs,bshk->bhk", probs_BxHxS, v_BxSxHxK)
  return jnp.einsum("bhk,hkd->bd", out_BxHxK, attn.wo.value.astype(dt))
