"""Where a trained model, a batch and a decode cache live on a mesh, for evaluation and sampling.

The training rules (partitioning.RULES) decide every placement: weights by their logical axes
(`state_shardings`), batches over the batch axes ("data", "fsdp"), decode caches over the batch
axes and the "model" axis on their heads. One difference from training: a dimension that does not
divide over its mesh axes (a single prompt over 8 data-parallel devices, 3 key/value heads over a
model axis of 2) is replicated over them instead of refused, because a jit argument must divide
evenly and sampling's batch is often 1.

    mesh = make_mesh((-1, 1, 1))                      # all devices data-parallel (the default)
    params = place(params, mesh)                      # concrete arrays: device_put
    abstract = place(abstract_params, mesh)           # ShapeDtypeStructs: with their shardings
    tokens = jax.device_put(tokens_BxT, batch_sharding(mesh, tokens_BxT.shape))
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.model.partitioning import logical_to_mesh, state_shardings


def fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with the mesh axes of each dimension that does not divide over them dropped."""
  out = []
  for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    ways = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(entry if shape[i] % ways == 0 else None)
  return P(*out)


def _sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int],
              rules: str) -> NamedSharding:
  return NamedSharding(mesh, fit(logical_to_mesh(axes, rules, mesh.axis_names), shape, mesh))


def param_shardings(state, mesh: Mesh, rules: str = "fsdp"):
  """NamedShardings of an nnx.State of weights (the same tree, for jit's in_shardings): the
  training layout (`state_shardings`), with any dimension that does not divide replicated."""
  return jax.tree.map(lambda x, s: NamedSharding(mesh, fit(s.spec, x.shape, mesh)), state,
                      state_shardings(state, mesh, rules))


def place(state, mesh: Mesh, rules: str = "fsdp"):
  """A new nnx.State of the weights in `param_shardings`: concrete arrays are moved there
  (device_put), ShapeDtypeStructs (an abstract model) get the shardings, for restoring or
  lowering ahead of time."""
  def f(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.device_put(x, s)
  return jax.tree.map(f, state, param_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: str = "fsdp") -> NamedSharding:
  """Dimension 0 over the batch axes (replicated when it does not divide), the rest whole."""
  return _sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# A decode cache leaf's logical axes, by its key and rank (model/decode.py: self-attention caches
# [B, S, KVH, K] and position tables [P, H, K]; CCA slots [B, N, R, H, K] and masks [B, N, R];
# the first CCA layer's chunk states [B, m, D]).
_CACHE_AXES = {
    ("k", 4): ("batch", "length", "heads", "head_dim"),
    ("v", 4): ("batch", "length", "heads", "head_dim"),
    ("k", 5): ("batch", None, "neighbour_len", "heads", "head_dim"),
    ("v", 5): ("batch", None, "neighbour_len", "heads", "head_dim"),
    ("mask", 3): ("batch", None, "neighbour_len"),
    ("pos", 3): (None, "heads", "head_dim"),
    ("chunk_h", 3): ("batch", "length", "act_embed"),
}


def cache_shardings(arrays, mesh: Mesh, rules: str = "fsdp"):
  """NamedShardings of a decode cache pytree (arrays or ShapeDtypeStructs)."""
  def f(path, x):
    key = next((p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey)), None)
    axes = _CACHE_AXES.get((key, x.ndim))
    if axes is None:
      raise ValueError(f"decode cache leaf {jax.tree_util.keystr(path)} of shape {x.shape} has "
                       "no placement rule")
    return _sharding(mesh, axes, x.shape, rules)
  return jax.tree_util.tree_map_with_path(f, arrays)


def describe(mesh: Mesh) -> str:
  """`data=8 fsdp=1 model=1`, for the commands' logs."""
  return " ".join(f"{n}={s}" for n, s in mesh.shape.items())
