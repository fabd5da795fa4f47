"""Counts this process's host collectives, by phase of the training loop: the check that nothing
on the step path waits for the other hosts (tests/test_train_multiprocess.py).

A host collective is a call that returns only when every process has made it: multihost_utils'
`process_allgather`, `broadcast_one_to_all`, `sync_global_devices` and `assert_equal`, and the
coordination service's `wait_at_barrier` (orbax's checkpoint barriers). `install()` wraps them
(once per process, when RETRO_JAX_COUNT_HOST_SYNCS=1: the wrappers only count, then call the
original); a call made inside another counted call is not counted again. Calls on the loop's
thread are counted under the phase it has set (`phase("step")`, `phase("checkpoint")`, ...);
calls on other threads (orbax's background commit of an async checkpoint) under "background".
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading

from jax._src.lib import _jax
from jax.experimental import multihost_utils

ENV = "RETRO_JAX_COUNT_HOST_SYNCS"
_MULTIHOST = ("process_allgather", "broadcast_one_to_all", "sync_global_devices", "assert_equal")

_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
_local = threading.local()
_state = {"installed": False, "phase": "setup", "thread": None}


def enabled() -> bool:
  return os.environ.get(ENV, "") not in ("", "0")


def installed() -> bool:
  return _state["installed"]


def _counting(fn, name: str):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    depth = getattr(_local, "depth", 0)
    if depth == 0:
      on_loop = threading.current_thread() is _state["thread"]
      where = _state["phase"] if on_loop else "background"
      with _lock:
        _counts[(where, name)] += 1
    _local.depth = depth + 1
    try:
      return fn(*args, **kwargs)
    finally:
      _local.depth = depth
  return wrapper


def install() -> None:
  """Wraps the host collectives (idempotent); the calling thread is the loop's."""
  _state["thread"] = threading.current_thread()
  if _state["installed"]:
    return
  for name in _MULTIHOST:
    setattr(multihost_utils, name, _counting(getattr(multihost_utils, name), name))
  client = _jax.DistributedRuntimeClient
  client.wait_at_barrier = _counting(client.wait_at_barrier, "wait_at_barrier")
  _state["installed"] = True


@contextlib.contextmanager
def phase(name: str):
  """Counts the loop thread's calls inside the block under `name`."""
  before, _state["phase"] = _state["phase"], name
  try:
    yield
  finally:
    _state["phase"] = before


def take() -> dict[str, int]:
  """{phase: calls} since the last take (every phase seen so far, zeros included)."""
  with _lock:
    out = {where: 0 for where, _ in _counts}
    for (where, _), n in _counts.items():
      out[where] += n
    for key in _counts:
      _counts[key] = 0
  return out
