import os
import shutil
import sys
import tempfile

import pytest

# libtpu is installed for ahead-of-time TPU compiles; keep the runtime on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every test can `import corpus_path` (tests/corpus_path.py: the fixed test corpus).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The longest files first (by their time in a whole run): `make test` runs three xdist workers
# on the two cores (a worker waiting on its subprocesses, a timeout or the GCS emulator leaves
# CPU to the others) that take whole files, and a long file collected last leaves the other
# workers idle while one finishes it. pytest.ini's --no-loadscope-reorder keeps this order (xdist
# would otherwise hand out the files with the most tests first).
LONGEST_FIRST = ("tests/test_train_multiprocess.py", "tests/test_gcs_db.py",
                 "tests/test_hardening.py", "tests/test_train.py", "tests/model/test_decode.py",
                 "tests/test_sharded_serving.py", "tests/test_beam_build.py",
                 "tests/retrieval/test_service_edits.py", "tests/test_train_step.py",
                 "tests/test_sample.py", "tests/test_retrofit.py", "tests/test_repair.py",
                 "tests/model/test_retro.py", "tests/test_flags.py", "tests/test_launch.py",
                 "tests/model/test_sharding.py", "tests/retrieval/test_global_index.py")


def pytest_configure(config):
  """One JAX compilation cache for the whole run, shared by the xdist workers and every subprocess
  (they inherit the variable): the trainers, evaluators and sharding workers that the tests start
  compile the same programs again and again. A fresh directory per run, removed at its end, so a
  test never reads an executable compiled by other code."""
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # an xdist worker: the controller made it; or the caller chose one
  config._retro_jax_cache = tempfile.mkdtemp(prefix="retro_jax_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = config._retro_jax_cache
  # XLA's CPU backend at LLVM optimisation level 0 for the whole run (workers and subprocesses
  # inherit it): the tests' programs are tiny, so compiling them dominates, and every check here
  # compares programs built the same way (equivalences, causality, resume), not their speed.
  flag = "--xla_backend_optimization_level=0"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  # What the xdist workers build once for all of them (tests/data/tiny_db.py's database).
  config._retro_jax_shared = tempfile.mkdtemp(prefix="retro_jax_test_shared_")
  os.environ["RETRO_JAX_TEST_SHARED_DIR"] = config._retro_jax_shared
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_compilation_cache_dir", config._retro_jax_cache)


def pytest_unconfigure(config):
  for d in (getattr(config, "_retro_jax_cache", None), getattr(config, "_retro_jax_shared", None)):
    if d:
      shutil.rmtree(d, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session")
def gcs_emulator():
  """A local GCS emulator for the session (tests/gcs_emulator.py); os.environ points at it."""
  import gcs_emulator as emulator_lib
  with emulator_lib.running() as emulator:
    yield emulator


@pytest.fixture
def gcs(gcs_emulator):
  """The session's GCS emulator with a fresh bucket for this test (`gcs.bucket`)."""
  gcs_emulator.new_bucket()
  return gcs_emulator
