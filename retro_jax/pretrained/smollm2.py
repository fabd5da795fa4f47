r"""SmolLM2-135M as a step-0 baseline checkpoint that retrofit, evaluate and load_model read.

Loads the GGUF weights (retro_jax.pretrained.gguf.load_smollm2: dequantised to float32) and writes
WORKDIR/checkpoints/0/ in our orbax layout (retro_jax.training.checkpoint) with two items:
  "model"  the Retro baseline's nnx.State (cca_layers=(): no CCA, no encoder),
  "meta"   step 0, model_config (= retro_jax.model.config.SIZES["smollm2-135m"]), db
           (the database built with SmolLM2's tokenizer, `build_db --tokenizer=smollm2`), the
           source file and the tokenizer's fingerprint.
There is no "optimizer" or "data" item: the model was not trained here. `checkpoint.load_model`
and `retrofit.load_baseline_into` read only "model" and "meta". WORKDIR/config.json repeats "meta".
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from retro_jax import assets
from retro_jax.db import prepare
from retro_jax.db.layout import write_json_atomic
from retro_jax.model.config import SIZES
from retro_jax.model.retro import count_params
from retro_jax.pretrained import gguf
from retro_jax.training import checkpoint as ckpt_lib

MODEL_SIZE = "smollm2-135m"
DB = "runs/smollm2_db"  # its default database (experiments/retrofit_smollm2.py's)


class ExportError(ValueError):
  """The loaded model does not match the registered config, or the database's tokenizer differs."""


def check_db_tokenizer(db: str, tokenizer) -> None:
  """The database must be tokenized with the model's tokenizer (if it exists yet)."""
  if prepare.db_tokenizer_path(db) is None:
    return
  have = prepare.load_db_tokenizer(db)
  if have.fingerprint != tokenizer.fingerprint:
    raise ExportError(f"{db} is tokenized with {have.info()} but SmolLM2 uses "
                      f"{tokenizer.info()}; build one with `python -m retro_jax.build_db "
                      f"--corpus=default --tokenizer=smollm2 --db={DB}` and pass --db.")


def export(out: str | os.PathLike, db: str | None = None) -> dict:
  """Writes OUT/checkpoints/0 (model + meta) and OUT/config.json; returns the meta. `db`: the
  database the model directory names (default: DB)."""
  db = db or DB
  model, cfg, tokenizer = gguf.load_smollm2()
  want = SIZES[MODEL_SIZE]
  if cfg != want:
    diff = {k: (v, getattr(want, k)) for k, v in cfg.to_dict().items()
            if v != getattr(want, k)}
    raise ExportError(f"the GGUF gives a config that differs from retro_jax.model.config.SIZES"
                      f"[{MODEL_SIZE!r}] in (file, registry) = {diff}; update the registry.")
  check_db_tokenizer(db, tokenizer)
  out = epath.Path(out if "://" in str(out) else os.path.abspath(out))  # orbax: absolute paths
  directory = out / ckpt_lib.CHECKPOINTS
  if directory.exists() and ocp.CheckpointManager(directory).all_steps():
    raise ExportError(f"{directory} already holds checkpoints; remove it or pass another --workdir.")
  meta = {"step": 0, "model_config": cfg.to_dict(), "db": str(db),
          "experiment": {"model_size": MODEL_SIZE, "retrieval": False},
          "source": {"gguf": assets.smollm2_gguf_path(), "package": assets.SMOLLM2_PIP},
          "tokenizer": tokenizer.info(),
          "params": {"non_embedding": count_params(model),
                     "total": count_params(model, non_embedding=False)}}
  mngr = ckpt_lib.manager(directory, max_to_keep=None, async_save=False)
  mngr.save(0, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  write_json_atomic(out / "config.json", meta)
  return meta
