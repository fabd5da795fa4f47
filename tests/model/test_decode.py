"""Incremental decoding (retro_jax.model.decode) equals the full forward at every position."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.model import SIZES, Retro
from retro_jax.model.decode import DecodeError, Decoder

CFG = SIZES["test"]  # chunk m = 8, k = 2 neighbours of r = 16, CCA at layers 2 and 4
M, N, R = CFG.chunk_size, CFG.num_neighbours, CFG.neighbour_len
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
  m = Retro(CFG, rngs=nnx.Rngs(0))
  m.eval()
  # The Transformer-XL biases u, v start at zero: make them random so their paths are checked.
  rng = np.random.default_rng(0)
  for path, var in nnx.state(m, nnx.Param).flat_state():
    if path[-1] in ("u", "v"):
      var.value = jnp.asarray(rng.normal(size=var.value.shape), var.value.dtype)
  nnx.update(m, nnx.state(m, nnx.Param))
  return m


@pytest.fixture(scope="module")
def decoder(model):
  return Decoder(model, max_len=40)


def _inputs(seed, b, t):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
  nbrs = rng.integers(1, CFG.vocab_size, (b, CFG.num_chunks(t), N, R)).astype(np.int32)
  # Some padding inside neighbours (a short continuation), and one chunk of one sequence with no
  # neighbour at all (CCA must add nothing for the positions that read it).
  nbrs[:, :, 1, R // 2 + 1:] = CFG.pad_id
  nbrs[0, 1] = CFG.pad_id
  return tokens, nbrs


def _decode(decoder, tokens, nbrs, prompt_len, cfg=CFG):
  """Cached logits [B, T, V]: the prompt's from a full forward (prefill returns the last row),
  then one step per token, each chunk's neighbours given at the step that completes it."""
  b, t = tokens.shape
  out = np.zeros((b, t, cfg.vocab_size), np.float32)
  l = cfg.num_chunks(prompt_len)
  logits, state = decoder.prefill(tokens[:, :prompt_len], None if nbrs is None else nbrs[:, :l])
  out[:, prompt_len - 1] = np.asarray(logits)
  for pos in range(prompt_len, t):
    step_nbrs = None
    if nbrs is not None and decoder.completes_chunk(state):
      step_nbrs = nbrs[:, pos // M]
    logits, state = decoder.step(state, tokens[:, pos], step_nbrs)
    out[:, pos] = np.asarray(logits)
  return out, state


# With retrieval every boundary case runs in make test; without, one (the rest: make test-slow).
@pytest.mark.parametrize("t,prompt_len,retrieval", [
    *[(t, p, True) for t, p in ((29, 1), (32, 8), (29, 13), (24, 23))], (29, 13, False),
    *[pytest.param(t, p, False, marks=pytest.mark.slow) for t, p in ((29, 1), (32, 8), (24, 23))]])
def test_cached_logits_equal_full_forward_at_every_position(model, decoder, t, prompt_len,
                                                            retrieval):
  tokens, nbrs = _inputs(t + prompt_len, 2, t)
  if not retrieval:
    nbrs = None
  want = np.asarray(model(jnp.asarray(tokens), None if nbrs is None else jnp.asarray(nbrs)))
  got, state = _decode(decoder, tokens, nbrs, prompt_len)
  assert state.length == t
  err = np.abs(got[:, prompt_len - 1:] - want[:, prompt_len - 1:]).max()
  assert err <= ATOL, err


def test_retrieval_changes_the_cached_logits_from_position_m_minus_1(model, decoder):
  # Guards against a decode that ignores the neighbours (on == off would also pass the test above
  # if the full forward ignored them, which test_retro.py rules out).
  tokens, nbrs = _inputs(1, 1, 20)
  on, _ = _decode(decoder, tokens, nbrs, 1)
  off, _ = _decode(decoder, tokens, None, 1)
  np.testing.assert_allclose(on[:, :M - 1], off[:, :M - 1], atol=ATOL)
  assert np.abs(on[:, M - 1] - off[:, M - 1]).max() > 1e-3


def test_step_uses_only_the_completed_chunks_neighbours(model, decoder):
  # Neighbours for chunk u change logits only from position (u+1)*m - 1 on.
  tokens, nbrs = _inputs(2, 1, 24)
  base, _ = _decode(decoder, tokens, nbrs, 1)
  changed = nbrs.copy()
  changed[0, 1] = (changed[0, 1] + 5) % CFG.vocab_size + 1
  got, _ = _decode(decoder, tokens, changed, 1)
  np.testing.assert_array_equal(got[0, :2 * M - 1], base[0, :2 * M - 1])
  assert np.abs(got[0, 2 * M - 1] - base[0, 2 * M - 1]).max() > 1e-3


def test_bad_calls_raise_clear_errors(model, decoder):
  tokens, nbrs = _inputs(3, 1, 16)
  _, state = decoder.prefill(tokens[:, :M - 1], nbrs[:, :1])
  with pytest.raises(DecodeError, match="completes chunk 0"):
    decoder.step(state, tokens[:, M - 1])
  _, state = decoder.prefill(tokens[:, :3], nbrs[:, :1])
  with pytest.raises(DecodeError, match="completes no chunk"):
    decoder.step(state, tokens[:, 3], nbrs[:, 0])
  with pytest.raises(DecodeError, match="L=2"):
    decoder.prefill(tokens[:, :9], nbrs[:, :1])
  with pytest.raises(DecodeError, match="max_len"):
    decoder.prefill(np.ones((1, 41), np.int32))
  _, state = decoder.prefill(np.ones((1, 40), np.int32))
  with pytest.raises(DecodeError, match="cache is full"):
    decoder.step(state, np.ones((1,), np.int32))


# A Llama-architecture decoder (rotary positions, grouped-query attention, SwiGLU, tied
# embeddings: SmolLM2's form) with CCA layers and the encoder added, as a retrofit makes it; and
# the same decoder without them (the baseline it was retrofitted from).
LLAMA = dataclasses.replace(CFG, positions="rope", rope_theta=500.0, num_kv_heads=2,
                            ffw_activation="swiglu", tie_embeddings=True)
LLAMA_BASELINE = dataclasses.replace(LLAMA, cca_layers=())


@pytest.mark.parametrize("cfg,retrieval", [(LLAMA, True), (LLAMA, False), (LLAMA_BASELINE, False)],
                         ids=["rope-gqa-retrofit-on", "rope-gqa-retrofit-off", "rope-gqa-baseline"])
def test_rotary_grouped_query_models_decode_equal_to_the_full_forward(cfg, retrieval):
  assert cfg.kv_heads < cfg.num_heads
  model = Retro(cfg, rngs=nnx.Rngs(2))
  model.eval()
  tokens, nbrs = _inputs(5, 2, 27)
  if not retrieval:
    nbrs = None
  want = np.asarray(model(jnp.asarray(tokens), None if nbrs is None else jnp.asarray(nbrs)))
  got, state = _decode(Decoder(model, max_len=32), tokens, nbrs, 10, cfg)
  assert state.length == 27
  err = np.abs(got[:, 9:] - want[:, 9:]).max()
  assert err <= ATOL, err


def test_step_compiles_once_per_kind(model):
  dec = Decoder(model, max_len=32)
  tokens, nbrs = _inputs(4, 1, 32)
  _decode(dec, tokens, nbrs, 2)
  # A plain step and a chunk-completing step, whatever the position.
  assert dec._step._cache_size() == 2
