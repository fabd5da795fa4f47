"""Model behaviour: causality, CCA = naive per-chunk loop, retrieval off, shapes, errors."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.model import SIZES, Retro
from retro_jax.model.attention import sinusoid, skew

CFG = SIZES["test"]  # chunk m = 8, k = 2 neighbours of r = 16, CCA at layers 2 and 4
M, N, R = CFG.chunk_size, CFG.num_neighbours, CFG.neighbour_len


@pytest.fixture(scope="module")
def model():
  m = Retro(CFG, rngs=nnx.Rngs(0))
  m.eval()
  return m


def _inputs(seed, b, t):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
  nbrs = rng.integers(1, CFG.vocab_size, (b, CFG.num_chunks(t), N, R)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(nbrs)


@pytest.mark.parametrize("t", [32, 29])
def test_changing_token_t_changes_no_earlier_logit(model, t):
  tokens, nbrs = _inputs(0, 1, t)
  base = model(tokens, nbrs)
  for pos in (0, 7, 8, 17, t - 1):
    changed = tokens.at[0, pos].set((tokens[0, pos] + 1) % CFG.vocab_size)
    out = model(changed, nbrs)
    np.testing.assert_array_equal(out[0, :pos], base[0, :pos])
    assert not np.allclose(out[0, pos:], base[0, pos:])


@pytest.mark.parametrize("t", [32, 29])
def test_neighbours_of_chunk_u_reach_only_positions_from_u_plus_1_times_m_minus_1(model, t):
  tokens, nbrs = _inputs(1, 1, t)
  base = model(tokens, nbrs)
  for u in range(CFG.num_chunks(t)):
    changed = nbrs.at[0, u].set((nbrs[0, u] + 7) % CFG.vocab_size + 1)
    out = model(tokens, changed)
    first = (u + 1) * M - 1
    np.testing.assert_array_equal(out[0, :min(first, t)], base[0, :min(first, t)])
    if first < t:
      assert np.abs(out[0, first] - base[0, first]).max() > 1e-6


def test_first_chunk_minus_one_tokens_untouched_by_retrieval(model):
  tokens, nbrs = _inputs(2, 2, 24)
  # The first m-1 positions never see any neighbour, so RETRO[ON] = RETRO[OFF] there.
  np.testing.assert_allclose(model(tokens, nbrs)[:, :M - 1], model(tokens)[:, :M - 1],
                             atol=1e-6)


def test_retrieval_off_is_the_plain_decoder_with_the_same_weights(model):
  tokens, _ = _inputs(3, 2, 24)
  baseline = Retro(CFG.baseline(), rngs=nnx.Rngs(0))
  # Copy every decoder weight (the baseline lacks the CCA layers and the encoder).
  full = dict(nnx.state(model, nnx.Param).flat_state())
  base_paths = [path for path, _ in nnx.state(baseline, nnx.Param).flat_state()]
  nnx.update(baseline, nnx.State.from_flat_path([(p, full[p]) for p in base_paths]))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(baseline(tokens)))


def _naive_cca(cca, h_TxD, enc_LxNxRxE, mask_LxNxR):
  """Per-chunk loop written from the paper's text: position p >= m-1 belongs to the attending
  chunk u = (p - (m-1)) // m and attends to all k*r neighbour tokens of chunk u."""
  attn = cca.attention
  t = h_TxD.shape[0]
  out = np.zeros(h_TxD.shape, np.float64)
  for u in range(enc_LxNxRxE.shape[0]):
    start = u * M + M - 1
    if start >= t:
      break
    queries = h_TxD[start:start + M]  # last token of C_u + first m-1 of C_{u+1}
    keys = enc_LxNxRxE[u].reshape(N * R, -1)
    keep = mask_LxNxR[u].reshape(N * R)
    for i in range(queries.shape[0]):
      res = np.zeros(h_TxD.shape[1])
      for h in range(attn.wq.shape[1]):
        q = queries[i] @ np.asarray(attn.wq[:, h]) / np.sqrt(attn.head_dim)
        logits = []
        for j in range(N * R):
          k = keys[j] @ np.asarray(attn.wk[:, h])
          d = i - (j % R) + M - 1  # d(i, i') = i - i' + m - 1
          rel = np.asarray(sinusoid(jnp.array([d]), attn.d_q))[0] @ np.asarray(attn.wr[:, h])
          logit = (q + np.asarray(attn.u[h])) @ k + (q + np.asarray(attn.v[h])) @ rel
          logits.append(logit if keep[j] else -1e30)
        p = np.exp(np.array(logits) - max(logits))
        p /= p.sum()
        vals = keys @ np.asarray(attn.wv[:, h])
        res += (p @ vals) @ np.asarray(attn.wo[h])
      out[start + i] = res
  return out


