"""RetroConfig and SIZES, the one registry of named model sizes (the paper's among them)."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal


@dataclasses.dataclass(frozen=True)
class RetroConfig:
  """Hyper-parameters of a RETRO decoder with its neighbour encoder.

  Shape letters used through the model: B batch, T sequence, D d_model, H heads, K head size,
  F feed-forward, V vocabulary, M chunk size, L chunks (ceil(T / M)), N neighbours per chunk,
  R neighbour length (chunk + continuation), E encoder width.
  """

  vocab_size: int
  d_model: int
  num_heads: int
  num_layers: int
  ffw_size: int
  cca_layers: tuple[int, ...]  # 1-indexed decoder layers that carry chunked cross-attention.
  chunk_size: int = 64
  num_neighbours: int = 2
  neighbour_len: int = 128
  encoder_layers: int = 2
  encoder_d_model: int = 896
  encoder_num_heads: int = 0  # 0: encoder_d_model // head_size.
  encoder_ffw_size: int = 0  # 0: 4 * encoder_d_model.
  head_size: int = 0  # 0: d_model // num_heads.
  pad_id: int = 0
  norm_eps: float = 1e-6
  dtype: Literal["float32", "bfloat16"] = "float32"  # activations / matmul inputs.
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  remat: bool = False  # jax.checkpoint each decoder block (pod-scale memory).
  attention_q_block: int = 0  # >0: self-attention in query blocks of this size (O(block*T) memory).
  # The attention's matmuls in the forms XLA:CPU runs fastest (retro_jax.model.cpu_forms); None:
  # when jax's default backend is the CPU. They cost memory on TPU, so TPU compiles pass False.
  cpu_matmul_forms: bool | None = None
  # Llama-architecture decoders (a pretrained baseline to retrofit, e.g. SmolLM2). The defaults are
  # the paper's decoder; CCA and the neighbour encoder always use relative positions and GELU.
  positions: Literal["relative", "rope"] = "relative"  # decoder self-attention only.
  rope_theta: float = 10000.0  # RoPE base (positions="rope").
  num_kv_heads: int = 0  # 0: num_heads; fewer: grouped-query decoder self-attention.
  ffw_activation: Literal["gelu", "swiglu"] = "gelu"  # decoder feed-forward.
  tie_embeddings: bool = False  # True: logits against the token embedding table (no unembed).
  # Not a model hyper-parameter: which mesh axes the logical axes map to (see partitioning.py).
  sharding_rules: str = "fsdp"

  def __post_init__(self):
    if self.d_model % self.num_heads and not self.head_size:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    bad = [p for p in self.cca_layers if not 1 <= p <= self.num_layers]
    if bad:
      raise ValueError(f"cca_layers {bad} outside 1..num_layers={self.num_layers}")
    if tuple(sorted(set(self.cca_layers))) != tuple(self.cca_layers):
      raise ValueError(f"cca_layers must be strictly increasing, got {self.cca_layers}")
    if self.neighbour_len < self.chunk_size:
      raise ValueError("neighbour_len must hold at least one chunk")
    if self.cca_layers and self.encoder_layers < 1:
      raise ValueError("a model with CCA layers needs at least one encoder layer")
    if self.enc_d_model % self.enc_heads:
      raise ValueError("encoder_d_model is not divisible by the encoder's heads")
    if self.positions not in ("relative", "rope"):
      raise ValueError(f"positions must be 'relative' or 'rope', got {self.positions!r}")
    if self.ffw_activation not in ("gelu", "swiglu"):
      raise ValueError(f"ffw_activation must be 'gelu' or 'swiglu', got {self.ffw_activation!r}")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")

  @property
  def head_dim(self) -> int:
    return self.head_size or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def enc_d_model(self) -> int:
    return self.encoder_d_model

  @property
  def enc_heads(self) -> int:
    return self.encoder_num_heads or max(1, self.encoder_d_model // self.head_dim)

  @property
  def enc_ffw(self) -> int:
    return self.encoder_ffw_size or 4 * self.encoder_d_model

  @property
  def retrieval(self) -> bool:
    return bool(self.cca_layers)

  def num_chunks(self, seq_len: int) -> int:
    return math.ceil(seq_len / self.chunk_size)

  @classmethod
  def from_dict(cls, d: dict) -> "RetroConfig":
    """From a dict of fields (a checkpoint's config, an experiment's overrides applied); unknown
    fields are an error, lists become tuples."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{sorted(unknown)} are not RetroConfig fields")
    d = dict(d)
    if "cca_layers" in d:
      d["cca_layers"] = tuple(d["cca_layers"])
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> "RetroConfig":
    return dataclasses.replace(self, **kw)

  def baseline(self) -> "RetroConfig":
    """The same decoder without retrieval (no CCA, no encoder)."""
    return self.replace(cca_layers=())

  # ---- analytic FLOPs (Levanter style: flops_per_token feeds MFU) ----
  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per decoder token: 3 x forward (backward = 2 x forward).

    Forward = 2 x (matmul weights applied per token) + attention logits/values/position logits,
    for the decoder, the CCA layers and the neighbour encoder (which runs on N*R tokens per chunk,
    i.e. N*R/M tokens per decoder token). Norms, softmax and gathers are not counted.
    """
    d, f, v, t = self.d_model, self.ffw_size, self.vocab_size, seq_len
    hk = self.num_heads * self.head_dim
    kvk = self.kv_heads * self.head_dim
    ffw_mats = 3 if self.ffw_activation == "swiglu" else 2
    # Decoder blocks and logits. Self-attention is computed over all T keys (masked), and the
    # relative-position logits over the 2T-1 distances (none with rotary positions).
    fwd = 2 * (self.num_layers * (2 * d * hk + 2 * d * kvk + ffw_mats * d * f) + d * v)
    fwd += self.num_layers * 2 * hk * (t + t + (2 * t if self.positions == "relative" else 0))
    if self.retrieval:
      m, n, r = self.chunk_size, self.num_neighbours, self.neighbour_len
      e, ef = self.enc_d_model, self.enc_ffw
      ek = self.enc_heads * self.head_dim
      nbr = n * r / m  # neighbour tokens per decoder token
      # CCA: q/out on decoder tokens, k/v on encoded neighbour tokens; logits over N*R keys and
      # M+R-1 distances.
      fwd += len(self.cca_layers) * (2 * (2 * d * hk + 2 * e * hk * nbr)
                                     + 2 * hk * (2 * n * r + m + r))
      # Encoder per neighbour token: input projection, blocks, self-attention over R keys.
      enc = 2 * (d * e + self.encoder_layers * (4 * e * ek + 2 * e * ef))
      enc += self.encoder_layers * 2 * ek * (r + r + 2 * r)
      # Encoder cross-attention (first layer): q/out per neighbour token, logits over M keys,
      # k/v of the chunk's decoder activations (once per chunk, per decoder token here).
      enc += 2 * 2 * e * ek + 2 * ek * (2 * m + m + r)
      fwd += enc * nbr + 2 * 2 * d * ek
    return 3.0 * fwd


def _every_third(start: int, num_layers: int) -> tuple[int, ...]:
  return tuple(range(start, num_layers + 1, 3))


_VOCAB = 128_000

# Every named model size, one registry: experiments name one as `model_size` (and may override
# fields), `sample --size` builds one, `aot_compile --config=experiments/...` compiles one, and the
# benchmarks measure one.
SIZES: dict[str, RetroConfig] = {
    # The paper: Table 2 widths and depths; CCA layers as Table 10 lists them.
    "172m": RetroConfig(vocab_size=_VOCAB, d_model=896, num_heads=16, num_layers=12,
                        ffw_size=3584, cca_layers=(6, 9, 12)),
    "425m": RetroConfig(vocab_size=_VOCAB, d_model=1536, num_heads=12, num_layers=12,
                        ffw_size=6144, cca_layers=(6, 9, 12)),
    "1.5b": RetroConfig(vocab_size=_VOCAB, d_model=2048, num_heads=16, num_layers=24,
                        ffw_size=8192, cca_layers=_every_third(9, 24)),
    "7.5b": RetroConfig(vocab_size=_VOCAB, d_model=4096, num_heads=32, num_layers=32,
                        ffw_size=16384, cca_layers=_every_third(9, 32)),
    # A pretrained baseline (retro_jax.pretrained) exactly as the loader builds it from its file
    # (tests/test_retrofit.py checks); `python -m retro_jax.pretrained.export_smollm2` writes it.
    "smollm2-135m": RetroConfig(
        vocab_size=49152, d_model=576, num_heads=9, num_layers=30, ffw_size=1536, cca_layers=(),
        head_size=64, num_kv_heads=3, norm_eps=9.999999747378752e-06,  # float32(1e-5), as stored
        positions="rope", rope_theta=100000.0, ffw_activation="swiglu", tie_embeddings=True,
        pad_id=0),
    # The CPU demo's RETRO (experiments/tiny.py, `make demo`): the default database's 8k
    # SentencePiece vocabulary, 64-token chunks, k = 2 neighbours of r = 128 tokens.
    "tiny": RetroConfig(vocab_size=8192, d_model=256, num_heads=4, num_layers=4, ffw_size=1024,
                        cca_layers=(2, 4), chunk_size=64, num_neighbours=2, neighbour_len=128,
                        encoder_layers=2, encoder_d_model=128, encoder_num_heads=2),
    # The training-step benchmark's reference (bench/train_step.py, docs/benchmarks.md).
    "reference": RetroConfig(vocab_size=32000, d_model=512, num_heads=8, num_layers=12,
                             ffw_size=2048, cca_layers=(6, 9, 12), chunk_size=64,
                             num_neighbours=2, neighbour_len=128, encoder_layers=2,
                             encoder_d_model=512),
    # The unit tests' model: chunk m = 8, k = 2 neighbours of r = 16, CCA at layers 2 and 4.
    "test": RetroConfig(vocab_size=512, d_model=64, num_heads=4, num_layers=4, ffw_size=256,
                        cca_layers=(2, 4), chunk_size=8, num_neighbours=2, neighbour_len=16,
                        encoder_layers=2, encoder_d_model=32, encoder_num_heads=2),
}

# Table 2's non-embedding parameter counts, (baseline, RETRO), for comparison.
PAPER_PARAM_COUNTS: dict[str, tuple[float, float]] = {
    "172m": (132e6, 172e6),
    "425m": (368e6, 425e6),
    "1.5b": (1309e6, 1451e6),
    "7.5b": (6982e6, 7532e6),
}
# The paper's four sizes (a view of SIZES).
PAPER_SIZES: dict[str, RetroConfig] = {name: SIZES[name] for name in PAPER_PARAM_COUNTS}
