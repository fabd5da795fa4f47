"""gs:// paths the commands cannot serve fail with one clear line and write nothing locally."""
import os
import subprocess
import sys

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