@pytest.mark.parametrize("t", [24, 21])
def test_batched_cca_equals_naive_per_chunk_loop(model, t):
  cca = model.blocks[1].cca
  rng = np.random.default_rng(4)
  l = CFG.num_chunks(t)
  h = rng.normal(size=(1, t, CFG.d_model)).astype(np.float32)
  enc = rng.normal(size=(1, l, N, R, CFG.enc_d_model)).astype(np.float32)
  mask = rng.random((1, l, N, R)) > 0.2
  got = np.asarray(cca(jnp.asarray(h), jnp.asarray(enc), jnp.asarray(mask)))[0]
  want = _naive_cca(cca, h[0].astype(np.float64), enc[0].astype(np.float64), mask[0])
  assert np.abs(got - want).max() <= 1e-5


def test_skew_equals_explicit_relative_indexing():
  q, s = 5, 7
  x = np.random.default_rng(5).normal(size=(2, q, q + s - 1)).astype(np.float32)
  got = np.asarray(skew(jnp.asarray(x), s))
  for i in range(q):
    for j in range(s):
      assert got[0, i, j] == x[0, i, q - 1 - i + j]


@pytest.mark.slow  # make test-slow (keeps make test within CI's time)
def test_short_sequences_and_lengths_not_multiple_of_m(model):
  for t in (1, 5, M, M + 1, 3 * M - 1):
    tokens, nbrs = _inputs(6, 2, t)
    assert model(tokens, nbrs).shape == (2, t, CFG.vocab_size)


def test_bad_neighbour_shape_and_bad_config_raise(model):
  tokens, nbrs = _inputs(7, 1, 24)
  with pytest.raises(ValueError, match="L=3"):
    model(tokens, nbrs[:, :2])
  with pytest.raises(ValueError, match="cca_layers"):
    CFG.replace(cca_layers=(9,))
  with pytest.raises(ValueError, match="without CCA"):
    Retro(CFG.baseline(), rngs=nnx.Rngs(0))(tokens, nbrs)


@pytest.mark.slow  # make test-slow (keeps make test within CI's time)
def test_bfloat16_compute_is_close_to_float32():
  tokens, nbrs = _inputs(8, 1, 16)
  f32 = Retro(CFG, rngs=nnx.Rngs(0))(tokens, nbrs)
  bf16 = Retro(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))(tokens, nbrs)
  assert bf16.dtype == jnp.float32
  rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
  assert rel < 0.05


@pytest.mark.slow  # make test-slow (keeps make test within CI's time)
def test_query_blocked_self_attention_equals_unblocked(model):
  tokens, nbrs = _inputs(9, 2, 32)
  blocked = Retro(CFG.replace(attention_q_block=8), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(blocked(tokens, nbrs)), np.asarray(model(tokens, nbrs)),
                             atol=2e-5, rtol=1e-5)
  grad = lambda m: nnx.grad(lambda m: m(tokens, nbrs).mean())(m)
  g_blocked, g_full = grad(blocked), grad(model)
  np.testing.assert_allclose(np.asarray(g_blocked.blocks[0].attn.wr.value),
                             np.asarray(g_full.blocks[0].attn.wr.value), atol=1e-6, rtol=1e-4)


# The forms compile slowly on the CPU (relative positions the most): make test-slow.
@pytest.mark.slow
@pytest.mark.parametrize("positions", ["relative", "rope"])
def test_cpu_matmul_forms_compute_the_same_model(positions):
  """The attention's CPU forms (RetroConfig.cpu_matmul_forms) and the plain einsums used for TPU
  compiles give the same logits and the same gradients from the same parameters."""
  import jax
  tokens, nbrs = _inputs(3, 2, 29)

  def loss_and_grads(cpu_forms):
    model = Retro(CFG.replace(positions=positions, cpu_matmul_forms=cpu_forms), rngs=nnx.Rngs(0))
    model.eval()
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens, nbrs)) ** 2)
    return nnx.value_and_grad(loss)(model)

  (loss_cpu, g_cpu), (loss_plain, g_plain) = loss_and_grads(True), loss_and_grads(False)
  np.testing.assert_allclose(loss_cpu, loss_plain, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_cpu), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
