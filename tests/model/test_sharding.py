"""One training step on 8 fake CPU devices gives the single-device loss and parameters.

Two AdamW steps (lr 1e-3) on the tiny config. Tolerances: the initial state identical; losses
within 1e-5 relative; the whole update (parameters and optimiser moments) within 1e-3 relative L2 of
the single-device update, and every element within 5e-4 absolute (half an lr). Only reduction order
differs across shards; Adam's m / sqrt(v) magnifies that on the few elements whose gradient is
near zero (the relative-position projections), which is why the element-wise bound is not 1e-6.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("meshes", [
    # data x fsdp x model all > 1: every sharding rule at work at once.
    ("2x2x2",),
    # pure data parallel and data x fsdp: each compile takes a while, so in make test-slow.
    pytest.param(("8x1x1", "2x4x1"), marks=pytest.mark.slow),
])
def test_meshes_match_single_device(meshes):
  worker = Path(__file__).with_name("sharding_worker.py")
  proc = subprocess.run([sys.executable, str(worker), *meshes],
                        capture_output=True, text=True, timeout=600,
                        cwd=Path(__file__).parents[2])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["mesh"] for r in results] == [[int(n) for n in m.split("x")] for m in meshes]
  for r in results:
    for got, want in zip(r["losses"], r["ref_losses"]):
      assert abs(got - want) <= 1e-5 * abs(want), r
    assert r["init_max_diff"] == 0.0, r
    assert r["update_rel_err"] <= 1e-3, r
    assert r["state_max_diff"] <= 5e-4, r
