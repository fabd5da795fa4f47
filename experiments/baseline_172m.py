"""The baseline decoder matching RETRO 172M (no CCA, no encoder), same recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("172m", retrieval=False)
