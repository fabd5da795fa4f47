"""A Llama-architecture decoder as a RetroConfig (rotary self-attention, grouped-query heads,
SwiGLU, tied embeddings), with CCA layers added for a retrofit: causality, q-blocking, retrieval
off = the baseline, logical axes on every parameter."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.model import SIZES, Retro
from retro_jax.model.partitioning import logical_to_mesh

LLAMA = SIZES["test"].replace(
    positions="rope", rope_theta=100000.0, num_kv_heads=2, ffw_activation="swiglu",
    tie_embeddings=True, norm_eps=1e-5, cca_layers=(2, 4))  # 4 heads share 2 key/value heads
N, R = LLAMA.num_neighbours, LLAMA.neighbour_len


@pytest.fixture(scope="module")
def model():
  return Retro(LLAMA, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, nbrs):
  return model(tokens, nbrs)


def _inputs(seed, b, t):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, LLAMA.vocab_size, (b, t)).astype(np.int32)
  nbrs = rng.integers(1, LLAMA.vocab_size, (b, LLAMA.num_chunks(t), N, R)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(nbrs)


def test_parameters_llama_decoder_relative_cca(model):
  attn, cca = model.blocks[1].attn, model.blocks[1].cca.attention
  assert attn.wk.shape == (64, 2, 16) and attn.wq.shape == (64, 4, 16)
  assert not hasattr(attn, "wr") and not hasattr(attn, "u")  # rotary: no relative terms
  assert hasattr(cca, "wr") and cca.positions == "relative"  # CCA keeps relative positions
  assert model.encoder.blocks[0].self_attention.positions == "relative"
  assert hasattr(model.blocks[0].ffw, "w_gate") and not hasattr(model.encoder.blocks[0].ffw, "w_gate")
  assert model.unembed is None
  for path, var in nnx.state(model, nnx.Param).flat_state():
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.shape), path
    logical_to_mesh(axes)  # every name has a rule, no collision


def test_causal_with_and_without_retrieval(model):
  t = 29  # not a multiple of the chunk size
  tokens, nbrs = _inputs(0, 1, t)
  for n in (nbrs, None):
    base = _forward(model, tokens, n)
    for pos in (7, t - 1):
      changed = tokens.at[0, pos].set((tokens[0, pos] + 1) % LLAMA.vocab_size)
      out = _forward(model, changed, n)
      np.testing.assert_array_equal(out[0, :pos], base[0, :pos])
      assert not np.allclose(out[0, pos:], base[0, pos:])


def test_query_blocks_equal_full_attention(model):
  tokens, nbrs = _inputs(1, 2, 32)
  blocked = nnx.clone(model)
  for block in blocked.blocks:
    block.q_block = 8  # what attention_q_block=8 sets: rotary offsets per query block
  np.testing.assert_allclose(_forward(blocked, tokens, nbrs), _forward(model, tokens, nbrs),
                             atol=2e-5, rtol=2e-5)


def test_rotary_scores_depend_on_the_distance_only():
  from retro_jax.model.attention import rope
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  dots = [float((rope(q, jnp.array([p + 5]), 1e5) * rope(k, jnp.array([p]), 1e5)).sum())
          for p in (0, 3, 100)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


def test_retrieval_off_equals_the_baseline_with_the_same_weights(model):
  tokens, _ = _inputs(3, 2, 24)
  baseline = Retro(LLAMA.baseline(), rngs=nnx.Rngs(1))
  full = dict(nnx.state(model, nnx.Param).flat_state())
  base_paths = [path for path, _ in nnx.state(baseline, nnx.Param).flat_state()]
  nnx.update(baseline, nnx.State.from_flat_path([(p, full[p]) for p in base_paths]))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(baseline(tokens)))


def test_bad_llama_configs_are_refused():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LLAMA.replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="positions"):
    LLAMA.replace(positions="alibi")
  with pytest.raises(ValueError, match="ffw_activation"):
    LLAMA.replace(ffw_activation="relu")
