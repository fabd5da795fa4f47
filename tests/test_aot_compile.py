"""Ahead-of-time compile for a TPU topology with libtpu on this CPU (tiny config, 4 chips): the
training step, the evaluation step and the sampling programs."""
import json
import subprocess
import sys
from pathlib import Path

import libtpu  # noqa: F401  (setup.py's `tpu` extra, which `make test` installs: no libtpu, no test)
import pytest

from retro_jax.model import SIZES
from retro_jax.training.aot import compile_eval_step, compile_step

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # keeps make test within CI time; run by make test-slow
def test_tiny_training_step_compiles_for_v5e_2x2():
  cfg = SIZES["test"].replace(dtype="bfloat16", remat=True, attention_q_block=32)
  res = compile_step(cfg, "v5e:2x2", seq_len=64, mesh_shape=(1, -1, 1), global_batch=8,
                     size="test")
  assert res["chips"] == 4 and res["per_chip_batch"] == 2  # global batch 8 over 4 chips
  assert res["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
  assert 0 < res["per_chip_gib"] < res["hbm_gib"]
  assert res["xla_tflops_per_step"] > 0


def test_two_slices_get_a_hybrid_mesh_with_the_data_axis_across_slices():
  from retro_jax.model.partitioning import make_mesh
  from retro_jax.training.aot import topology_devices
  _, devices = topology_devices("v5e:2x2", num_slices=2)
  mesh = make_mesh((1, -1, 1), devices)  # one slice's shape; the slices multiply "data"
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
  slice_of = [[d.slice_index for d in row] for row in mesh.devices[:, :, 0]]
  assert slice_of == [[0, 0, 0, 0], [1, 1, 1, 1]]  # only "data" crosses the DCN
  with pytest.raises(ValueError, match="devices per slice"):
    make_mesh((1, 8, 1), devices)


def test_tiny_evaluation_step_compiles_sharded_for_v5e_2x2():
  cfg = SIZES["test"].replace(dtype="bfloat16", attention_q_block=32)
  res = compile_eval_step(cfg, "v5e:2x2", seq_len=64, mesh_shape=(1, -1, 1), per_chip_batch=2,
                          size="test")
  assert res["program"] == "evaluate" and res["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
  assert res["global_batch"] == 8  # 2 windows on each of the 4 batch shards
  # float32 weights FSDP over 4 chips: the arguments hold about a quarter of them (the rules
  # replicate the small norms and relative-position projections).
  assert res["params"] * 4 / 4 / 2**30 < res["argument_gib"] < res["params"] * 4 / 2**30
  assert 0 < res["per_chip_gib"] < res["hbm_gib"] and res["xla_tflops_per_step"] > 0


def test_sampling_programs_compile_from_the_command_line(tmp_path):
  out = tmp_path / "aot.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.aot_compile", "--program=sample",
       "--config=experiments/tiny.py", "--topology=v5e:2x2", "--config.mesh=-1,1,1",
       "--config.seq_len=128", f"--out={out}"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sampling (prefill of 64 tokens, decode step over a 128-token cache)" in proc.stdout
  assert "fits" in proc.stdout
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert row["program"] == "sample" and row["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
  assert row["global_batch"] == 4 and row["seq_len"] == 128 and row["prompt_len"] == 64
  assert row["per_chip_gib"] == max(row["step_gib"], row["prefill_gib"]) < row["hbm_gib"]
  assert 0 < row["cache_gib"] < row["step_gib"]
  assert row["provenance"]["command"].startswith("python -m retro_jax.aot_compile --program=sample")


def test_one_slice_mesh_follows_the_torus_and_cpu_keeps_the_device_order():
  import jax
  import numpy as np
  from retro_jax.model.partitioning import make_mesh
  from retro_jax.training.aot import topology_devices

  def hops(grid):  # chip-to-chip distances along the fsdp axis, the ring closed
    c = [np.array(d.coords) for d in grid.flat]
    return [int(np.abs(a - b).sum()) for a, b in zip(c, c[1:] + c[:1])]
  _, devices = topology_devices("v5e:4x4")
  mesh = make_mesh((1, -1, 1), devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "model": 1}
  assert hops(mesh.devices) == [1] * 16  # a ring of neighbouring chips through the 4x4
  assert max(hops(make_mesh((1, -1, 1), devices, topology_aware=False).devices)) > 1
  cpu = make_mesh((-1, 1, 1))  # no topology: the devices in their order
  assert [d.id for d in cpu.devices.flat] == [d.id for d in jax.devices()]
