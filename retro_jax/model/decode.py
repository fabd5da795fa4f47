"""Incremental decoding for `Retro`: each new token costs O(T) instead of a full O(T^2) recompute.

    dec = Decoder(model, max_len=1024)
    logits_BxV, state = dec.prefill(prompt_BxP, neighbours_BxLxNxR)  # L = ceil(P / m)
    for ...:
      nbrs_BxNxR = retrieve(...) if dec.completes_chunk(state) else None
      logits_BxV, state = dec.step(state, token_B, nbrs_BxNxR)

The attention modules keep their own caches (`Attention.init_cache` / `extend`,
`ChunkedCrossAttention.slot` / `extend`); this file holds only the cache state and the loop over
the blocks. What is cached, and why it is exact:

  * Self-attention: every position's keys and values (rotary keys rotated at their position; with
    grouped-query attention, the key/value heads only). Relative positions read phi(d) Wr from a
    table made once at prefill, d = 0..max_len-1.
  * Chunked cross-attention (Listing 1): position t >= m-1 belongs to the attending chunk
    u = (t - (m-1)) // m, the LAST COMPLETED chunk, so the cache holds just that chunk's encoded
    neighbours' keys and values per CCA layer (the "slot"). Before any chunk has completed
    (t < m-1) the slot is empty and CCA adds zero, as the full forward does for the first m-1
    tokens.
  * The encoder: E_u depends only on Ret(C_u) and H_u, the decoder states of chunk u at the first
    CCA layer (after its self-attention). `step` stores each position's H in an m-slot buffer; the
    step whose token completes chunk u (t = (u+1)*m - 1, `completes_chunk`) must be given
    Ret(C_u): it runs the encoder once on them with the full H_u, right after the first CCA
    layer's self-attention, and refills the slots, which that same token already reads.
With `neighbours=None` at prefill the whole sequence decodes without retrieval (RETRO[OFF]).

On a mesh (`Decoder(model, max_len, mesh=mesh)`) the weights take the training layout
(`placement.place`), the prompt, tokens and neighbours are split over the batch axes, and every
cache buffer is sharded too (`placement.cache_shardings`: batch over the batch axes, heads over
"model"); a dimension that does not divide (a single prompt over data-parallel devices) is
replicated. `lower_prefill` / `lower_step` lower the same jitted functions from abstract
arguments, for ahead-of-time compiles (training/aot.py).

All buffers have a fixed size (max_len rounded up to a multiple of m; batch fixed at prefill), so
`step` compiles twice (a plain step and a chunk-completing step) and then runs for every position;
`prefill` compiles once per prompt length rounded up to m. Cache buffers are donated to each step.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from retro_jax.model import placement


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
    return self.arrays["self"][0]["k"].shape[0]


class Decoder:
  """Jitted prefill / step over fixed-size cache buffers, reading the weights of a `Retro`.

  The weights are captured (split) at construction; after changing the model, build a new Decoder.
  `mesh`: decode sharded over it (see the module docstring); None: where the weights are. `model`
  may be abstract (nnx.eval_shape) for lowering only.
  """

  def __init__(self, model, max_len: int, mesh: Mesh | None = None):
    cfg = model.config
    self.config = cfg
    m = cfg.chunk_size
    self.max_len = -(-int(max_len) // m) * m
    if self.max_len < 1:
      raise DecodeError(f"max_len={max_len} must be >= 1")
    self.dtype = jnp.dtype(cfg.dtype)
    self.graphdef, params = nnx.split(model)
    self.mesh, self.rules = mesh, cfg.sharding_rules
    self.params = params if mesh is None else placement.place(params, mesh, self.rules)
    self.cca_layer_idx = [p - 1 for p in cfg.cca_layers]  # 0-indexed decoder blocks with CCA
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("retrieval",))
    self._step = jax.jit(self._step_fn, static_argnames=("retrieval", "completes"),
                         donate_argnums=(1,))

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
    with self._on_mesh():
      arrays, logits_BxV = self._prefill(self.params, self._put(tokens_BxP),
                                         self._put(neighbours_BxLxNxR), jnp.int32(p),
                                         retrieval=retrieval)
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
    with self._on_mesh():
      arrays, logits_BxV = self._step(self.params, state.arrays, self._put(tokens_B),
                                      self._put(neighbours_BxNxR), jnp.int32(state.length),
                                      retrieval=state.retrieval, completes=completes)
    state.arrays = None  # donated
    return logits_BxV, DecodeState(arrays=arrays, length=state.length + 1,
                                   retrieval=state.retrieval)

  # --------------------------------------------------------------------------------------------
  # Ahead-of-time lowering (abstract arguments with their shardings; nothing runs).

  def _abstract(self, shape, dtype=jnp.int32):
    sharding = None
    if self.mesh is not None:
      sharding = (placement.batch_sharding(self.mesh, shape, self.rules) if shape else
                  placement.replicated(self.mesh))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def _abstract_prefill_args(self, batch: int, prompt_len: int, retrieval: bool):
    cfg = self.config
    num_l = cfg.num_chunks(prompt_len)
    tokens = self._abstract((batch, num_l * cfg.chunk_size))
    nbrs = self._abstract((batch, num_l, cfg.num_neighbours, cfg.neighbour_len)) \
        if retrieval else None
    return tokens, nbrs, self._abstract(())

  def lower_prefill(self, batch: int, prompt_len: int, retrieval: bool = True):
    """The prefill of `batch` prompts of `prompt_len` tokens, lowered."""
    with self._on_mesh():
      return self._prefill.lower(self.params, *self._abstract_prefill_args(
          batch, prompt_len, retrieval), retrieval=retrieval)

  def abstract_cache(self, batch: int, retrieval: bool = True):
    """The cache's ShapeDtypeStructs (with their shardings on a mesh) for `batch` sequences."""
    with self._on_mesh():
      arrays, _ = jax.eval_shape(
          lambda *a: self._prefill_fn(*a, retrieval=retrieval), self.params,
          *self._abstract_prefill_args(batch, self.config.chunk_size, retrieval))
    if self.mesh is None:
      return arrays
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        arrays, placement.cache_shardings(arrays, self.mesh, self.rules))

  def lower_step(self, batch: int, retrieval: bool = True, completes: bool = True):
    """One decode step of `batch` sequences over a full-size cache, lowered; `completes`: the
    chunk-completing step, which also encodes the chunk's neighbours (the larger program)."""
    cfg = self.config
    nbrs = self._abstract((batch, cfg.num_neighbours, cfg.neighbour_len)) \
        if retrieval and completes else None
    with self._on_mesh():
      return self._step.lower(self.params, self.abstract_cache(batch, retrieval),
                              self._abstract((batch,)), nbrs, self._abstract(()),
                              retrieval=retrieval, completes=retrieval and completes)

  # --------------------------------------------------------------------------------------------
  # Placement on the mesh.

  def _on_mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _put(self, x):
    """A batch-leading input split over the batch axes (None stays None)."""
    if x is None or self.mesh is None:
      return x
    return jax.device_put(x, placement.batch_sharding(self.mesh, x.shape, self.rules))

  def _placed(self, arrays, logits_BxV):
    """The cache and logits constrained to their shardings (inside the jitted bodies)."""
    if self.mesh is None:
      return arrays, logits_BxV
    arrays = jax.lax.with_sharding_constraint(
        arrays, placement.cache_shardings(arrays, self.mesh, self.rules))
    return arrays, jax.lax.with_sharding_constraint(
        logits_BxV, placement.batch_sharding(self.mesh, logits_BxV.shape, self.rules))

  # --------------------------------------------------------------------------------------------
  # Jitted bodies.

  def _prefill_fn(self, params, tokens_BxT, neighbours_BxLxNxR, length, *, retrieval):
    model = nnx.merge(self.graphdef, params)
    cfg, dt, m = self.config, self.dtype, self.config.chunk_size
    b = tokens_BxT.shape[0]
    caches = [block.attn.init_cache(b, self.max_len, dt) for block in model.blocks]
    x_BxTxD = model.embed(tokens_BxT, dt)
    enc = enc_mask = chunk_h_BxMxD = None
    for p, block in enumerate(model.blocks):
      x_BxTxD, caches[p] = block.decode_self_attention(x_BxTxD, caches[p], 0)
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
    arrays = {"self": caches}
    if retrieval:
      # The slots: E_u of the last completed chunk u = length // m - 1 (empty if none).
      u = jnp.maximum(length // m - 1, 0)
      enc_BxNxRxE = jax.lax.dynamic_index_in_dim(enc, u, axis=1, keepdims=False)
      mask_BxNxR = jax.lax.dynamic_index_in_dim(enc_mask, u, axis=1, keepdims=False)
      arrays["cca"] = self._slots(model, enc_BxNxRxE, mask_BxNxR & (length >= m))
      arrays["chunk_h"] = chunk_h_BxMxD
    return self._placed(arrays, model.logits(last_Bx1xD)[:, 0])

  def _slots(self, model, enc_BxNxRxE, mask_BxNxR) -> list[dict]:
    return [model.blocks[i].cca.slot(enc_BxNxRxE, mask_BxNxR) for i in self.cca_layer_idx]

  def _step_fn(self, params, arrays, tokens_B, neighbours_BxNxR, t, *, retrieval, completes):
    model = nnx.merge(self.graphdef, params)
    cfg, dt, m = self.config, self.dtype, self.config.chunk_size
    arrays = dict(arrays, self=list(arrays["self"]))
    first_cca = self.cca_layer_idx[0] if self.cca_layer_idx else None
    x_Bx1xD = model.embed(tokens_B[:, None], dt)
    c = 0
    for p, block in enumerate(model.blocks):
      x_Bx1xD, arrays["self"][p] = block.decode_self_attention(x_Bx1xD, arrays["self"][p], t)
      if retrieval and p == first_cca:
        arrays["chunk_h"] = jax.lax.dynamic_update_slice_in_dim(arrays["chunk_h"], x_Bx1xD,
                                                                t % m, axis=1)
        if completes:  # the chunk is complete: encode its neighbours with the full H_u
          mask_BxNxR = neighbours_BxNxR != cfg.pad_id
          enc = model.encoder(model.embed(neighbours_BxNxR[:, None], dt), mask_BxNxR[:, None],
                              arrays["chunk_h"])
          arrays["cca"] = self._slots(model, enc[:, 0], mask_BxNxR)
      slot = None
      if retrieval and block.cca is not None:
        slot, c = arrays["cca"][c], c + 1
      x_Bx1xD = block.decode_cross_attention_and_ffw(x_Bx1xD, slot, t)
    return self._placed(arrays, model.logits(x_Bx1xD)[:, 0])
