"""gs:// paths that cannot be served fail with one clear line and write nothing locally; the
workdir lock on gs://. (Building, training, evaluating and sampling on gs://: test_gcs_db.py.)"""
import json
import os
import socket
import subprocess
import sys

import pytest

from retro_jax.training import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.parametrize("storage", ["closed_port", "no_emulator"])
def test_build_db_into_unreachable_gs_is_a_quick_one_line_error(tmp_path, storage):
  """No storage to reach: an emulator address where nothing listens, or (offline, no emulator, no
  credentials) Google's endpoint. One line, exit 2, no retries for minutes, nothing written."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_EMULATOR", "GOOGLE_",
                                                                  "TENSORSTORE_GCS"))}
  if storage == "closed_port":
    env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_closed_port()}"
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  p = subprocess.run([sys.executable, "-m", "retro_jax.build_db", "--db=gs://some-bucket/db"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --db=gs://some-bucket/db: "), p.stderr
  if storage == "closed_port":
    assert "cannot reach Cloud Storage at STORAGE_EMULATOR_HOST=http://127.0.0.1:" in lines[0]
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
