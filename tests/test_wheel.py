"""What a Beam worker installs from `--setup_file` runs a stage: the sdist setup.py builds (with
the embedder's weights in it), installed into a fresh virtual environment, embeds the tiny
database in worker processes to the bytes of the repository's own build.

The fresh environment gets its third-party packages from this one (a path line, so none of this
environment's own install of retro-jax is visible) and retro-jax from the sdist alone, built
without build isolation, as on a worker with no network to spare.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kw):
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  assert out.returncode == 0, (cmd, out.stdout[-3000:], out.stderr[-3000:])
  return out.stdout


@pytest.mark.slow  # keeps make test within 11 minutes; run by make test-slow
def test_sdist_installed_in_a_fresh_venv_embeds_like_the_repo(tmp_path_factory, tmp_path):
  db = tiny_db.get(tmp_path_factory)[0]
  dist = tmp_path / "dist"
  _run([sys.executable, "setup.py", "-q", "sdist", f"--dist-dir={dist}"], cwd=REPO)
  sdist = glob.glob(str(dist / "retro-jax-*.tar.gz"))[0]

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  # Nothing of the caller's PYTHONPATH (a checkout run as PYTHONPATH=$PWD): the sdist's code only.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  py = str(venv / "bin" / "python")
  site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
  with open(os.path.join(site, "third_party.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", sdist],
       cwd=str(tmp_path), env=env)
  where = _run([py, "-c", "import retro_jax; from retro_jax.retrieval import bert; "
                "print(retro_jax.__file__); print(bert.default_model_dir())"],
               cwd=str(tmp_path), env=env).split()
  assert all(w.startswith(str(venv)) for w in where), where  # the wheel's code and weights

  copy = tmp_path / "db"
  for sub in ("tokenizer", "chunks"):
    shutil.copytree(db / sub, copy / sub)
  _run([py, "-m", "retro_jax.build_db", f"--db={copy}", "--stages=embeddings",
        "--runner=DirectRunner", "--direct_running_mode=multi_processing",
        "--direct_num_workers=2"], cwd=str(tmp_path), env={**env, "JAX_PLATFORMS": "cpu"})
  want = sorted(glob.glob(str(db / "embeddings" / "shard-*.npy")))
  got = sorted(glob.glob(str(copy / "embeddings" / "shard-*.npy")))
  assert [os.path.basename(p) for p in got] == [os.path.basename(p) for p in want]
  for a, b in zip(want, got):
    assert np.array_equal(np.load(a), np.load(b)), b
