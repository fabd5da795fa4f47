"""The evaluation step: per-token loss of a batch of windows, jitted over a mesh.

The weights stay in the training layout (`placement.place`: FSDP / tensor-parallel shards as the
training rules give them), the batch is split over the batch axes ("data", "fsdp"), and the
activations are constrained by the model's own logical axes under `jax.set_mesh`. The same object
scores windows (`evaluation.bpb.chunk_losses`) and lowers the step ahead of time for a TPU
topology (`training.aot.compile_eval_step`).

    step = EvalStep(graphdef, mesh, rules)
    nll_BxT = step(params, inputs_BxT, targets_BxT, neighbours_BxLxNxR)   # numpy float32
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from retro_jax.model import placement
from retro_jax.model.loss import token_nll


class EvalStep:
  """Per-token negative log-likelihood (nats) of a batch, on `mesh`."""

  def __init__(self, graphdef, mesh: Mesh, rules: str = "fsdp"):
    self.graphdef, self.mesh, self.rules = graphdef, mesh, rules
    self._jitted = jax.jit(self._nll)

  def batch_ways(self) -> int:
    """How many shards a batch is split into (the product of the batch axes' sizes)."""
    spec = placement.batch_sharding(self.mesh, (0,), self.rules).spec[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([self.mesh.shape[n] for n in names]))

  def _nll(self, params, inputs_BxT, targets_BxT, neighbours_BxLxNxR):
    model = nnx.merge(self.graphdef, params)
    return token_nll(model(inputs_BxT, neighbours_BxLxNxR), targets_BxT)

  def put(self, x):
    """A host batch array on the mesh, split over the batch axes (None stays None)."""
    if x is None:
      return None
    return jax.device_put(x, placement.batch_sharding(self.mesh, x.shape, self.rules))

  def __call__(self, params, inputs_BxT, targets_BxT, neighbours_BxLxNxR=None) -> np.ndarray:
    with jax.set_mesh(self.mesh):
      nll = self._jitted(params, self.put(inputs_BxT), self.put(targets_BxT),
                         self.put(neighbours_BxLxNxR))
    return np.asarray(nll)

  def lower(self, params, inputs_BxT, targets_BxT, neighbours_BxLxNxR=None):
    """Lowered from abstract arguments (jax.ShapeDtypeStruct with shardings)."""
    with jax.set_mesh(self.mesh):
      return self._jitted.lower(params, inputs_BxT, targets_BxT, neighbours_BxLxNxR)
