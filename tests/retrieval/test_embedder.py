"""The JAX all-MiniLM-L6-v2 embedder against PyTorch sentence-transformers goldens, and the embed stage."""
import hashlib
import json
import pathlib

import numpy as np
import pytest

from retro_jax.retrieval import bert
from retro_jax.retrieval import embed as embed_lib
from retro_jax.retrieval.embedder import Embedder, EmbedderMismatchError

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "goldens" / "minilm_golden.npz"


@pytest.fixture(scope="module")
def golden():
  g = np.load(GOLDEN)
  return [str(t) for t in g["texts"]], g["embeddings"], int(g["max_length"])


@pytest.fixture(scope="module")
def fp32(golden):
  return Embedder.load(max_length=golden[2], dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def bf16(golden):
  return Embedder.load(max_length=golden[2], dtype="bfloat16", batch_size=8)


def _rel_err(x, ref):
  return np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)


def test_golden_has_truncated_and_empty_texts(golden, fp32):
  texts, ref, max_length = golden
  lengths = [len(ids) for ids in fp32.tokenize(texts)]
  assert max(lengths) == max_length and lengths.count(max_length) >= 2  # truncation exercised
  assert "" in texts and ref.shape == (len(texts), 384)


def test_fp32_matches_sentence_transformers(golden, fp32):
  texts, ref, _ = golden
  emb = fp32.embed(texts)
  assert emb.dtype == np.float32 and emb.shape == ref.shape
  assert _rel_err(emb, ref).max() <= 1e-4
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_bf16_cosine_to_golden(golden, bf16):
  texts, ref, _ = golden
  emb = bf16.embed(texts)
  assert emb.dtype == np.float32
  cos = np.sum(emb * ref, axis=1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
  assert cos.min() >= 0.9999, cos.min()
  assert _rel_err(emb, ref).max() > 1e-6  # really computed in bf16, not silently fp32


def test_bucketing_and_order(golden, fp32):
  texts, ref, _ = golden
  bucketed = fp32.embed(texts, bucketed=True)
  unbucketed = fp32.embed(texts, bucketed=False)
  np.testing.assert_allclose(bucketed, unbucketed, atol=2e-6)
  perm = np.random.default_rng(0).permutation(len(texts))
  np.testing.assert_allclose(fp32.embed([texts[i] for i in perm]), bucketed[perm], atol=2e-6)
  assert not np.allclose(bucketed[perm], bucketed)  # the permutation does move rows


def test_token_budget_batches(golden, fp32):
  texts, ref, max_length = golden
  budget = Embedder.load(max_length=max_length, dtype="float32", tokens_per_batch=256)
  calls = list(budget._batches(np.array([len(x) for x in budget.tokenize(texts)]),
                               np.argsort([len(x) for x in budget.tokenize(texts)], kind="stable"), True))
  assert len({t for _, t in calls}) > 1 and max(len(i) for i, _ in calls) > min(len(i) for i, _ in calls)
  assert sorted(np.concatenate([i for i, _ in calls]).tolist()) == list(range(len(texts)))
  np.testing.assert_allclose(budget.embed(texts), fp32.embed(texts), atol=2e-6)


def test_empty_inputs(fp32, golden):
  assert fp32.embed([]).shape == (0, 384)
  emb = fp32.embed(["", "", "x"])
  assert np.isfinite(emb).all()
  np.testing.assert_array_equal(emb[0], emb[1])
  texts, ref, _ = golden
  assert _rel_err(emb[:1], ref[texts.index("")][None])[0] <= 1e-4
  with pytest.raises(TypeError):
    fp32.embed("not a list")


def test_fingerprint(fp32, bf16):
  weights = bert.default_model_dir() / bert.WEIGHTS_FILE
  assert fp32.fingerprint == hashlib.sha256(weights.read_bytes()).hexdigest()
  assert fp32.dim == 384
  fp32.check_info(fp32.info)
  with pytest.raises(EmbedderMismatchError, match="fingerprint"):
    fp32.check_info({**fp32.info, "fingerprint": "0" * 64})
  with pytest.raises(EmbedderMismatchError, match="dtype"):
    fp32.check_info(bf16.info)


def _batches(texts, first_id, batch, fail_after=None):
  for n, s in enumerate(range(0, len(texts), batch)):
    if fail_after is not None and n == fail_after:
      raise KeyboardInterrupt("simulated kill")
    yield np.arange(first_id + s, first_id + min(s + batch, len(texts)), dtype=np.int64), texts[s:s + batch]


def test_embed_to_npy_resumes_byte_identical(tmp_path, golden, fp32, bf16):
  texts = golden[0] * 2  # 64 rows
  ref_path, path = tmp_path / "ref" / "shard-00000.npy", tmp_path / "run" / "shard-00000.npy"
  stats = embed_lib.embed_to_npy(fp32, _batches(texts, 100, 10), ref_path, len(texts), first_id=100,
                                 block_rows=16)
  assert stats["rows"] == len(texts)
  with pytest.raises(KeyboardInterrupt):  # killed after 3 batches = 30 rows = one finished block
    embed_lib.embed_to_npy(fp32, _batches(texts, 100, 10, fail_after=3), path, len(texts),
                           first_id=100, block_rows=16)
  progress = json.loads(path.with_suffix(".progress.json").read_text())
  assert progress["rows_done"] == 16 and not progress["done"]
  stats = embed_lib.embed_to_npy(fp32, _batches(texts, 100, 10), path, len(texts), first_id=100,
                                 block_rows=16)
  assert stats["rows"] == len(texts) - 16
  assert path.read_bytes() == ref_path.read_bytes()
  np.testing.assert_allclose(np.load(path, mmap_mode="r"), fp32.embed(texts), atol=2e-6)
  assert embed_lib.embed_to_npy(fp32, _batches(texts, 100, 10), path, len(texts), first_id=100,
                                block_rows=16)["skipped"]
  with pytest.raises(EmbedderMismatchError):  # a done shard made by another embedder is refused
    embed_lib.embed_to_npy(bf16, _batches(texts, 100, 10), path, len(texts), first_id=100, block_rows=16)


def test_embed_to_npy_rejects_misaligned_ids(tmp_path, fp32):
  bad = iter([(np.array([0, 2], np.int64), ["a", "b"])])
  with pytest.raises(ValueError, match="contiguous"):
    embed_lib.embed_to_npy(fp32, bad, tmp_path / "shard-00000.npy", 2, block_rows=16)


def test_embedder_info_file(tmp_path, fp32, bf16):
  embed_lib.check_or_write_info(fp32, tmp_path)
  embed_lib.check_or_write_info(fp32, tmp_path)
  with pytest.raises(EmbedderMismatchError, match="embedder.json"):
    embed_lib.check_or_write_info(bf16, tmp_path)
