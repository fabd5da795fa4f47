"""RETRO 7.5B: Table 2 sizes, Table 10 CCA layers, the paper's recipe.

The paper's batch of 1,024 sequences fits two v5p:4x4x4 slices (128 chips) in 8 micro-batches of
one sequence per chip: `--config.grad_accum_steps=8` (57.1 GiB per chip in the ahead-of-time
compile, bench/results/aot_compile.jsonl; 4 micro-batches need 98.9 GiB, over v5p's 95).
"""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("7.5b", batch=1024, peak_lr=1e-4)
