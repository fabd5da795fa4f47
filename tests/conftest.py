import os
import sys

import pytest

# libtpu is installed for ahead-of-time TPU compiles; keep the runtime on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every test can `import corpus_path` (tests/corpus_path.py: the fixed test corpus).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The longest files first: `make test` runs two xdist workers that take whole files, and a long
# file collected last leaves one worker idle while the other finishes it.
LONGEST_FIRST = ("tests/test_train_multiprocess.py", "tests/test_gcs_db.py",
                 "tests/model/test_sharding.py",
                 "tests/test_train.py", "tests/test_retrofit.py", "tests/test_train_step.py",
                 "tests/test_hardening.py", "tests/model/test_retro.py", "tests/test_controls.py")


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
