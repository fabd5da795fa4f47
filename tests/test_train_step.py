"""The optimiser schedule and the training step (loss masking, learning, donation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model import SIZES
from retro_jax.model.loss import cross_entropy
from retro_jax.model.partitioning import ShardingCollisionError, logical_to_mesh, make_mesh
from retro_jax.training import optim
from retro_jax.training.step import TrainStep

CFG = SIZES["test"]


def test_schedule_warms_up_from_1e_7_and_decays_to_a_tenth():
  lr = optim.learning_rate_schedule(2e-4, warmup_steps=750, total_steps=10_000)
  assert float(lr(0)) == pytest.approx(1e-7)
  assert float(lr(750)) == pytest.approx(2e-4)
  assert float(lr(10_000)) == pytest.approx(2e-5)
  assert float(lr(375)) == pytest.approx((1e-7 + 2e-4) / 2, rel=1e-3)
  with pytest.raises(ValueError):
    optim.learning_rate_schedule(1e-3, 100, 50)


def test_cross_entropy_ignores_pad_targets():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 1, 0]])
  total, count = cross_entropy(logits, targets, pad_id=0)
  assert float(count) == 7
  ref = -jax.nn.log_softmax(logits)
  want = sum(float(ref[b, t, targets[b, t]]) for b in range(2) for t in range(5)
             if targets[b, t] != 0)
  assert float(total) == pytest.approx(want, rel=1e-5)
  # Changing the logits at pad-target positions does not change the loss.
  other = logits.at[0, 3:].set(100.0)
  assert float(cross_entropy(other, targets, 0)[0]) == pytest.approx(float(total), rel=1e-6)


def test_training_step_learns_a_fixed_batch_and_donates_state():
  train = TrainStep(CFG, optim.adamw(3e-3, warmup_steps=1, total_steps=50),
                    make_mesh((1, 1, 1), jax.devices()[:1]))
  state = train.init()
  rng = np.random.default_rng(0)
  # The batch shape of test_gradient_accumulation_gives_the_whole_batch_step: one compiled step
  # (the run's JAX compilation cache, tests/conftest.py) serves both tests.
  toks = rng.integers(1, CFG.vocab_size, (4, 17)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "neighbours": rng.integers(1, CFG.vocab_size, (4, 2, 2, 16)).astype(np.int32)}
  losses = []
  for _ in range(15):
    old = state
    state, metrics = train.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 1.0
  assert jax.tree.leaves(old)[0].is_deleted()  # the previous state was donated
  model, _ = train.merge(state)
  assert model(batch["inputs"], batch["neighbours"]).shape == (4, 16, CFG.vocab_size)


def test_logical_rules_refuse_collisions_and_unknown_names():
  assert logical_to_mesh(("batch", "length", "act_embed")) == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None, None)
  with pytest.raises(ShardingCollisionError, match="fsdp"):
    logical_to_mesh(("embed", "enc_embed"))
  with pytest.raises(KeyError, match="no rule"):
    logical_to_mesh(("not_an_axis",))


def test_gradient_accumulation_gives_the_whole_batch_step():
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  rng = np.random.default_rng(1)
  toks = rng.integers(1, CFG.vocab_size, (4, 17)).astype(np.int32)
  toks[1, 9:] = 0  # padding: the micro-batches hold different token counts
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "neighbours": rng.integers(1, CFG.vocab_size, (4, 2, 2, 16)).astype(np.int32)}
  runs = []
  for accum in (1, 4):
    train = TrainStep(CFG, optim.adamw(3e-3, warmup_steps=1, total_steps=50), mesh,
                      grad_accum_steps=accum)
    state = train.init()
    runs.append([])
    for _ in range(2):
      state, m = train.step(state, batch)
      runs[-1].append((float(m["loss"]), float(m["grad_norm"]), float(m["tokens"])))
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    TrainStep(CFG, optim.adamw(), mesh, grad_accum_steps=0)
