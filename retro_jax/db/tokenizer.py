"""Tokenizers behind one small protocol, with a SentencePiece implementation trained on the corpus.

`Tokenizer.load(path)` opens a SentencePiece `.model` (the database keeps its own under
`DB/tokenizer/spm.model`). Another implementation (e.g. a HuggingFace `tokenizers` byte-level BPE
for a retrofitted SmolLM2) only needs the members of `TokenizerProtocol`.

Pieces: pad=0, unk=1, eos=2, bos=3; newline is its own piece and whitespace is kept as written
(identity normalisation, byte fallback), so decode(encode(text)) == text for almost all text.
"""
from __future__ import annotations

import io
import os
import random
import re
import time
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm
from etils import epath

from retro_jax.db.layout import sha256_bytes
from retro_jax.errors import UserError

PAD_ID, UNK_ID, EOS_ID, BOS_ID = 0, 1, 2, 3


class TokenizerTrainingError(UserError, ValueError):
  """A corpus SentencePiece cannot train the asked vocabulary on (too little text)."""


# SentencePiece's own message when the corpus holds too few distinct pieces.
_VOCAB_TOO_HIGH = re.compile(
    r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class TokenizerMismatchError(UserError, ValueError):
  """A tokenizer that is not the one a database was built with."""


@runtime_checkable
class TokenizerProtocol(Protocol):
  vocab_size: int
  pad_id: int
  eos_id: int
  fingerprint: str  # sha256 hex of the model file's bytes

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def decode_fragment(self, ids: Iterable[int]) -> str: ...

  def info(self) -> dict: ...  # {"kind", "fingerprint", "vocab_size", "pad_id", "eos_id"}


class Tokenizer:
  """SentencePiece tokenizer (implements TokenizerProtocol)."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    self.fingerprint = sha256_bytes(model_proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.eos_id = int(self._sp.eos_id())
    self.bos_id = int(self._sp.bos_id())
    self.unk_id = int(self._sp.unk_id())
    self._newline_id = int(self._sp.piece_to_id("\n"))
    if self._newline_id == self.unk_id:
      raise ValueError(f"SentencePiece model {path} has no newline piece; train it with "
                       f"train_sentencepiece (user_defined_symbols=['\\n'])")
    if self.pad_id < 0:
      raise ValueError(f"SentencePiece model {path} has no pad piece; train it with pad_id=0")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    p = epath.Path(path)
    if not p.exists():
      raise FileNotFoundError(f"tokenizer model {p} does not exist: train one with "
                              "`python -m retro_jax.build_db --db=DB --stages=tokenizer` or pass "
                              "--tokenizer")
    return cls(p.read_bytes(), str(p))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def decode_fragment(self, ids: Iterable[int]) -> str:
    """Decodes ids cut from the middle of a text: keeps a leading space (decode drops it as the
    dummy prefix), so the fragments of a document concatenate back to the document."""
    return self._sp.decode([self._newline_id] + [int(i) for i in ids])[1:]

  def info(self) -> dict:
    """What a database manifest records about its tokenizer."""
    return {"kind": "sentencepiece", "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
            "pad_id": self.pad_id, "eos_id": self.eos_id}


def check_tokenizer(tokenizer: TokenizerProtocol, info: dict, where: str) -> None:
  """Raises TokenizerMismatchError unless tokenizer matches a manifest's tokenizer record."""
  if tokenizer.fingerprint != info["fingerprint"] or tokenizer.vocab_size != info["vocab_size"]:
    raise TokenizerMismatchError(
        f"{where} was built with tokenizer {info['fingerprint'][:12]} (vocab {info['vocab_size']}) "
        f"but got {tokenizer.fingerprint[:12]} (vocab {tokenizer.vocab_size}); load the tokenizer "
        f"saved with the database (DB/tokenizer/spm.model) or rebuild the store with this one")


MAX_SENTENCE_LENGTH = 4192


def line_picks(total: int, k: int, seed: int) -> np.ndarray:
  """Sorted indices of the k training lines (of `total`, in corpus order) a tokenizer trained in
  parallel uses (retro_jax/build/pipeline.py): all of them when total <= k, which is what
  `sample_lines` keeps too; else a seeded draw without replacement (another sample than the
  reservoir's: the parallel build counts the lines first)."""
  if total <= k:
    return np.arange(total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(int(total), size=int(k), replace=False))


def training_sentences(texts: Iterable[str], max_len: int = MAX_SENTENCE_LENGTH) -> Iterable[str]:
  """The lines of the texts that SentencePiece trains on, in order."""
  return _training_sentences(texts, max_len)


def _training_sentences(texts: Iterable[str], max_len: int) -> Iterable[str]:
  for text in texts:
    for line in text.split("\n"):
      line = line.rstrip()
      if line and len(line.encode("utf-8")) <= max_len:
        yield line


def sample_lines(texts: Iterable[str], k: int, seed: int, max_len: int) -> list[str]:
  """A seeded reservoir sample of k training lines (bounded memory), in corpus order."""
  rng = np.random.default_rng(seed)
  reservoir: list[tuple[int, str]] = []
  for i, line in enumerate(_training_sentences(texts, max_len)):
    if i < k:
      reservoir.append((i, line))
    else:
      j = int(rng.integers(0, i + 1))
      if j < k:
        reservoir[j] = (i, line)
  return [line for _, line in sorted(reservoir)]


def train_sentencepiece(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 32000,
                        seed: int = 0, model_type: str = "unigram",
                        input_sentence_size: int = 1_000_000, num_threads: int | None = None,
                        max_sentence_length: int = MAX_SENTENCE_LENGTH,
                        lines: list[str] | None = None) -> Tokenizer:
  """Trains on the lines of `texts` (sampled to input_sentence_size, shuffled) and writes out_path.

  Byte-reproducible for a corpus, seed and num_threads (checked on the whole default corpus, 32k
  vocab, with 1 and with 2 threads); another thread count gives another model. SentencePiece's own
  sampling was not reproducible at that scale, hence `sample_lines`.

  The model is written atomically (temp name, then rename) so a killed run leaves no half file.
  `lines`: the training lines already sampled (the parallel build's), instead of `texts`.
  """
  out_path = epath.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  spm.set_random_generator_seed(seed)
  random.seed(seed)
  t0 = time.perf_counter()
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        # Sampled here (seeded) rather than by SentencePiece, which then sees <= input_sentence_size
        # lines and only shuffles them.
        sentence_iterator=iter(lines if lines is not None else
                               sample_lines(texts, input_sentence_size, seed, max_sentence_length)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count() or 1,
        pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=BOS_ID,
        minloglevel=2,
    )
  except RuntimeError as e:
    if "sentences_.empty()" in str(e):
      raise TokenizerTrainingError(
          f"the corpus has no line SentencePiece can train on: every line is blank or longer than "
          f"{max_sentence_length} bytes (one document per line, newlines removed?); break the "
          "text into lines, or pass an existing tokenizer (--tokenizer=PATH/spm.model)") from None
    m = _VOCAB_TOO_HIGH.search(str(e))
    if m is None:
      raise
    raise TokenizerTrainingError(
        f"the corpus is too small for a {m.group(1)}-piece tokenizer (SentencePiece finds at most "
        f"{m.group(2)} pieces in it): pass --vocab_size={m.group(2)} or less, a larger --corpus, "
        "or an existing tokenizer (--tokenizer=PATH/spm.model)") from None
  proto = model.getvalue()
  tmp = out_path.parent / (out_path.name + ".tmp")
  tmp.write_bytes(proto)
  tmp.replace(out_path)
  tok = Tokenizer(proto, str(out_path))
  tok.train_seconds = time.perf_counter() - t0
  return tok
