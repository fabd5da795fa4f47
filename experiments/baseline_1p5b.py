"""The baseline decoder matching RETRO 1.5B (no CCA, no encoder), same recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("1.5b", retrieval=False)
