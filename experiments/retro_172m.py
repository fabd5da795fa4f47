"""RETRO 172M: Table 2 sizes, Table 10 CCA layers, the paper's recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("172m")
