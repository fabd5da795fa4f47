"""Sampling from RETRO with a fresh retrieval at every chunk boundary, on the incremental decoder.

    retrieve = DatabaseRetrieval.from_db("runs/db_fresh", num_neighbours=2, neighbour_len=128)
    out = generate(model, config, prompt_ids, retrieve, max_new_tokens=128, temperature=0.8,
                   top_p=0.9, seed=0)
    out.new_ids, out.retrievals   # generated ids; one Retrieval per completed chunk

Retrieval protocol: `retrieve_fn(chunk_tokens_M) -> neighbours_KxR` (int32, pad_id where there is
no neighbour token) is called once per completed chunk C_u, in order u = 0, 1, ..., with C_u's m
tokens as the query, as soon as the chunk's last token is known (for the prompt's complete chunks
before the prefill; for a generated token that completes a chunk, before that token is fed). Its
neighbours reach the positions >= (u+1)*m - 1 (the paper's Listing 1), starting with C_u's own
last token. `DatabaseRetrieval` implements it over any searcher with the `Retriever.search`
interface (the in-process `retro_jax.retrieval.retriever.Retriever` or the gRPC
`retro_jax.retrieval.client.ServiceRetriever`). `retrieve_fn=None` samples without retrieval.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, restricted to the
nucleus (the smallest set of most likely tokens whose probability reaches top_p), renormalised.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from retro_jax.db import layout
from retro_jax.db.chunk_store import ChunkStore
from retro_jax.db.prepare import load_db_tokenizer
from retro_jax.db.tokenizer import check_tokenizer
from retro_jax.errors import UserError
from retro_jax.model.config import RetroConfig
from retro_jax.model.decode import Decoder
from retro_jax.retrieval.embedder import Embedder
from retro_jax.retrieval.retriever import Retriever

RetrieveFn = Callable[[np.ndarray], np.ndarray]


class GenerateError(UserError, ValueError):
  """Bad generation arguments, or a retrieve_fn answer that does not fit the model."""


@dataclasses.dataclass
class Retrieval:
  chunk_index: int          # u: the query is tokens[u*m:(u+1)*m]
  query_ids: np.ndarray     # int32 [m]
  neighbours: np.ndarray    # int32 [K, R]


@dataclasses.dataclass
class GenerateResult:
  prompt_ids: list[int]
  new_ids: list[int]
  retrievals: list[Retrieval]
  stopped_at_eos: bool
  seconds: dict  # prefill / decode (model, sampling included) / retrieval wall time

  @property
  def ids(self) -> list[int]:
    return self.prompt_ids + self.new_ids


# ------------------------------------------------------------------------------------------------
# Sampling.


def nucleus_logits(logits_BxV: jax.Array, temperature, top_p) -> jax.Array:
  """logits / temperature with every token outside the top-p nucleus set to -inf.

  The nucleus keeps a token when the probability of the strictly more likely tokens is < top_p
  (so the most likely token is always kept, and top_p >= 1 keeps everything)."""
  logits = logits_BxV.astype(jnp.float32) / temperature
  order_BxV = jnp.argsort(-logits, axis=-1)
  sorted_BxV = jnp.take_along_axis(logits, order_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_sorted_BxV = before_BxV < top_p
  keep_BxV = jnp.zeros_like(keep_sorted_BxV).at[
      jnp.arange(logits.shape[0])[:, None], order_BxV].set(keep_sorted_BxV)
  return jnp.where(keep_BxV, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("greedy",))
def sample_tokens(logits_BxV: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool
                  ) -> jax.Array:
  """int32 [B]: argmax (greedy) or a draw from the tempered nucleus distribution."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, nucleus_logits(logits_BxV, temperature, top_p),
                                axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# The generation loop.


