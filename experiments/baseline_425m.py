"""The baseline decoder matching RETRO 425M (no CCA, no encoder), same recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("425m", retrieval=False)
