"""From an experiment file's ConfigDict to the objects a run needs: model config, optimiser, mesh.

An experiment (`experiments/*.py`, `get_config()` -> ml_collections.ConfigDict) names a base model
(`model_size`, a key of retro_jax.model.config.SIZES), field overrides (`model_overrides`), whether
it retrieves (`retrieval=False`: the matching baseline, cca_layers=()), the database (`db`), and
the recipe.
Every field and its default is listed in `defaults()`; unknown fields are an error (typos in
`--config.x=y` overrides must not pass silently).
"""
from __future__ import annotations

import ml_collections
from absl import logging

from retro_jax.model import SIZES, RetroConfig
from retro_jax.training import optim


def size_fields(size: str) -> ml_collections.ConfigDict:
  """Every field of the registry's model `size` as `model_overrides`, so that an experiment file
  can offer `--config.model_overrides.FIELD=VALUE` for any of them without restating the size."""
  return ml_collections.ConfigDict({k: v for k, v in SIZES[size].to_dict().items()
                                    if v is not None})


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_size = "tiny"  # a key of retro_jax.model.config.SIZES
  c.model_overrides = ml_collections.ConfigDict()  # RetroConfig fields replacing the base's
  c.retrieval = True  # False: the baseline (same widths, cca_layers=())
  c.db = "runs/default_db"  # retrieval database (chunk store, neighbours) for data and retrieval
  c.seq_len = 2048
  c.global_batch = 256
  c.total_steps = 100_000
  c.warmup_steps = 750
  c.peak_lr = 2e-4
  c.weight_decay = 0.1
  c.clip_norm = 1.0
  c.mesh = (1, -1, 1)  # (data, fsdp, model) of one slice; one -1 takes the remaining devices;
  # over several TPU slices the data axis also spans the slices (partitioning.make_mesh)
  c.seed = 0  # parameters and data order
  c.num_neighbours = 0  # 0: the model's num_neighbours
  # Copy curriculum (retro_jax.training.input_pipeline): this fraction of training chunks get themselves as
  # neighbour 0, so the model learns to copy from a neighbour that matches. 0: the paper's setup.
  c.self_neighbour_rate = 0.0
  # Training neighbours start 0..neighbour_shift tokens into the neighbour chunk (a hash per chunk
  # and slot; retro_jax.training.input_pipeline), so that a model cannot copy by position from
  # chunk-aligned duplicates. 0: the paper's setup. Evaluation never shifts.
  c.neighbour_shift = 0
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.log_every = 50
  c.peak_flops = 0.0  # per device, for MFU; 0: from the device kind (unknown kinds: no MFU)
  # Retrofitting: start from a baseline checkpoint and train only the retrieval layers.
  c.init_from = ""  # a workdir or checkpoints dir of a baseline (retrieval=False) run
  c.train_only = "all"  # "all" | "retrieval" (CCA layers, their norms, the neighbour encoder)
  c.read_threads = 4
  # Where the examples come from (retro_jax.training.input_pipeline): "joined" reads the examples
  # written ahead of time with their neighbours (build_db --stages=examples --config=THIS_FILE),
  # "random" gathers them from the database, "auto" the first when a matching set is finished.
  c.input = "auto"
  # Micro-batches per step: the global batch's gradient summed over this many slices of it (the
  # paper's batch on a mesh too small to hold it at once); global_batch must be divisible by it.
  c.grad_accum_steps = 1
  # On gs://, metrics.jsonl is uploaded whole at most this often (and at checkpoints and the end).
  c.metrics_upload_every_s = 60.0
  # JAX's persistent compilation cache (retro_jax.training.loop.CompileCache): "auto" ->
  # WORKDIR/compile_cache (unless JAX_COMPILATION_CACHE_DIR names one), "none", or a directory
  # (local or gs://); executables that compile faster than compile_cache_min_compile_s are not kept.
  c.compile_cache = "auto"
  c.compile_cache_min_compile_s = 1.0
  # A jax.profiler trace into WORKDIR/profile: "FIRST,LAST" (steps), "N" (the N steps after the
  # first, compiling, step) or "" (none).
  c.profile_steps = ""
  c.debug_step_delay_s = 0.0  # sleep after each step (tests use it to kill a run mid-flight)
  return c


# Fields that no longer mean anything, and why; an experiment that sets one still loads.
RETIRED = {"stop_check_every": "preemption is agreed by JAX's preemption sync point at every "
                               "step, without a host collective"}


def with_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The experiment's fields over `defaults()`; a field `defaults()` lacks is an error (a
  RETIRED one is ignored, with a warning)."""
  out = defaults()
  for k in sorted(set(c.keys()) & set(RETIRED)):
    logging.warning("experiment field %s is ignored: %s", k, RETIRED[k])
  unknown = sorted(set(c.keys()) - set(out.keys()) - set(RETIRED))
  if unknown:
    raise ValueError(f"unknown experiment fields {unknown}; known: {sorted(out.keys())}")
  for k in c.keys():
    if k in RETIRED:
      continue
    v = c[k]
    if k == "model_overrides":
      v = ml_collections.ConfigDict(dict(v))
    setattr(out, k, v)
  return out


def model_config(c: ml_collections.ConfigDict) -> RetroConfig:
  if c.model_size not in SIZES:
    raise ValueError(f"model_size={c.model_size!r}; expected one of {sorted(SIZES)}")
  try:
    cfg = RetroConfig.from_dict({**SIZES[c.model_size].to_dict(), **dict(c.model_overrides)})
  except ValueError as e:
    raise ValueError(f"model_overrides: {e}") from e
  return cfg if c.retrieval else cfg.baseline()


def optimizer(c: ml_collections.ConfigDict):
  return optim.adamw(c.peak_lr, warmup_steps=c.warmup_steps, total_steps=c.total_steps,
                     weight_decay=c.weight_decay, clip_norm=c.clip_norm)


def learning_rate(c: ml_collections.ConfigDict, step: int) -> float:
  return float(optim.learning_rate_schedule(c.peak_lr, c.warmup_steps, c.total_steps)(step))
