"""gs:// paths the commands cannot serve fail with one clear line and write nothing locally."""
import json
import os
import subprocess
import sys

import pytest

from retro_jax.training import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_db_into_gs_is_a_one_line_error_and_writes_no_local_gs_dir(tmp_path):
  p = subprocess.run([sys.executable, "-m", "retro_jax.build_db", "--db=gs://some-bucket/db"],
                     cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --db=gs://some-bucket/db"), p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "gs:").exists() and os.listdir(tmp_path) == []


def test_workdir_lock_on_gs_refuses_a_second_run_and_is_released(gcs):
  workdir = f"gs://{gcs.bucket}/run"
  lock = workdir_lock.acquire(workdir)
  assert gcs.exists("run/lock.json")
  # This process's lock is live: a second acquire (another trainer) is refused, naming it.
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    workdir_lock.acquire(workdir)
  lock.release()
  assert not gcs.exists("run/lock.json")
  # A lock held by a run on another host is never taken over (its liveness is unknown here).
  gcs.client.bucket(gcs.bucket).blob("run/lock.json").upload_from_string(
      json.dumps({"pid": 7, "host": "other-host", "start_time": "t0", "command": "train"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 7 on host other-host"):
    workdir_lock.acquire(workdir)
  assert json.loads(gcs.read("run/lock.json"))["host"] == "other-host"
