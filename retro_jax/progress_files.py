"""Small files that make long stages restartable: atomic JSON writes and per-shard progress files."""
from __future__ import annotations

import json
import os
import pathlib


def progress_path(npy_path: pathlib.Path) -> pathlib.Path:
  """The progress record beside a shard's .npy (finished blocks, settings)."""
  return pathlib.Path(npy_path).with_suffix(".progress.json")


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
  """Writes to a temporary name and renames, so a killed run never leaves half a file (local
  paths and, through etils.epath, gs:// ones: a run's config.json in a bucket workdir)."""
  from etils import epath
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
  tmp.replace(path)
