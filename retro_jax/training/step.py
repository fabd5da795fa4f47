"""The training step: next-token cross-entropy, AdamW update, jitted with shardings and donation.

State is the pair (model, optimizer) split into a static graph definition and an nnx.State; the
step is `jax.jit(step, in_shardings=(state, batch), out_shardings=(state, metrics),
donate_argnums=0)` over a ("data", "fsdp", "model") mesh.

A batch is a dict: "inputs" [B, T] int32, "targets" [B, T] int32 (positions whose target is the
pad id do not count), and optionally "neighbours" [B, L, N, R] int32 (absent: retrieval off).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retro_jax.model import Retro, RetroConfig
from retro_jax.model.loss import cross_entropy
from retro_jax.model.partitioning import batch_sharding, state_shardings


class TrainStep:
  """The sharded training step for one config, optimiser and mesh.

  `init()` creates the (model, optimizer) state directly in its shardings; `step(state, batch)`
  runs one jitted update (donating the old state); `lower(state, batch)` lowers it for
  ahead-of-time compilation from abstract arguments (jax.ShapeDtypeStruct with shardings).
  `wrt` selects the trained variables (retrofitting passes a filter of the new layers only).
  """

  def __init__(self, config: RetroConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
               wrt=nnx.Param, seed: int = 0):
    self.config, self.tx, self.mesh, self.wrt, self.seed = config, tx, mesh, wrt, seed
    abstract = nnx.eval_shape(self._create)
    self.graphdef, self.abstract_state = nnx.split(abstract)
    self.state_sharding = state_shardings(self.abstract_state, mesh, config.sharding_rules)
    self._jitted: dict[tuple[str, ...], Any] = {}

  def _create(self):
    model = Retro(self.config, rngs=nnx.Rngs(self.seed))
    return model, nnx.Optimizer(model, self.tx, wrt=self.wrt)

  def init(self):
    with jax.set_mesh(self.mesh):
      return jax.jit(lambda: nnx.state(self._create()), out_shardings=self.state_sharding)()

  def merge(self, state) -> tuple[Retro, nnx.Optimizer]:
    return nnx.merge(self.graphdef, state)

  def batch_sharding(self, batch: dict) -> dict:
    return {k: batch_sharding(self.mesh, v.ndim, self.config.sharding_rules)
            for k, v in batch.items()}

  def _step(self, state, batch):
    model, optimizer = nnx.merge(self.graphdef, state)
    pad_id = self.config.pad_id

    def loss_fn(model):
      logits = model(batch["inputs"], batch.get("neighbours"))
      total, count = cross_entropy(logits, batch["targets"], pad_id)
      return total / jnp.maximum(count, 1.0), count

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, self.wrt), has_aux=True)
    (loss, count), grads = grad_fn(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return nnx.state((model, optimizer)), metrics

  def jitted(self, batch: dict):
    key = tuple(sorted(batch))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
          self._step, in_shardings=(self.state_sharding, self.batch_sharding(batch)),
          out_shardings=(self.state_sharding, NamedSharding(self.mesh, P())), donate_argnums=0)
    return self._jitted[key]

  def step(self, state, batch: dict):
    with jax.set_mesh(self.mesh):
      return self.jitted(batch)(state, batch)

  def lower(self, state, batch: dict):
    with jax.set_mesh(self.mesh):
      return self.jitted(batch).lower(state, batch)
