"""The baseline decoder matching RETRO 7.5B (no CCA, no encoder), same recipe."""
from experiments._recipe import paper_recipe


def get_config():
  return paper_recipe("7.5b", batch=1024, peak_lr=1e-4, retrieval=False)
