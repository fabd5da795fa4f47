"""One writer per run: a trainer holds `WORKDIR/lock.json` while it runs.

The lock is created exclusively: locally with O_CREAT | O_EXCL, on gs:// as an object written with
the generation precondition `if_generation_match=0` (the write fails if the object exists). It
holds {pid, host, start time, command}. A second trainer on the same workdir is refused with
`WorkdirLockedError` naming the first. The run removes its lock when it ends (also on an error or
SIGTERM). A lock left by a killed run is stale: on the same host, when its pid is no longer running
(or is now another process), it is taken over with a note; otherwise (another host, gs://) delete
the lock file by hand once that run is known to be gone, as the message says.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys

from etils import epath

from retro_jax.errors import UserError

LOCK = "lock.json"
# A lock without a readable record is written whole or not at all (above), so one this old is
# damaged (a disk that filled, a lock from an older version killed mid-write): taken over.
UNREADABLE_STALE_S = 10.0


class WorkdirLockedError(UserError, RuntimeError):
  """Another run holds the workdir."""


def _proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _record() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
          "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:500]}


def _is_stale(other: dict) -> bool:
  """A lock of a process of this host that is gone (or whose pid now names another process)."""
  if other.get("host") != socket.gethostname():
    return False
  pid = int(other.get("pid", -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return other.get("proc_start") is not None and _proc_start(pid) != other["proc_start"]


def _create_local(path: epath.Path, data: bytes) -> bool:
  """Written whole beside the lock, then linked to its name (the link fails if the lock exists):
  no reader ever sees a lock without its record."""
  tmp = f"{os.fspath(path)}.{os.getpid()}.{socket.gethostname()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, os.fspath(path))
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)
  return True


def _create_gcs(path: epath.Path, data: bytes) -> bool:
  """gs://BUCKET/OBJECT created only if absent (generation precondition 0)."""
  from google.api_core import exceptions as gcs_exceptions  # here: local runs skip its import
  from google.cloud import storage
  bucket, _, name = str(path)[len("gs://"):].partition("/")
  blob = storage.Client().bucket(bucket).blob(name)
  try:
    blob.upload_from_string(data, content_type="application/json", if_generation_match=0)
  except gcs_exceptions.PreconditionFailed:
    return False
  return True


def _unreadable_age_s(path: epath.Path) -> float | None:
  """Seconds since an unreadable lock was last written (None: readable, or gone)."""
  try:
    json.loads(path.read_text())
    return None
  except (OSError, ValueError):
    try:
      return max(0.0, datetime.datetime.now().timestamp() - path.stat().mtime)
    except OSError:
      return None


def _create(path: epath.Path, data: bytes) -> bool:
  if str(path).startswith("gs://"):
    return _create_gcs(path, data)
  return _create_local(path, data)


class WorkdirLock:
  """Held by a run; `release()` removes the lock if it is still this run's."""

  def __init__(self, path: epath.Path, record: dict):
    self.path, self.record = path, record

  def release(self) -> None:
    try:
      if json.loads(self.path.read_text()) == self.record:
        self.path.unlink()
    except (OSError, ValueError):
      pass

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str | os.PathLike) -> WorkdirLock:
  """Takes WORKDIR/lock.json, or raises WorkdirLockedError naming the run that holds it."""
  path = epath.Path(workdir) / LOCK
  path.parent.mkdir(parents=True, exist_ok=True)
  record = _record()
  data = json.dumps(record, indent=1).encode()
  for _ in range(2):
    if _create(path, data):
      return WorkdirLock(path, record)
    try:
      other = json.loads(path.read_text())
    except (OSError, ValueError):
      other = {}
    age = _unreadable_age_s(path) if not other else None
    if age is not None and age >= UNREADABLE_STALE_S:
      print(f"note: {path} holds no readable record (written {age:.0f} s ago: damaged, or left "
            "by a run killed while taking it); taking it over", file=sys.stderr, flush=True)
      path.unlink()
      continue
    if age is not None:
      raise WorkdirLockedError(
          f"{path} holds no readable record and was written {age:.0f} s ago; if no run uses "
          f"{workdir}, delete it (it is taken over after {UNREADABLE_STALE_S:.0f} s)")
    if other and _is_stale(other):
      print(f"note: {path} was left by pid {other.get('pid')} (started "
            f"{other.get('start_time')}), which is no longer running; taking it over",
            file=sys.stderr, flush=True)
      path.unlink()
      continue
    raise WorkdirLockedError(
        f"{workdir} is in use by another run (pid {other.get('pid', '?')} on host "
        f"{other.get('host', '?')}, started {other.get('start_time', '?')}: "
        f"{other.get('command', '?')}); wait for it to end or use another --workdir (if that run "
        f"is gone, delete {path})")
  raise WorkdirLockedError(f"could not take {path}; delete it if no run uses {workdir}")
