"""Small files that make long stages restartable: atomic JSON writes and per-shard progress files."""
from __future__ import annotations

import json
import os
import pathlib


def progress_path(npy_path: pathlib.Path) -> pathlib.Path:
  """The progress record beside a shard's .npy (finished blocks, settings)."""
  return pathlib.Path(npy_path).with_suffix(".progress.json")


def write_json_atomic(path: pathlib.Path, obj: dict) -> None:
  """Writes to a temporary name and renames, so a killed run never leaves half a file."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)
