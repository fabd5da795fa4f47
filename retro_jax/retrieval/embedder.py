"""Batched, jit-compiled, length-bucketed text embedder around the frozen all-MiniLM-L6-v2.

    emb = Embedder.load(max_length=128, dtype="bfloat16")
    vecs_Nx384 = emb.embed(["some text", ...])      # np.float32, unit rows, input order

Texts are tokenized (WordPiece, truncated at `max_length`), sorted by length, cut into batches of
`batch_size` rows, and each batch is padded to the smallest bucket length that fits it, so the
forward compiles once per bucket (with a fixed row count) instead of once per shape. Batches are
sharded row-wise over `jax.devices()` (data parallel); the weights are replicated.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.db.layout import sha256_file
from retro_jax.errors import UserError
from retro_jax.retrieval import bert

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EmbedderMismatchError(UserError, ValueError):
  """Embeddings on disk were made by a different embedder (weights, dtype or length)."""


def default_buckets(max_length: int, step: int = 16) -> tuple[int, ...]:
  return tuple(range(step, max_length, step)) + (max_length,)


@dataclasses.dataclass
class Embedder:
  graphdef: nnx.GraphDef
  state: nnx.State
  tokenizer: object  # tokenizers.Tokenizer
  max_length: int
  dtype: str
  batch_size: int
  buckets: tuple[int, ...]
  fingerprint: str
  mesh: Mesh
  dim: int
  tokens_per_batch: int | None = None

  @classmethod
  def load(cls, max_length: int = 128, dtype: str = "bfloat16", batch_size: int = 16,
           tokens_per_batch: int | None = None, buckets: Sequence[int] | None = None, model_dir: str | pathlib.Path | None = None,
           devices: Sequence[jax.Device] | None = None) -> "Embedder":
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    model_dir = pathlib.Path(model_dir) if model_dir is not None else bert.default_model_dir()
    model = bert.cast_matmul_weights(bert.load_bert(model_dir), DTYPES[dtype])
    if not 2 <= max_length <= model.cfg.max_position:
      raise ValueError(f"max_length={max_length}: must be in [2, {model.cfg.max_position}]")
    buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(max_length)
    if buckets[-1] < max_length:
      raise ValueError(f"largest bucket {buckets[-1]} < max_length {max_length}")
    devices = list(devices) if devices is not None else jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch_size = -(-batch_size // len(devices)) * len(devices)  # rows split evenly over devices
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    return cls(graphdef=graphdef, state=state, tokenizer=bert.load_wordpiece(model_dir, max_length),
               max_length=max_length, dtype=dtype, batch_size=batch_size, buckets=buckets,
               fingerprint=sha256_file(model_dir / bert.WEIGHTS_FILE), mesh=mesh,
               dim=model.cfg.hidden_size, tokens_per_batch=tokens_per_batch)

  @property
  def info(self) -> dict:
    """What the database manifest records about the embedder (compare with `check_info`)."""
    return {"model": "sentence-transformers/all-MiniLM-L6-v2", "fingerprint": self.fingerprint,
            "dtype": self.dtype, "dim": self.dim, "max_length": self.max_length}

  def check_info(self, info: dict, where: str = "embeddings") -> None:
    """Raises EmbedderMismatchError if `info` (from disk) was written by another embedder."""
    mine = self.info
    bad = {k: (info.get(k), v) for k, v in mine.items() if k != "model" and info.get(k) != v}
    if bad:
      raise EmbedderMismatchError(
          f"{where}: written by a different embedder ({', '.join(f'{k}: {a!r} on disk vs {b!r}' for k, (a, b) in bad.items())}); "
          "re-embed with this embedder or load the one that matches")

  @functools.cached_property
  def _forward(self):
    rows = NamedSharding(self.mesh, P("data"))

    @functools.partial(jax.jit, out_shardings=rows)
    def forward(state, ids_BxT, mask_BxT):
      return nnx.merge(self.graphdef, state)(ids_BxT, mask_BxT)

    return forward

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    if isinstance(texts, str):
      raise TypeError("embed() takes a list of strings, not one string")
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

  def embed_ids(self, ids: Sequence[Sequence[int]], bucketed: bool = True) -> np.ndarray:
    """Embeds already-tokenized rows; returns np.float32 [n, dim] in input order."""
    n = len(ids)
    out_NxD = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out_NxD
    lengths_N = np.array([len(x) for x in ids], np.int64)
    order_N = np.argsort(lengths_N, kind="stable") if bucketed else np.arange(n)
    rows = NamedSharding(self.mesh, P("data"))
    pending = []
    for idx, t in self._batches(lengths_N, order_N, bucketed):
      b = self._rows(t)
      ids_BxT = np.zeros((b, t), np.int32)
      mask_BxT = np.zeros((b, t), bool)
      for r, i in enumerate(idx):
        ids_BxT[r, :lengths_N[i]] = ids[i]
        mask_BxT[r, :lengths_N[i]] = True
      ids_BxT, mask_BxT = jax.device_put((ids_BxT, mask_BxT), rows)
      pending.append((idx, self._forward(self.state, ids_BxT, mask_BxT)))
      if len(pending) > 2:  # keep a couple of batches in flight while the host pads the next
        self._collect(pending.pop(0), out_NxD)
    for p in pending:
      self._collect(p, out_NxD)
    return out_NxD

  def _rows(self, t: int) -> int:
    """Rows per call for bucket length t: fixed, or a token budget (a multiple of the devices)."""
    if not self.tokens_per_batch:
      return self.batch_size
    n_dev = self.mesh.devices.size
    return max(1, self.tokens_per_batch // t // n_dev) * n_dev

  def _batches(self, lengths_N: np.ndarray, order_N: np.ndarray, bucketed: bool):
    """(row indices, padded length) per forward call; rows taken in `order_N` order."""
    n, start = len(order_N), 0
    while start < n:
      if not bucketed:
        t = self.max_length
        rows = self._rows(t)
      else:  # the smallest bucket whose row count's longest text fits in it (lengths ascending)
        for t in self.buckets:
          rows = self._rows(t)
          if lengths_N[order_N[min(start + rows, n) - 1]] <= t:
            break
      yield order_N[start:start + rows], t
      start += rows

  @staticmethod
  def _collect(item, out_NxD: np.ndarray) -> None:
    idx, emb_BxD = item
    out_NxD[idx] = np.asarray(emb_BxD, np.float32)[:len(idx)]

  def embed(self, texts: Sequence[str], bucketed: bool = True) -> np.ndarray:
    """np.float32 [len(texts), dim], L2-normalised rows, in the order of `texts`."""
    return self.embed_ids(self.tokenize(texts), bucketed=bucketed)
