"""Checkpoints: orbax in `WORKDIR/checkpoints/<step>/`, and loading a trained model back.

A training checkpoint holds four items, written together (orbax finalises a step directory
atomically, so a run killed mid-save leaves the previous checkpoint as the latest):
  "model"      nnx.State of the Retro model (float32 parameters, sharded as in training),
  "optimizer"  nnx.State of the nnx.Optimizer (step count and optax state),
  "data"       the grain iterator's state (which batches were consumed),
  "meta"       JSON: step, the RetroConfig as a dict, the experiment config, the database.
`WORKDIR/config.json` repeats "meta" for people and for `load_model` without orbax metadata.

    model, config, info = load_model("runs/tiny_retro")          # latest step
    model, config, info = load_model("runs/tiny_retro", step=400)
    model, config, info = load_model("runs/big", mesh=make_mesh((1, -1, 1)))  # FSDP
The model is restored straight into its sharded layout on a mesh (default: all devices,
data-parallel, as training's `--config.mesh=-1,1,1`): orbax reads each device's shards of the
weights, by the training rules (model/placement.py), whatever mesh saved them.
`info` holds "step", "db" (the database the model trained on), "db_tokenizer" (its tokenizer record:
kind, fingerprint, vocabulary; None in older checkpoints) and "experiment".
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from retro_jax.errors import UserError
from retro_jax.model import Retro, RetroConfig, placement
from retro_jax.model.partitioning import make_mesh

CHECKPOINTS = "checkpoints"


class CheckpointError(UserError, ValueError):
  """A workdir without checkpoints, or a checkpoint that does not fit the model asked for."""


def config_from_dict(d: dict) -> RetroConfig:
  """A checkpoint's model config."""
  try:
    return RetroConfig.from_dict(d)
  except ValueError as e:
    raise CheckpointError(f"checkpoint config: {e} (unknown to this version of retro_jax)") from e


def _absolute(path: str | os.PathLike) -> epath.Path:
  """orbax wants absolute paths; gs:// and other URLs are absolute already."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(str(path)))


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """`path` may be a workdir (holding checkpoints/) or the checkpoints directory itself."""
  path = _absolute(path)
  return path / CHECKPOINTS if (path / CHECKPOINTS).exists() else path


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(_absolute(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
  """`state` is the nnx.State of (model, optimizer), as retro_jax.training.step.TrainStep holds it."""
  pure = nnx.to_pure_dict(state)
  args = {"model": ocp.args.StandardSave(pure[0]),
          "optimizer": ocp.args.StandardSave(pure[1]),
          "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**args), force=True)


def _abstract(state):
  """ShapeDtypeStructs (with shardings where the state has them) for a restore target."""
  def f(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(f, state)


def restore(mngr: ocp.CheckpointManager, step: int, state, data_iter):
  """Restores into `state` (nnx.State of (model, optimizer)) in place, keeping its dtypes and
  shardings; the grain iterator is restored in place too. Returns (state, meta)."""
  pure = nnx.to_pure_dict(state)
  args = {"model": ocp.args.StandardRestore(_abstract(pure[0])),
          "optimizer": ocp.args.StandardRestore(_abstract(pure[1])),
          "meta": ocp.args.JsonRestore()}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  nnx.replace_by_pure_dict(state, {0: out["model"], 1: out["optimizer"]})
  return state, out["meta"]


def read_meta(path: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint under a workdir or checkpoints dir."""
  directory = checkpoint_dir(path)
  if not directory.exists():
    raise CheckpointError(f"no checkpoints at {directory}; train first "
                          "(python -m retro_jax.train --config=... --workdir=...).")
  mngr = ocp.CheckpointManager(directory)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"{directory} holds no finished checkpoint.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"{directory} has no checkpoint at step {step}; steps: {sorted(steps)}.")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return step, meta


def restore_model_state(path: str | os.PathLike, abstract_model_state, step: int | None = None):
  """Only the "model" item (no optimizer state needed), into the given (abstract) nnx.State."""
  step, _ = read_meta(path, step)
  mngr = ocp.CheckpointManager(checkpoint_dir(path))
  out = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(abstract_model_state)))))
  nnx.replace_by_pure_dict(abstract_model_state, out["model"])
  return abstract_model_state


def load_model(path: str | os.PathLike, step: int | None = None, *,
               overrides: dict[str, Any] | None = None,
               mesh: Mesh | None = None) -> tuple[Retro, RetroConfig, dict]:
  """A trained model on `mesh`, its RetroConfig and info {step, db, experiment, mesh}.

  The weights are restored directly in the training layout on `mesh` (default: every device,
  data-parallel, `make_mesh((-1, 1, 1))`); `overrides` replaces config fields that do not change
  the parameters (e.g. dtype, remat).
  """
  step, meta = read_meta(path, step)
  config = config_from_dict(meta["model_config"])
  if overrides:
    config = dataclasses.replace(config, **overrides)
  abstract = nnx.eval_shape(lambda: Retro(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  # Each device reads its own shards, whatever mesh saved them (e.g. 8 devices of a 2-host run).
  mesh = make_mesh((-1, 1, 1)) if mesh is None else mesh
  state = restore_model_state(path, placement.place(abstract_state, mesh, config.sharding_rules),
                              step)
  model = nnx.merge(graphdef, state)
  info = {"step": step, "db": meta.get("db"), "experiment": meta.get("experiment", {}),
          "path": str(checkpoint_dir(path)), "db_tokenizer": meta.get("db_tokenizer"),
          "mesh": dict(mesh.shape)}
  return model, config, info