def generate(model, config: RetroConfig, prompt_ids: Sequence[int],
             retrieve_fn: RetrieveFn | None = None, *, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, num_neighbours: int | None = None,
             decoder: Decoder | None = None, mesh: Mesh | None = None) -> GenerateResult:
  """Samples up to max_new_tokens after prompt_ids (one sequence), retrieving at every completed
  chunk (see the module docstring). Stops early after sampling eos_id (when given).

  num_neighbours: K, the rows retrieve_fn returns (default config.num_neighbours; more than in
  training is allowed). decoder: a `Decoder` of this model to reuse (its compiled steps), with
  max_len >= len(prompt) + max_new_tokens; by default a new one of exactly that size, decoding
  sharded over `mesh` when given (`Decoder`; None: where the weights are).
  """
  m, r = config.chunk_size, config.neighbour_len
  k = num_neighbours or config.num_neighbours
  prompt = [int(t) for t in prompt_ids]
  if not prompt:
    raise GenerateError("empty prompt: give at least one token (e.g. the tokenizer's EOS/BOS)")
  if max_new_tokens < 1:
    raise GenerateError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or not 0 < top_p:
    raise GenerateError(f"need temperature >= 0 and top_p > 0, got {temperature}, {top_p}")
  bad = [t for t in prompt if not 0 <= t < config.vocab_size]
  if bad:
    raise GenerateError(f"prompt ids {bad[:5]} outside the model's vocabulary [0, "
                        f"{config.vocab_size}); tokenize with the model's tokenizer")
  if retrieve_fn is not None and not config.retrieval:
    raise GenerateError("retrieve_fn given for a model without CCA layers; pass None")
  need = len(prompt) + max_new_tokens
  if decoder is None:
    decoder = Decoder(model, max_len=need, mesh=mesh)
  elif decoder.max_len < need:
    raise GenerateError(f"decoder max_len={decoder.max_len} < prompt + max_new_tokens = {need}")
  ids = list(prompt)
  retrievals: list[Retrieval] = []
  secs = {"prefill": 0.0, "decode": 0.0, "retrieval": 0.0}

  def retrieve(u: int) -> np.ndarray:
    query = np.asarray(ids[u * m:(u + 1) * m], np.int32)
    t0 = time.perf_counter()
    nbrs = np.asarray(retrieve_fn(query))
    secs["retrieval"] += time.perf_counter() - t0
    if nbrs.shape != (k, r) or not np.issubdtype(nbrs.dtype, np.integer):
      raise GenerateError(f"retrieve_fn returned {nbrs.dtype} {nbrs.shape} for chunk {u}; expected "
                          f"integer [K={k}, R={r}] (pad missing neighbours with pad_id)")
    nbrs = nbrs.astype(np.int32)
    retrievals.append(Retrieval(u, query, nbrs))
    return nbrs

  t0 = time.perf_counter()
  nbrs_1xLxKxR = None
  if retrieve_fn is not None:
    nbrs_1xLxKxR = np.full((1, config.num_chunks(len(prompt)), k, r), config.pad_id, np.int32)
    for u in range(len(prompt) // m):
      nbrs_1xLxKxR[0, u] = retrieve(u)
  logits, state = decoder.prefill(np.asarray([prompt], np.int32), nbrs_1xLxKxR)
  logits.block_until_ready()
  secs["prefill"] = time.perf_counter() - t0 - secs["retrieval"]
  key = jax.random.PRNGKey(seed)
  greedy = temperature == 0
  new: list[int] = []
  stopped = False
  t0, t_ret = time.perf_counter(), secs["retrieval"]
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    tok = int(sample_tokens(logits, sub, float(temperature or 1.0), float(top_p), greedy=greedy)[0])
    new.append(tok)
    ids.append(tok)
    if eos_id is not None and tok == eos_id:
      stopped = True
      break
    if i == max_new_tokens - 1:
      break
    step_nbrs = None
    if retrieve_fn is not None and decoder.completes_chunk(state):
      step_nbrs = retrieve(state.length // m)[None]
    logits, state = decoder.step(state, np.asarray([tok], np.int32), step_nbrs)
  secs["decode"] = time.perf_counter() - t0 - (secs["retrieval"] - t_ret)
  return GenerateResult(prompt_ids=prompt, new_ids=new, retrievals=retrievals,
                        stopped_at_eos=stopped, seconds=secs)


class FullRecompute:
  """Greedy generation recomputing every position per token with the model's own forward: the
  reference the KV-cache decoder is tested and benchmarked against (bench/generate_speed.py). Same
  retrieval protocol as `generate`."""

  def __init__(self, model, config: RetroConfig):
    self.config = config
    graphdef, state = nnx.split(model)
    self.state = state
    self.fwd = jax.jit(lambda s, t, n: nnx.merge(graphdef, s)(t, n))

  def forward(self, ids: list[int], nbrs_LxKxR: np.ndarray | None) -> jax.Array:
    """Logits after the last of `ids` (None: retrieval off)."""
    m, t = self.config.chunk_size, len(ids)
    l = math.ceil(t / m)
    tokens = np.full((1, l * m), self.config.pad_id, np.int32)
    tokens[0, :t] = ids
    nbrs = None if nbrs_LxKxR is None else nbrs_LxKxR[None, :l]
    return self.fwd(self.state, tokens, nbrs)[0, t - 1]

  def padded_nbrs(self, max_len: int, k: int) -> np.ndarray:
    c = self.config
    return np.full((math.ceil(max_len / c.chunk_size), k, c.neighbour_len), c.pad_id, np.int32)

  def generate(self, prompt: list[int], retrieve_fn: RetrieveFn | None, n: int,
               k: int | None = None) -> dict:
    """n greedy tokens after `prompt`; {"new_ids", "seconds", "retrieval_seconds"}."""
    m = self.config.chunk_size
    ids = list(prompt)
    nbrs = None
    if retrieve_fn is not None:
      nbrs = self.padded_nbrs(len(prompt) + n, k or self.config.num_neighbours)
    t_ret = 0.0

    def retrieve(u: int) -> None:  # the neighbours of completed chunk u
      nonlocal t_ret
      t1 = time.perf_counter()
      nbrs[u] = retrieve_fn(np.asarray(ids[u * m:(u + 1) * m], np.int32))
      t_ret += time.perf_counter() - t1

    t0 = time.perf_counter()
    for u in range(len(ids) // m if retrieve_fn is not None else 0):
      retrieve(u)
    for i in range(n):
      ids.append(int(jnp.argmax(self.forward(ids, nbrs))))
      if retrieve_fn is not None and i < n - 1 and len(ids) % m == 0:  # it completes a chunk
        retrieve(len(ids) // m - 1)
    return {"seconds": time.perf_counter() - t0, "retrieval_seconds": t_ret,
            "new_ids": ids[len(prompt):]}


# ------------------------------------------------------------------------------------------------
# Retrieval over a database.


@dataclasses.dataclass
class RetrievedChunk:
  """One neighbour of one query, for attribution (`--show_neighbours`)."""
  chunk_id: int
  score: float
  doc_id: int
  doc_key: str
  text: str  # the neighbour chunk's own text (without its continuation)


class DatabaseRetrieval:
  """`retrieve_fn` over a database: detokenise the chunk, embed it with the database's embedder,
  search (any object with `Retriever.search(queries_QxD, k) -> (ids_QxK, scores_QxK)`), gather
  each neighbour chunk with its continuation (`ChunkStore.neighbour_tokens`, r tokens).

  `history` holds, per call, (query text, [RetrievedChunk]) for attribution.
  """

  def __init__(self, searcher, embedder, tokenizer, store, num_neighbours: int,
               neighbour_len: int):
    self.searcher, self.embedder, self.tokenizer, self.store = searcher, embedder, tokenizer, store
    self.k, self.r = num_neighbours, neighbour_len
    self.pad_id = store.pad_id
    self.history: list[tuple[str, list[RetrievedChunk]]] = []

  @classmethod
  def from_db(cls, db_dir: str, num_neighbours: int, neighbour_len: int, *,
              searcher=None, backend: str | None = None) -> "DatabaseRetrieval":
    """Opens DB's chunk store, tokenizer and embedder (as DB/embeddings/embedder.json records it);
    the searcher defaults to the in-process `Retriever.from_db(db_dir, backend)`."""
    store = ChunkStore.open(db_dir)
    tokenizer = load_db_tokenizer(db_dir)  # SentencePiece or byte-level BPE
    check_tokenizer(tokenizer, store.manifest["tokenizer"], f"chunk store {store.root}")
    info_path = layout.embeddings_dir(db_dir) / layout.EMBEDDER_INFO  # local or gs://
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    embedder = Embedder.load(max_length=info.get("max_length", 128),
                             dtype=info.get("dtype", "bfloat16"), batch_size=1)
    if info:
      embedder.check_info(info, where=str(info_path))
    if searcher is None:
      searcher = Retriever.from_db(db_dir, backend=backend)
    return cls(searcher, embedder, tokenizer, store, num_neighbours, neighbour_len)

  def check_model(self, config: RetroConfig) -> None:
    """Raises GenerateError unless the model's chunk size and vocabulary fit this database."""
    if config.chunk_size != self.store.chunk_size:
      raise GenerateError(f"the model's chunk size {config.chunk_size} differs from the database's "
                          f"{self.store.chunk_size} ({self.store.root}); use the database the "
                          f"model was trained with")
    if config.vocab_size < self.tokenizer.vocab_size:
      raise GenerateError(f"the model's vocabulary ({config.vocab_size}) is smaller than the "
                          f"database tokenizer's ({self.tokenizer.vocab_size})")
    if config.pad_id != self.pad_id:
      raise GenerateError(f"the model's pad_id {config.pad_id} differs from the database's "
                          f"{self.pad_id}")

  def query_text(self, chunk_tokens_M: np.ndarray) -> str:
    ids = [int(t) for t in chunk_tokens_M if t != self.pad_id]
    return self.tokenizer.decode(ids)

  def __call__(self, chunk_tokens_M: np.ndarray) -> np.ndarray:
    text = self.query_text(chunk_tokens_M)
    q_1xD = self.embedder.embed([text])
    ids_1xK, scores_1xK = self.searcher.search(q_1xD, self.k)
    ids_K = np.asarray(ids_1xK, np.int64)[0]
    scores_K = np.asarray(scores_1xK, np.float32)[0]
    out_KxR = np.full((self.k, self.r), self.pad_id, np.int32)
    found = ids_K >= 0
    if found.any():
      out_KxR[found] = self.store.neighbour_tokens(ids_K[found], self.r)
    chunks = []
    if found.any():
      docs = self.store.doc_ids(ids_K[found])
      texts = self.store.chunk_text(ids_K[found], self.tokenizer)
      for cid, score, doc, txt in zip(ids_K[found], scores_K[found], docs, texts):
        chunks.append(RetrievedChunk(int(cid), float(score), int(doc), self.store.doc_key(int(doc)),
                                     txt))
    self.history.append((text, chunks))
    return out_KxR
