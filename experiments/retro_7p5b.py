"""RETRO 7.5B: Table 2 sizes, Table 10 CCA layers, the paper's recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("7.5b", batch=1024, peak_lr=1e-4)
