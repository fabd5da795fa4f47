"""Fixtures shared by the loader and neighbour tests: one tiny real database per test process."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_db  # noqa: E402

from retro_jax.db import chunk_store as chunk_store_lib  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def store(db):
  return chunk_store_lib.ChunkStore.open(db)
