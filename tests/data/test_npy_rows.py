"""Row reads of .npy files (retro_jax.db.npy_rows): memory-mapped locally, byte ranges on gs://
(a local GCS emulator, tests/gcs_emulator.py), and the chunk store and neighbours read through it."""
import fsspec
import numpy as np
import pytest
import tiny_db

from retro_jax.build import neighbours as neighbours_lib
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import npy_rows


def test_remote_rows_equal_the_local_file(gcs, tmp_path):
  arr = np.arange(5000 * 3, dtype=np.int64).reshape(5000, 3) * 7 - 11
  np.save(tmp_path / "a.npy", arr)
  url = f"gs://{gcs.bucket}/x/a.npy"
  fs, path = fsspec.core.url_to_fs(url)
  fs.put(str(tmp_path / "a.npy"), path)
  local, remote = npy_rows.open_rows(tmp_path / "a.npy"), npy_rows.open_rows(url)
  assert isinstance(local, np.memmap) and isinstance(remote, npy_rows.RemoteRows)
  assert remote.shape == arr.shape and remote.dtype == arr.dtype and len(remote) == 5000
  rows = np.array([4999, 0, 1, 2, 17, 40, 40, 2500, 3], np.int64)  # unsorted, repeats, gaps
  np.testing.assert_array_equal(remote[rows], arr[rows])
  np.testing.assert_array_equal(remote[rows, :2], arr[rows, :2])
  np.testing.assert_array_equal(remote[10:4000:7], arr[10:4000:7])
  np.testing.assert_array_equal(remote[7], arr[7])
  with pytest.raises(IndexError, match="rows must be in"):
    remote[np.array([5000])]
  with pytest.raises(FileNotFoundError):
    npy_rows.open_rows(f"gs://{gcs.bucket}/x/missing.npy")


def test_chunk_store_and_neighbours_read_from_gcs(gcs, tmp_path_factory):
  db = tiny_db.get(tmp_path_factory)[0]
  url = f"gs://{gcs.bucket}/db"
  fs, path = fsspec.core.url_to_fs(url)
  for part in ("chunks", "neighbours"):
    fs.put(str(db / part), f"{path}/{part}", recursive=True)
  local, remote = chunk_store_lib.ChunkStore.open(db), chunk_store_lib.ChunkStore.open(url)
  ids = np.random.default_rng(0).integers(0, local.num_chunks, 50)
  np.testing.assert_array_equal(remote.tokens(ids), local.tokens(ids))
  np.testing.assert_array_equal(remote.neighbour_tokens(ids, 128), local.neighbour_tokens(ids, 128))
  assert isinstance(remote.shard_tokens(0), npy_rows.RemoteRows)  # never loaded whole
  nbr_l, off_l = neighbours_lib.open_neighbours(db, local)
  nbr_r, off_r = neighbours_lib.open_neighbours(url, remote)
  np.testing.assert_array_equal(off_l, off_r)
  for a, b in zip(nbr_l, nbr_r):
    np.testing.assert_array_equal(b[np.arange(len(a))], a)
