r"""RETROfit: a frozen baseline decoder plus fresh chunked cross-attention and neighbour encoder.

For an experiment with `init_from` and `train_only="retrieval"`, the training loop
(retro_jax.training.loop) loads the baseline checkpoint (a run with retrieval=False), builds the
RETRO model of the experiment (same decoder fields, plus `cca_layers` and the encoder), copies every
baseline weight into it, and trains only the retrieval parameters (RETRIEVAL_PARAMS: the CCA layers,
their pre-norms and the neighbour encoder); the optimiser never sees the baseline's weights, so they
stay bit-identical, and with retrieval off the model's logits equal the baseline's. The result is an
ordinary checkpoint in WORKDIR that evaluate and sample read like any other.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from retro_jax.errors import UserError
from retro_jax.model import Retro
from retro_jax.training import checkpoint as ckpt_lib

# The parameters a retrofit trains: chunked cross-attention, its norm, the neighbour encoder.
RETRIEVAL_PARAMS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("cca"),
                                              nnx.PathContains("cca_norm"),
                                              nnx.PathContains("encoder")))

# RetroConfig fields that do not shape the decoder's parameters.
_NOT_DECODER = ("cca_layers", "num_neighbours", "neighbour_len", "encoder_layers",
                "encoder_d_model", "encoder_num_heads", "encoder_ffw_size", "dtype", "remat",
                "attention_q_block", "sharding_rules")


class RetrofitError(UserError, ValueError):
  """The baseline checkpoint does not fit the retrofit's decoder."""


def _decoder_fields(cfg) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_DECODER}


def load_baseline_into(state, cfg, baseline_path: str):
  """`state` (nnx.State of (model, optimizer)) with every baseline weight copied into the model."""
  _, meta = ckpt_lib.read_meta(baseline_path)
  base_cfg = ckpt_lib.config_from_dict(meta["model_config"])
  if base_cfg.retrieval:
    raise RetrofitError(f"{baseline_path} is a RETRO checkpoint (cca_layers="
                        f"{base_cfg.cca_layers}); retrofit starts from a baseline.")
  want, have = _decoder_fields(cfg), _decoder_fields(base_cfg)
  diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
  if diff:
    raise RetrofitError(f"baseline {baseline_path} differs from the retrofit's decoder in "
                        f"(baseline, retrofit) = {diff}; use the baseline's sizes.")
  abstract = nnx.eval_shape(lambda: Retro(base_cfg, rngs=nnx.Rngs(0)))
  _, abstract_state = nnx.split(abstract)
  base_state = ckpt_lib.restore_model_state(baseline_path, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state))
  base_flat = dict(nnx.to_flat_state(base_state))
  model_flat = dict(nnx.to_flat_state(state[0]))
  missing = sorted(set(base_flat) - set(model_flat))
  if missing:
    raise RetrofitError(f"baseline parameters {missing[:5]} have no place in the retrofit model.")
  for path, var in base_flat.items():
    target = model_flat[path]
    value = np.asarray(var.get_value())
    if value.shape != target.shape:
      raise RetrofitError(f"{path}: baseline shape {value.shape} != {target.shape}")
    target.set_value(jax.device_put(value.astype(target.dtype), target.value.sharding))
  new = [p for p in model_flat if p not in base_flat]
  bad = [p for p in new if not any(k in ("cca", "cca_norm", "encoder") for k in p)]
  if bad:
    raise RetrofitError(f"retrofit parameters {bad[:5]} are neither CCA nor encoder.")
  return state
