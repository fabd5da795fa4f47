"""Writes documents as a real TFDS dataset in ArrayRecord format, with TFDS's own builder and no
TensorFlow: what `tfds:NAME?data_dir=...` corpus specs (retro_jax/db/corpus.py) read back.

Features `text` and `key` (both `tfds.features.Text`); records keep the order given (shuffling
off), so `tfds:NAME?split=S&data_dir=D&key_field=key` yields the documents as written.
"""
from __future__ import annotations

import types
from typing import Sequence

import tensorflow_datasets as tfds
from etils import epath


def _builder_class(name: str, version: str, splits: dict[str, Sequence[tuple[str, bytes]]]):
  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "key": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split):
    for i, (key, text) in enumerate(splits[split]):
      yield i, {"text": text, "key": key}

  # code_path None: no checksums file or metadata next to the builder's code (looking them up for
  # a class in a package needs importlib_resources, which tensorflow-datasets does not install).
  body = {"name": name, "VERSION": tfds.core.Version(version), "code_path": None, "_info": _info,
          "_split_generators": _split_generators, "_generate_examples": _generate_examples,
          "__module__": __name__}
  return types.new_class(f"TextDataset_{name}", (tfds.core.GeneratorBasedBuilder,),
                         {"skip_registration": True}, lambda ns: ns.update(body))


def write_text_dataset(data_dir: str | epath.PathLike, name: str,
                       splits: dict[str, Sequence[tuple[str, bytes | str]]],
                       version: str = "1.0.0") -> epath.Path:
  """Prepares dataset `name` (splits of (key, text) records) under data_dir; returns its
  directory (data_dir/name/version). An existing one is kept."""
  tfds.disable_progress_bar()
  builder = _builder_class(name, version, splits)(data_dir=str(data_dir),
                                                  file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return epath.Path(builder.data_dir)
