"""All partitioning in one place: logical axis names -> mesh axes ("data", "fsdp", "model").

Every parameter is declared with logical axis names (see `layers.param`), every main activation
is constrained with them (`constrain`). `RULES` maps each logical name to a mesh axis (or None:
replicated). A spec that would use one mesh axis twice is refused, as is an unknown name.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis (or a tuple of mesh axes, or None).
RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # ZeRO-3 / FSDP + tensor parallel: weights sharded over fsdp on their d_model side and over
    # model on heads / ffw / vocab; the batch over data and fsdp.
    "fsdp": {
        "batch": ("data", "fsdp"),
        "length": None,
        "neighbour_len": None,
        "act_embed": None,
        "act_vocab": "model",
        "embed": "fsdp",
        "enc_embed": "fsdp",
        "vocab": "model",
        "heads": "model",
        "head_dim": None,
        "mlp": "model",
        "rel_embed": None,
        "norm": None,
    },
}


class ShardingCollisionError(ValueError):
  pass


def logical_to_mesh(axes: Sequence[str | None], rules: str = "fsdp",
                    mesh_axes: Sequence[str] = MESH_AXES) -> P:
  """Maps a tuple of logical axis names to a PartitionSpec; refuses collisions."""
  table = RULES[rules]
  used: dict[str, str] = {}
  out = []
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in RULES[{rules!r}]")
    target = table[name]
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      if t not in mesh_axes:
        raise ShardingCollisionError(f"rule {name!r} -> {t!r}: no mesh axis {t!r} in {mesh_axes}")
      if t in used:
        raise ShardingCollisionError(
            f"logical axes {used[t]!r} and {name!r} both map to mesh axis {t!r} in {tuple(axes)}")
      used[t] = name
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return P(*out)


def num_slices(devices) -> int:
  """How many TPU slices (joined over the data-centre network, DCN) the devices span."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def slice_grid(shape: Sequence[int], devices, topology_aware: bool = True) -> np.ndarray:
  """One slice's devices laid out as `shape`: `mesh_utils.create_device_mesh` (on TPU, an order
  that follows the chips' physical torus, e.g. a ring through a v5e 4x4, so that each mesh axis's
  collectives run between neighbouring chips; on GPU, by device id), else, or for a layout it has
  no rule for, `devices` in their order (CPU: no topology)."""
  if topology_aware:
    try:
      return mesh_utils.create_device_mesh(tuple(shape), list(devices),
                                           allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      logging.warning("no topology-aware %s mesh for %s devices (%s); devices in their order",
                      tuple(shape), getattr(devices[0], "device_kind", "?"), e)
  return np.array(devices).reshape(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None, *,
              topology_aware: bool = True) -> Mesh:
  """A ("data", "fsdp", "model") mesh; one -1 entry takes the remaining devices.

  `shape` is one slice's mesh, laid out over the slice's topology (`slice_grid`;
  `topology_aware=False`: the devices in their order, as before). Over several slices
  (multi-slice TPU: devices with distinct `slice_index`) the mesh is
  `mesh_utils.create_hybrid_device_mesh(shape, (slices, 1, 1))`: the "data" axis grows by the
  slice count and is the only axis that crosses the DCN (data-parallel gradient all-reduce between
  slices; FSDP and tensor parallelism stay on each slice's ICI).
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split evenly over {slices} slices")
  per_slice = len(devices) // slices
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh shape {shape}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = per_slice // rest
  if int(np.prod(shape)) != per_slice:
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices per slice, "
                     f"have {per_slice}" + (f" ({slices} slices)" if slices > 1 else ""))
  if slices == 1:
    return Mesh(slice_grid(shape, devices, topology_aware), MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(tuple(shape), (slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES)


def _spec_of(variable: nnx.Variable, rules: str) -> P:
  axes = variable.get_metadata().get("logical_axes")
  if axes is None:
    return P()
  if len(axes) != len(variable.shape):
    raise ValueError(f"logical axes {axes} do not match shape {variable.shape}")
  return logical_to_mesh(axes, rules)


def state_shardings(state, mesh: Mesh, rules: str = "fsdp"):
  """NamedShardings for an nnx.State (or any tree of nnx.Variables / arrays)."""
  def f(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, _spec_of(x, rules)))
    return NamedSharding(mesh, P())
  return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: str = "fsdp") -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_mesh(axes, rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int, rules: str = "fsdp") -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), rules))
