"""The training step: next-token cross-entropy, AdamW update, jitted with shardings and donation.

State is the pair (model, optimizer) split into a static graph definition and an nnx.State; the
step is `jax.jit(step, in_shardings=(state, batch), out_shardings=(state, metrics),
donate_argnums=0)` over a ("data", "fsdp", "model") mesh. With `grad_accum_steps` A > 1 the batch's
gradient is summed over A micro-batches in a `lax.scan` (the paper's batch on a slice too small to
hold it at once), then one optimizer update.

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
from retro_jax.model.partitioning import batch_sharding, logical_to_mesh, state_shardings


class TrainStep:
  """The sharded training step for one config, optimiser and mesh.

  `init()` creates the (model, optimizer) state directly in its shardings; `step(state, batch)`
  runs one jitted update (donating the old state); `lower(state, batch)` lowers it for
  ahead-of-time compilation from abstract arguments (jax.ShapeDtypeStruct with shardings).
  `wrt` selects the trained variables (retrofitting passes a filter of the new layers only).
  """

  def __init__(self, config: RetroConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
               wrt=nnx.Param, seed: int = 0, grad_accum_steps: int = 1):
    if grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1.")
    self.config, self.tx, self.mesh, self.wrt, self.seed = config, tx, mesh, wrt, seed
    self.grad_accum_steps = grad_accum_steps
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

    if self.grad_accum_steps == 1:
      grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, self.wrt), has_aux=True)
      (loss, count), grads = grad_fn(model)
    else:
      loss, count, grads = self._accumulated_grads(model, batch)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return nnx.state((model, optimizer)), metrics

  def _accumulated_grads(self, model, batch):
    """The whole batch's mean-loss gradient from `grad_accum_steps` micro-batches in a scan.

    Micro-batch a holds rows a, a+A, a+2A, ... (A micro-batches), so each keeps the batch's
    sharding over the devices (every device holds B/(devices*A) of its rows). Token-weighted: the
    summed losses and gradients are divided by the batch's whole token count at the end, the same
    loss as one step on the whole batch."""
    a = self.grad_accum_steps
    rows = batch["inputs"].shape[0]
    if rows % a:
      raise ValueError(f"batch of {rows} rows is not divisible by grad_accum_steps={a}.")
    rules = self.config.sharding_rules

    def split(x):  # [B, ...] -> [A, B/A, ...], micro-batch axis first
      x = x.reshape((rows // a, a) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, logical_to_mesh((None, "batch") + (None,) * (x.ndim - 2), rules))

    micro = {k: split(v) for k, v in batch.items()}
    pad_id = self.config.pad_id

    graphdef, diff, other = nnx.split(model, self.wrt, ...)

    def sum_loss(diff, mb):  # pure: nnx objects cannot cross the scan's trace boundary
      m = nnx.merge(graphdef, diff, other)
      total, count = cross_entropy(m(mb["inputs"], mb.get("neighbours")), mb["targets"], pad_id)
      return total, count

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

    def body(carry, mb):
      g_acc, total_acc, count_acc = carry
      (total, count), g = grad_fn(diff, mb)
      return (jax.tree.map(jnp.add, g_acc, g), total_acc + total, count_acc + count), None

    zeros = (jax.tree.map(jnp.zeros_like, diff), jnp.zeros((), jnp.float32),
             jnp.zeros((), jnp.float32))
    (g_sum, total, count), _ = jax.lax.scan(body, zeros, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    return total / denom, count, grads

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
