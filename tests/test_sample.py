"""Sampling with retrieval (retro_jax.sampling.generate, retro_jax.sampling.sample) on a tiny real database."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

from retro_jax.model import SIZES, Retro  # noqa: E402
from retro_jax.sampling import generate as gen  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 109 tokens with the tiny database's SentencePiece vocabulary (fixed corpus): one complete
# 64-token chunk and a partial one.
PROMPT = ("The page cache keeps file data in memory so that reads and writes of recently used "
          "pages do not have to go to the disk. When memory runs low, the kernel reclaims pages "
          "from the inactive list first, writing dirty ones back to their backing store.")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def retrieval(db):
  return gen.DatabaseRetrieval.from_db(str(db), num_neighbours=2, neighbour_len=128)


@pytest.fixture(scope="module")
def model_and_config(retrieval):
  m = retrieval.store.chunk_size
  config = SIZES["test"].replace(vocab_size=retrieval.tokenizer.vocab_size, chunk_size=m,
                                       neighbour_len=2 * m)
  model = Retro(config, rngs=nnx.Rngs(0))
  model.eval()
  return model, config


def _full_forward_argmax(model, config, ids, retrievals):
  """argmax of model(ids[:-1], neighbours) at every position: the neighbours of chunk u are the
  ones retrieved for it (pad where a chunk was never completed)."""
  t = len(ids) - 1
  nbrs = None
  if retrievals is not None:
    nbrs = np.full((1, config.num_chunks(t), config.num_neighbours, config.neighbour_len),
                   config.pad_id, np.int32)
    for r in retrievals:
      if r.chunk_index < nbrs.shape[1]:
        nbrs[0, r.chunk_index] = r.neighbours
  logits = model(jnp.asarray([ids[:-1]], jnp.int32), None if nbrs is None else jnp.asarray(nbrs))
  return np.asarray(jnp.argmax(logits[0], axis=-1))


def test_greedy_generation_retrieves_the_last_complete_chunk_at_every_boundary(
    model_and_config, retrieval):
  model, config = model_and_config
  m = config.chunk_size
  prompt_ids = retrieval.tokenizer.encode(PROMPT)
  assert m < len(prompt_ids) < 2 * m  # one complete prompt chunk, then a partial one
  queries = []

  def recording(chunk_ids):
    queries.append(np.array(chunk_ids))
    return retrieval(chunk_ids)

  retrieval.history.clear()
  out = gen.generate(model, config, prompt_ids, recording, max_new_tokens=3 * m - len(prompt_ids) + 5,
                     temperature=0.0)
  ids = out.ids
  # Chunks 0 (prompt), 1 and 2 (generated) completed; chunk 3 has 4 of its tokens.
  assert len(ids) == 3 * m + 5
  assert [r.chunk_index for r in out.retrievals] == [0, 1, 2]
  for u, q in enumerate(queries):
    np.testing.assert_array_equal(q, ids[u * m:(u + 1) * m])
  # The text that was embedded and searched is the query chunk's, and what the model received is
  # each found chunk with its continuation from the store.
  for r, (text, chunks) in zip(out.retrievals, retrieval.history):
    assert text == retrieval.tokenizer.decode(ids[r.chunk_index * m:(r.chunk_index + 1) * m])
    want_ids, _ = retrieval.searcher.search(retrieval.embedder.embed([text]), 2)
    assert [c.chunk_id for c in chunks] == [int(i) for i in want_ids[0] if i >= 0]
    np.testing.assert_array_equal(
        r.neighbours, retrieval.store.neighbour_tokens(want_ids[0], config.neighbour_len))
    for c in chunks:
      assert c.doc_key == retrieval.store.doc_key(c.doc_id) and c.text
  # Temperature 0 = greedy = the argmax of the full forward with those neighbours.
  argmax = _full_forward_argmax(model, config, ids, out.retrievals)
  np.testing.assert_array_equal(np.asarray(out.new_ids), argmax[len(prompt_ids) - 1:])


def test_retrieval_off_is_greedy_without_neighbours(model_and_config, retrieval):
  model, config = model_and_config
  prompt_ids = retrieval.tokenizer.encode(PROMPT)
  out = gen.generate(model, config, prompt_ids, None, max_new_tokens=70, temperature=0.0)
  assert out.retrievals == []
  argmax = _full_forward_argmax(model, config, out.ids, None)
  np.testing.assert_array_equal(np.asarray(out.new_ids), argmax[len(prompt_ids) - 1:])


@pytest.mark.parametrize("retrieve", [True, False])
def test_full_recompute_decodes_the_same_greedy_tokens(model_and_config, retrieval, retrieve):
  """`FullRecompute` (the full forward at every step) = the cached decoder."""
  model, config = model_and_config
  prompt_ids = retrieval.tokenizer.encode(PROMPT)
  fn = retrieval if retrieve else None
  n = 2 * config.chunk_size - len(prompt_ids) + 3  # crosses a chunk boundary
  cached = gen.generate(model, config, prompt_ids, fn, max_new_tokens=n, temperature=0.0).new_ids
  full = gen.FullRecompute(model, config).generate(prompt_ids, fn, n)["new_ids"]
  assert full == cached


def test_nucleus_keeps_the_smallest_set_reaching_top_p_and_tempers():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None]
  kept = np.asarray(gen.nucleus_logits(logits, 1.0, 0.7))[0]
  assert np.isfinite(kept[:2]).all() and np.isneginf(kept[2:]).all()
  assert np.isfinite(np.asarray(gen.nucleus_logits(logits, 1.0, 1.0))).all()
  assert np.isfinite(np.asarray(gen.nucleus_logits(logits, 1.0, 1e-9))[0]).sum() == 1

  def freqs(temperature, top_p, n=4000):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = jax.vmap(lambda k: gen.sample_tokens(logits, k, temperature, top_p, greedy=False))(keys)
    return np.bincount(np.asarray(draws).ravel(), minlength=4) / n

  np.testing.assert_allclose(freqs(1.0, 0.7), [0.625, 0.375, 0, 0], atol=0.03)
  tempered = probs ** 0.5 / (probs ** 0.5).sum()  # temperature 2 flattens
  np.testing.assert_allclose(freqs(2.0, 1.0), tempered, atol=0.03)
  assert freqs(0.01, 1.0)[0] == 1.0  # a low temperature is nearly greedy


def test_sampling_seeds_and_a_tiny_nucleus(model_and_config, retrieval):
  model, config = model_and_config
  prompt_ids = retrieval.tokenizer.encode(PROMPT)[:20]
  kw = dict(max_new_tokens=12)
  greedy = gen.generate(model, config, prompt_ids, None, temperature=0.0, **kw).new_ids
  # A nucleus holding only the top token is greedy at any temperature.
  assert gen.generate(model, config, prompt_ids, None, temperature=1.5, top_p=1e-6,
                      **kw).new_ids == greedy
  a = gen.generate(model, config, prompt_ids, None, temperature=1.0, seed=1, **kw).new_ids
  assert gen.generate(model, config, prompt_ids, None, temperature=1.0, seed=1, **kw).new_ids == a
  assert gen.generate(model, config, prompt_ids, None, temperature=1.0, seed=2, **kw).new_ids != a


def test_bad_arguments_raise(model_and_config, retrieval):
  model, config = model_and_config
  with pytest.raises(gen.GenerateError, match="empty prompt"):
    gen.generate(model, config, [], None)
  with pytest.raises(gen.GenerateError, match="K=2"):
    gen.generate(model, config, list(range(1, 70)), lambda q: np.zeros((3, 128), np.int32),
                 max_new_tokens=2)
  with pytest.raises(gen.GenerateError, match="chunk size 8"):
    retrieval.check_model(SIZES["test"])


def _write_checkpoint(workdir, model, config, db):
  from retro_jax.training import checkpoint as ckpt
  mngr = ckpt.manager(workdir / ckpt.CHECKPOINTS, async_save=False)
  meta = {"model_config": config.to_dict(), "db": str(db), "step": 7}
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  ckpt.save(mngr, 7, nnx.state((model, optimizer)), None, meta)
  mngr.wait_until_finished()


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "retro_jax.sample", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_from_a_checkpoint_shows_neighbours_and_matches_the_library(
    model_and_config, retrieval, db, tmp_path):
  model, config = model_and_config
  _write_checkpoint(tmp_path, model, config, db)
  proc = _cli(f"--workdir={tmp_path}", f"--prompt={PROMPT}", "--max_new_tokens=70",
              "--temperature=0", "--retrieval=on", "--show_neighbours", "--stop_at_eos=false")
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout
  assert "retrieval on, 70 tokens" in text
  prompt_ids = retrieval.tokenizer.encode(PROMPT)
  want = gen.generate(model, config, prompt_ids, retrieval, max_new_tokens=70, temperature=0.0)
  assert retrieval.tokenizer.decode_fragment(want.new_ids) in text
  # Every completed chunk (chunk 0 in the prompt, the others generated; the last sampled token is
  # never fed) with its 2 neighbours and their documents.
  bounds = (len(prompt_ids) + 70 - 1) // 64
  assert bounds >= 2 and len(want.retrievals) == bounds
  section = text.split("=== neighbours ===")[1]
  assert "chunk 0 (tokens 0-63)" in section and "chunk 1 (tokens 64-127)" in section
  keys = {c.doc_key for _, chunks in retrieval.history[-bounds:] for c in chunks}
  assert all(repr(k) in section for k in keys)
  assert section.count("  [1] score") == bounds and section.count("  [2] score") == bounds

  off = _cli(f"--workdir={tmp_path}", f"--prompt={PROMPT}", "--max_new_tokens=10",
             "--temperature=0", "--retrieval=off", "--show_neighbours")
  assert off.returncode == 0, off.stderr
  assert "retrieval off" in off.stdout and "=== neighbours ===" not in off.stdout

  both = _cli(f"--workdir={tmp_path}", f"--prompt={PROMPT}", "--max_new_tokens=10",
              "--temperature=0")  # --retrieval=all: on, then off, from the same seed
  assert both.returncode == 0, both.stderr
  on_at, off_at = (both.stdout.index(f"retrieval {m}, 10 tokens") for m in ("on", "off"))
  assert on_at < off_at and both.stdout.count("=== prompt ===") == 1


def test_cli_explains_missing_model():
  proc = _cli("--prompt=hello")
  assert proc.returncode == 2 and "--workdir" in proc.stderr
