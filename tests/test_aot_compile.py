"""Ahead-of-time compile for a TPU topology with libtpu on this CPU (tiny config, 4 chips)."""
import pytest

pytest.importorskip("libtpu")

from retro_jax.training.aot import compile_step  # noqa: E402


def test_tiny_training_step_compiles_for_v5e_2x2():
  res = compile_step("tiny", "v5e:2x2", per_chip_batch=2, seq_len=64, mesh_shape=(1, -1, 1),
                     dtype="bfloat16", remat=True, retrieval=True, q_block=32)
  assert res["chips"] == 4 and res["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
  assert 0 < res["per_chip_gib"] < res["hbm_gib"]
  assert res["xla_tflops_per_step"] > 0
