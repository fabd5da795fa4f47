r"""The training loop: any experiment, on the jitted sharded step, with resumable checkpoints.

Runs the jitted, sharded training step (retro_jax.training.step) on the grain loader
(retro_jax.training.input_pipeline) over the experiment's database and writes, in WORKDIR:
  config.json          the experiment, the resolved RetroConfig, the database, parameter counts
  checkpoints/<step>/  orbax: model, optimizer, data-iterator state, meta (retro_jax.training.checkpoint),
                       every `checkpoint_every` steps, at the end, and on SIGTERM (preemption)
  metrics.jsonl        one line per logged step: loss (nats/token), bpb, tokens/s, MFU,
                       learning rate, gradient norm, step time, and where the interval's wall
                       time went: input wait, checkpoint writes, goodput (`StepMetrics`)
  tensorboard/         the same scalars as TensorBoard events (tensorboardX; on gs:// through
                       google-cloud-storage, flushed at every checkpoint)
  logs/host-<p>.txt    what process p did: start or resume, checkpoints, preemption, the
                       compilation cache's hits, the run's goodput
  compile_cache/       JAX's persistent compilation cache (`compile_cache`: another directory,
                       or none), so that a rerun or a resumed run does not compile again
  profile/             a jax.profiler trace of the steps named by `profile_steps`
WORKDIR and the database may be local or gs:// (etils.epath, orbax/tensorstore, and ranged row reads
of the database, retro_jax.db.npy_rows); on gs:// metrics.jsonl is rewritten whole at each logged
step (objects cannot be appended to).
Running the same command again resumes from the latest checkpoint (model, optimiser and data order:
the following losses equal those of an uninterrupted run). A NaN or infinite loss stops the run with
NonFiniteLossError before anything else is saved, so the last good checkpoint stays the latest.
On a pod every host runs the same command (launch/tpu_run.sh); `--distributed` (default: when the
TPU environment names several workers) calls jax.distributed.initialize() first. Each host reads
only its rows of every global batch (input_pipeline.ProcessRows). Preemption is one decision for
all hosts, made without a host collective on the step path: with jax.distributed, JAX's preemption
sync manager catches SIGTERM on any host and agrees on a step in the background through the
coordination service; orbax's `reached_preemption(step)` (JAX's reached_preemption_sync_point),
called at every step, is then True on every host at that same step, where all save and exit 0. A
single process without the coordination service stops on SIGTERM at the next step (a Python
handler, installed only then, so that it never displaces JAX's notifier).
"""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from tensorboardX import SummaryWriter
from tqdm import tqdm

from retro_jax import errors
from retro_jax.db import chunk_store as chunk_store_lib
from retro_jax.db import layout, verify
from retro_jax.db.layout import write_json_atomic
from retro_jax.model import Retro
from retro_jax.model.partitioning import make_mesh
from retro_jax.model.retro import count_params
from retro_jax.training import checkpoint as ckpt_lib
from retro_jax.training import experiment, host_syncs, workdir_lock
from retro_jax.training import input_pipeline as loader
from retro_jax.training.retrofit import RETRIEVAL_PARAMS, load_baseline_into
from retro_jax.training.step import TrainStep

# Peak dense bf16 FLOP/s per device, for MFU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainSetupError(errors.UserError, ValueError):
  """An experiment that does not fit its database or the workdir's checkpoints."""


class CheckpointWriteError(errors.UserError, RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); the previous one is kept."""


def want_distributed(mode: str, num_processes: int | None = None) -> bool:
  """--distributed: 'true', 'false', or 'auto' (when TPU_WORKER_HOSTNAMES lists several hosts,
  MEGASCALE_NUM_SLICES several slices, or --num_processes is above 1)."""
  if mode != "auto":
    return mode == "true"
  if num_processes is not None and num_processes > 1:
    return True
  if int(os.environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:  # multi-slice, even 1 host each
    return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def parse_profile_steps(spec: str, start: int) -> tuple[int, int] | None:
  """`profile_steps` -> (first, last) step to trace, or None. "A,B": steps A to B; "N": the N
  steps after the run's (or the resumed run's) first step, which compiles; "": none."""
  spec = str(spec).strip()
  if not spec:
    return None
  try:
    parts = [int(x) for x in spec.split(",")]
  except ValueError:
    parts = []
  if len(parts) == 1 and parts[0] >= 1:
    return start + 2, start + 1 + parts[0]
  if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
    return parts[0], parts[1]
  raise TrainSetupError(f"profile_steps={spec!r}; expected 'FIRST,LAST' (1 <= FIRST <= LAST), a "
                        f"step count N, or '' (no trace)")


class CompileCache:
  """JAX's persistent compilation cache for the run, and its hits and misses (counted from JAX's
  monitoring events, for the host log).

  `compile_cache`: "auto" -> WORKDIR/compile_cache (on gs:// in the bucket; JAX writes it from
  process 0 only), unless the caller already set jax_compilation_cache_dir
  (JAX_COMPILATION_CACHE_DIR), which is kept; "none" -> no cache; anything else: that directory.
  Executables that compiled in under `compile_cache_min_compile_s` are not stored. JAX's settings
  are restored by `close` (a later run in the same process sets its own)."""

  EVENTS = {"/jax/compilation_cache/cache_hits": "hits",
            "/jax/compilation_cache/cache_misses": "misses"}

  def __init__(self, c, workdir):
    self.saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_enable_compilation_cache",
        "jax_persistent_cache_min_compile_time_secs")}
    self.counts = {"hits": 0, "misses": 0}
    if c.compile_cache == "none":
      self.path = None
      jax.config.update("jax_enable_compilation_cache", False)
    else:
      self.path = (self.saved["jax_compilation_cache_dir"] if c.compile_cache == "auto"
                   and self.saved["jax_compilation_cache_dir"] else
                   str(epath.Path(workdir) / "compile_cache") if c.compile_cache == "auto"
                   else c.compile_cache)
      jax.config.update("jax_enable_compilation_cache", True)
      jax.config.update("jax_compilation_cache_dir", self.path)
      jax.config.update("jax_persistent_cache_min_compile_time_secs",
                        float(c.compile_cache_min_compile_s))
    compilation_cache.reset_cache()  # read the settings again at the next compile
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event in self.EVENTS:
      self.counts[self.EVENTS[event]] += 1

  def describe(self) -> str:
    if self.path is None:
      return "compilation cache: none"
    return (f"compilation cache {self.path}: {self.counts['hits']} hits, "
            f"{self.counts['misses']} misses")

  def close(self) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)
    for k, v in self.saved.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


class Profile:
  """A jax.profiler trace (TensorBoard's profile plugin, xplane.pb) of steps first..last into
  WORKDIR/profile, on every process (one file per host)."""

  def __init__(self, steps: tuple[int, int] | None, workdir, host_log):
    self.steps, self.dir, self.host_log = steps, epath.Path(workdir) / "profile", host_log
    self.on, self.first = False, None

  def before(self, step: int) -> None:
    """Before step `step` runs (a run resumed inside the range traces the rest of it)."""
    if self.steps and self.first is None and self.steps[0] <= step <= self.steps[1]:
      jax.profiler.start_trace(str(self.dir))
      self.on, self.first = True, step

  def after(self, step: int, outputs, last: bool) -> None:
    """After step `step` was dispatched; its outputs are waited for before the trace ends."""
    if self.on and (step >= self.steps[1] or last):
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.on = False
      self.host_log(f"profile of steps {self.first}-{step} written to {self.dir}")


class HostLog:
  """WORKDIR/logs/host-<p>.txt: one timestamped line per event of this process (rewritten whole on
  gs://, appended locally)."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / "logs" / f"host-{jax.process_index()}.txt"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

  def __call__(self, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    self.lines.append(f"{stamp} {message}\n")
    self.path.write_text("".join(self.lines))


def peak_flops(c, device) -> float:
  if c.peak_flops:
    return float(c.peak_flops)
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return 0.0


def bytes_per_token(store) -> float:
  """UTF-8 bytes per token of the whole store (for the training bpb), from its manifest's totals
  (a store finalized before they were kept: from every document table)."""
  total = store.manifest.get("num_utf8_bytes")
  if total is None:
    total = int(store.doc_num_bytes.sum())
  return float(total) / max(int(store.manifest["num_tokens"]), 1)


class MetricsWriter:
  """metrics.jsonl (truncated to the resumed step on restart) and TensorBoard, on process 0.

  Locally metrics.jsonl is appended line by line; on gs:// (no appends to objects) the object is
  rewritten whole, at the first record, then at most every `upload_every_s` seconds, at every
  checkpoint (`flush`) and at the end, so a step never waits on an upload of the whole log.
  TensorBoard events are flushed at every checkpoint and at the end."""

  def __init__(self, workdir, resume_step: int, enabled: bool, upload_every_s: float = 60.0):
    self.enabled, self.upload_every_s = enabled, upload_every_s
    if not enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    if self.path.exists():  # Drop lines logged after the checkpoint we resume from.
      kept = [l for l in self.path.read_text().splitlines()
              if l.strip() and json.loads(l)["step"] <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))
    else:
      kept = []
    self.remote = "://" in str(self.path)
    if self.remote:
      self._lines = [l + "\n" for l in kept]
      self._uploaded = -math.inf
    else:
      self._f = self.path.open("a")
    try:
      self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # pragma: no cover
      logging.warning("tensorboardX missing: no TensorBoard events")
      self.tb = None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    if self.remote:
      self._lines.append(json.dumps(record) + "\n")
      if time.monotonic() - self._uploaded >= self.upload_every_s:
        self._upload()
    else:
      self._f.write(json.dumps(record) + "\n")
      self._f.flush()
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(f"train/{k}", v, record["step"])

  def _upload(self) -> None:
    self.path.write_text("".join(self._lines))
    self._uploaded = time.monotonic()

  def flush(self) -> None:
    if self.enabled and self.remote:
      self._upload()
    if self.enabled and self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self.remote:
        self._upload()
      else:
        self._f.close()
      if self.tb is not None:
        self.tb.close()


def _check_resume(prev_meta: dict, cfg, db: str, workdir, step: int) -> None:
  """The checkpoint being resumed was made by the same model on a database with the same
  tokenizer (else a clear error instead of orbax's shape error or a silently wrong run)."""
  have = json.loads(json.dumps(prev_meta.get("model_config", {})))
  want = json.loads(json.dumps(cfg.to_dict()))
  diff = [f"{k} {have[k]} -> {want[k]}" for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  if diff:
    raise TrainSetupError(f"{workdir} holds a checkpoint (step {step}) of another model "
                          f"({'; '.join(diff)}); resume with its settings or use another --workdir")
  verify.check_checkpoint_tokenizer(prev_meta.get("db_tokenizer"), prev_meta.get("db"), db,
                                    f"{workdir} (step {step})")


def _remove_partial_checkpoints(directory, settle_s: float = 0.0) -> list[str]:
  """Deletes orbax's temporary directories of a checkpoint write that failed. `settle_s`: for up
  to that long, until two checks in a row find none, again (a failed write's threads may still
  be creating files as they give up)."""
  directory = epath.Path(directory)
  gone, clean, deadline = [], 0, time.monotonic() + settle_s
  while True:
    found = [p for p in (directory.iterdir() if directory.exists() else ())
             if ".orbax-checkpoint-tmp" in p.name]
    for p in found:
      try:
        p.rmtree() if p.is_dir() else p.unlink()
      except OSError:  # written into while removed: the next round
        continue
      gone.append(p.name)
    clean = 0 if found else clean + 1
    if clean >= 2 or time.monotonic() >= deadline:
      return gone
    time.sleep(0.1)


def _check_space(directory, state, step: int, last_good: int, factor: int = 1) -> None:
  """Refuses to start a checkpoint write that cannot fit on a local disk (orbax would fail in its
  background threads, with one traceback per array, and leave a temporary directory). At the
  start of a run `state` is the model's (abstract) state and `factor` 3 counts the optimizer's."""
  if "://" in str(directory):
    return
  nbytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
  need = factor * nbytes + (4 << 20)
  free = shutil.disk_usage(os.fspath(directory)).free
  if free < need:
    what = "a first checkpoint" if factor > 1 else f"the step-{step} checkpoint"
    raise CheckpointWriteError(
        f"no room for {what} in {directory}: it needs ~{need >> 20} MiB, {free >> 20} MiB are "
        f"free; free space (the last good checkpoint is step {last_good}) and rerun the same "
        f"command")


# What a failing checkpoint write's background threads (orbax's, tensorstore's callbacks) report
# as they fail and as the process ends: the disk, and the event loops closed under them.
_WRITER_NOISE = errors.DISK_FULL_TEXT + (
    "Event loop is closed", "cannot schedule new futures after shutdown",
    "sys.meta_path is None")


class _QuietDiskFull(std_logging.Filter):
  """Drops the log records and thread or callback tracebacks of a failing checkpoint write's
  background threads (the run then stops with one `CheckpointWriteError` saying why)."""

  def __init__(self):
    super().__init__()
    self.seen = 0
    self.write_failed = False  # set as a failed write's temporary directories are removed
    self._hooks = None

  def noise(self, text: str) -> bool:
    """Writer noise: the disk-full texts; once one was seen, also any failure naming a write's
    temporary directory (removed under the writers still finishing, they fail to find it)."""
    if any(m in text for m in _WRITER_NOISE):
      self.seen += 1
      return True
    return (self.seen > 0 or self.write_failed) and ".orbax-checkpoint-tmp" in text

  def filter(self, record) -> bool:
    return not self.noise(
        record.getMessage() + (str(record.exc_info[1]) if record.exc_info else ""))

  def is_noise(self, exc: BaseException | None) -> bool:
    if exc is not None and errors.is_disk_full(exc):
      self.seen += 1
      return True
    return exc is not None and self.noise(str(exc))

  def install_hooks(self) -> None:
    """Background threads' exceptions (threading.excepthook) and those of callbacks run from
    native threads (printed through sys.excepthook) that are writer noise are dropped too."""
    previous = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    self._hooks = previous

    def excepthook(t, v, tb):
      if not self.is_noise(v):
        previous[0](t, v, tb)

    def thread_hook(args):
      if not self.is_noise(args.exc_value):
        previous[1](args)

    def unraisable_hook(u):
      if not self.is_noise(u.exc_value):
        previous[2](u)
    sys.excepthook, threading.excepthook, sys.unraisablehook = (
        excepthook, thread_hook, unraisable_hook)

  def remove_hooks(self) -> None:
    if self._hooks is not None:
      sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks
      self._hooks = None


def run(c, workdir: str, *, distributed: bool | dict = False,
        progress: bool = True) -> dict[str, Any]:
  """Trains `c` (an experiment ConfigDict) in `workdir`, holding its lock
  (retro_jax.training.workdir_lock); returns the last logged metrics.

  `distributed`: True calls jax.distributed.initialize() (auto-detected on TPU); a dict gives its
  arguments (coordinator_address, num_processes, process_id: a multi-process CPU run)."""
  if distributed:
    jax.distributed.initialize(**(distributed if isinstance(distributed, dict) else {}))
  if host_syncs.enabled():
    host_syncs.install()
  layout.make_dir(workdir, "--workdir")  # one line when it cannot be (a file, read-only, ...)
  lock = workdir_lock.acquire(workdir) if jax.process_index() == 0 else None
  quiet = _QuietDiskFull()
  # absl's root handler hands records to its inner handler without applying its own filters.
  handlers = [x for h in std_logging.getLogger().handlers
              for x in (h, getattr(h, "_current_handler", None)) if x is not None]
  for h in handlers:
    h.addFilter(quiet)
  quiet.install_hooks()
  write_failed = False
  cache = None
  try:
    c = experiment.with_defaults(c)
    cache = CompileCache(c, workdir)  # before anything compiles
    return _run(c, workdir, progress=progress, cache=cache, quiet=quiet)
  except CheckpointWriteError:
    # orbax's and tensorboard's background writers report the full disk again as the process
    # ends (asyncio's "exception was never retrieved", atexit flushes): keep those quiet too.
    write_failed, handlers = True, []
    raise
  finally:
    if cache is not None:
      cache.close()
    if not write_failed:
      quiet.remove_hooks()
    for h in handlers:
      h.removeFilter(quiet)
    if lock is not None:
      lock.release()


def _keep_disk_full(fn, failed: list) -> None:
  """Calls fn(); a full disk is appended to `failed` (reported once, after), anything else raises."""
  try:
    fn()
  except Exception as e:  # noqa: BLE001
    if not errors.is_disk_full(e):
      raise
    failed.append(e)


def _check_setup(c, cfg, store) -> None:
  """The experiment fits the database and the process count (before anything is read)."""
  db_vocab = int(store.manifest["tokenizer"]["vocab_size"])
  if db_vocab > cfg.vocab_size:
    raise TrainSetupError(f"the database {c.db} has a {db_vocab}-token vocabulary but the model "
                          f"only {cfg.vocab_size}; set "
                          f"--config.model_overrides.vocab_size={db_vocab}.")
  if store.chunk_size != cfg.chunk_size:
    raise TrainSetupError(f"database chunk size {store.chunk_size} != model chunk_size "
                          f"{cfg.chunk_size}.")
  if c.global_batch % jax.process_count():
    raise TrainSetupError(f"global_batch={c.global_batch} is not divisible by "
                          f"{jax.process_count()} processes.")
  if c.grad_accum_steps < 1 or c.global_batch % c.grad_accum_steps:
    raise TrainSetupError(f"grad_accum_steps={c.grad_accum_steps} must be >= 1 and divide "
                          f"global_batch={c.global_batch}.")
  parse_profile_steps(c.profile_steps, 0)  # its form, before anything runs
  if c.train_only not in ("all", "retrieval"):
    raise TrainSetupError(f"train_only={c.train_only!r}; expected 'all' or 'retrieval'.")
  if c.num_neighbours < 0 or (cfg.retrieval and c.num_neighbours == 0
                              and cfg.num_neighbours < 1):
    raise TrainSetupError(f"num_neighbours={c.num_neighbours} must be >= 1 (0: the model's "
                          f"{cfg.num_neighbours}).")


def _check_checkpoints(c, cfg, workdir, mngr, abstract_model) -> None:
  """Before anything reads the data or compiles: the checkpoints to resume (or retrofit) fit this
  model and database, and there is room for a checkpoint."""
  if mngr.latest_step() is not None:
    prev_step = mngr.latest_step()
    _check_resume(ckpt_lib.read_meta(workdir / ckpt_lib.CHECKPOINTS, prev_step)[1], cfg, c.db,
                  workdir, prev_step)
  elif c.init_from:
    base_step, base_meta = ckpt_lib.read_meta(c.init_from)
    verify.check_checkpoint_tokenizer(base_meta.get("db_tokenizer"), base_meta.get("db"), c.db,
                                      f"{c.init_from} (step {base_step})")
  _remove_partial_checkpoints(workdir / ckpt_lib.CHECKPOINTS)  # left by a killed or failed write
  _check_space(workdir / ckpt_lib.CHECKPOINTS, nnx.state(abstract_model), mngr.latest_step() or 0,
               mngr.latest_step() or 0, factor=3)  # parameters + two Adam moments


def _start_state(c, cfg, workdir, mngr, train, data_iter, mesh, host_log, progress: bool):
  """(state, first step): restored from the latest checkpoint, else initialised (and the
  retrofit's baseline loaded into it)."""
  start = mngr.latest_step()
  state = train.init()
  if start is not None:
    state, _ = ckpt_lib.restore(mngr, start, state, data_iter)
    logging.info("resumed from %s step %d", workdir / ckpt_lib.CHECKPOINTS, start)
    host_log(f"process {jax.process_index()}/{jax.process_count()}: resumed from step {start}")
    if progress and jax.process_index() == 0:
      print(f"resuming {workdir} from step {start}", flush=True)
    return state, start
  host_log(f"process {jax.process_index()}/{jax.process_count()}: started, "
           f"{jax.local_device_count()} of {jax.device_count()} devices, mesh "
           f"{dict(mesh.shape)}, db {c.db}")
  if c.init_from:
    state = load_baseline_into(state, cfg, c.init_from)
  return state, 0


class StepMetrics:
  """The steps' metrics, fetched from the device only at a flush (no host sync per step), checked
  finite and written with throughput, MFU and where the interval's wall time went.

  Per step, averaged over the interval since the previous flush (every step of it has the same
  values): `step_time_s` (wall time), `input_wait_s` (time the loop blocked in next(data_iter)),
  `checkpoint_s` (time it blocked writing checkpoints: orbax's synchronous part); `goodput` (the
  share of the interval's wall time not spent waiting for input, checkpoints, compilation or
  `debug_step_delay_s`) and `goodput_run` (the same since the loop started). The
  step is dispatched asynchronously, so input wait can overlap device work: goodput is a lower
  bound. The interval that holds the first (compiling) step counts as compilation."""

  def __init__(self, c, cfg, workdir, writer: MetricsWriter, start: int, bpt: float):
    self.c, self.workdir, self.writer, self.start, self.bpt = c, workdir, writer, start, bpt
    self.tokens_per_step = c.global_batch * c.seq_len
    self.flops_per_step = cfg.flops_per_token(c.seq_len) * self.tokens_per_step
    self.peak = peak_flops(c, jax.devices()[0]) * jax.device_count()
    self.pending: list[tuple[int, Any]] = []
    self.last: dict[str, Any] = {}
    self.last_good = start  # the last checkpointed step (named when a loss is not finite)
    self.t_flush, self.steps_since = time.perf_counter(), 0
    self.t_start = self.t_flush
    self.lost = {"input": 0.0, "checkpoint": 0.0, "other": 0.0}  # this interval
    self.total = {"input": 0.0, "checkpoint": 0.0, "other": 0.0, "compile": 0.0}

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))
    self.steps_since += 1

  def lose(self, what: str, seconds: float) -> None:
    """`seconds` of this interval went to `what` ("input", "checkpoint" or "other")."""
    self.lost[what] += seconds
    self.total[what] += seconds

  def summary(self) -> str:
    """The run's wall time since the loop started and where it went (for the host log)."""
    wall = time.perf_counter() - self.t_start
    lost = sum(self.total.values())
    return (f"wall {wall:.1f} s: input wait {self.total['input']:.1f} s, checkpoints "
            f"{self.total['checkpoint']:.1f} s, compilation {self.total['compile']:.1f} s, "
            f"other waits {self.total['other']:.1f} s; goodput {max(wall - lost, 0) / wall:.3f}")

  def flush(self) -> None:
    if not self.pending:
      return
    fetched = [(s, jax.device_get(m)) for s, m in self.pending]
    self.pending.clear()
    now = time.perf_counter()
    wall = now - self.t_flush
    dt = wall / max(self.steps_since, 1)
    compiling = fetched[0][0] == self.start + 1
    lost = sum(self.lost.values())
    if compiling:  # what the first step took beyond its waits was compilation
      self.total["compile"] += max(wall - lost, 0.0)
      lost = wall
    steps = max(self.steps_since, 1)
    interval = {"input_wait_s": self.lost["input"] / steps,
                "checkpoint_s": self.lost["checkpoint"] / steps,
                "goodput": max(wall - lost, 0.0) / wall if wall > 0 else 0.0,
                "goodput_run": max((now - self.t_start) - sum(self.total.values()), 0.0)
                / max(now - self.t_start, 1e-9)}
    self.lost = dict.fromkeys(self.lost, 0.0)
    self.t_flush, self.steps_since = now, 0
    for s, m in fetched:
      loss = float(m["loss"])
      if not math.isfinite(loss) or not math.isfinite(float(m["grad_norm"])):
        raise NonFiniteLossError(
            f"loss {loss} (gradient norm {float(m['grad_norm'])}) at step {s}; nothing saved "
            f"after it: the last good checkpoint is step {self.last_good} in "
            f"{self.workdir / ckpt_lib.CHECKPOINTS}. Lower --config.peak_lr or check the data.")
      last = {"step": s, "loss": loss, "bpb": loss / math.log(2) / self.bpt,
              "grad_norm": float(m["grad_norm"]),
              "learning_rate": experiment.learning_rate(self.c, s - 1),
              "tokens": int(m["tokens"]), "step_time_s": dt,
              "tokens_per_s": self.tokens_per_step / dt, **interval, "time": time.time()}
      if s == self.start + 1:
        last["includes_compile"] = True
      if self.peak:
        last["mfu"] = self.flops_per_step / dt / self.peak
      self.writer.write(last)
      self.last = last


def _disk_full_error(workdir, step: int, failed: list) -> CheckpointWriteError:
  """One message for a full disk: where the last good checkpoint is and how to resume."""
  # (orbax's writers may still be running: removed until they stop; one they leave after that
  # is removed when the run is restarted, before anything else is written.)
  _remove_partial_checkpoints(workdir / ckpt_lib.CHECKPOINTS, settle_s=10.0)
  reason = next((str(x) for e in failed for x in (e, e.__cause__, e.__context__)
                 if isinstance(x, OSError)), str(failed[0]))
  finished = [int(p.name) for p in (workdir / ckpt_lib.CHECKPOINTS).iterdir()
              if p.name.isdigit()]
  return CheckpointWriteError(
      f"the disk of {workdir} filled up near step {step} ({reason[:300]}); the partial "
      f"checkpoint is discarded (on the rerun at the latest) and the last good checkpoint is "
      f"{f'step {max(finished)}' if finished else 'none'}: free space and rerun the same "
      f"command to resume")


def _run(c, workdir: str, *, progress: bool, cache: CompileCache,
         quiet: _QuietDiskFull) -> dict[str, Any]:
  c = experiment.with_defaults(c)
  cfg = experiment.model_config(c)
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  store = chunk_store_lib.ChunkStore.open(c.db)
  _check_setup(c, cfg, store)
  mngr = ckpt_lib.manager(workdir / ckpt_lib.CHECKPOINTS, max_to_keep=c.keep_checkpoints)
  abstract_model = nnx.eval_shape(lambda: Retro(cfg, rngs=nnx.Rngs(0)))
  _check_checkpoints(c, cfg, workdir, mngr, abstract_model)

  mesh = make_mesh(tuple(c.mesh))
  train = TrainStep(cfg, experiment.optimizer(c), mesh,
                    wrt=RETRIEVAL_PARAMS if c.train_only == "retrieval" else nnx.Param,
                    seed=c.seed, grad_accum_steps=c.grad_accum_steps)
  num_neighbours = c.num_neighbours or cfg.num_neighbours
  data_iter = loader.make_iterator(
      c.db, seq_len=c.seq_len, batch_size=c.global_batch // jax.process_count(), split="train",
      retrieval=cfg.retrieval, num_neighbours=num_neighbours if cfg.retrieval else None,
      neighbour_len=cfg.neighbour_len, seed=c.seed, read_threads=c.read_threads,
      self_neighbour_rate=c.self_neighbour_rate if cfg.retrieval else 0.0,
      neighbour_shift=c.neighbour_shift if cfg.retrieval else 0, input=c.input)
  bpt = bytes_per_token(store)
  meta = {"model_config": cfg.to_dict(), "experiment": c.to_dict(),
          "db": str(c.db), "db_tokenizer": store.manifest["tokenizer"], "bytes_per_token": bpt,
          "params": {"non_embedding": count_params(abstract_model),
                     "total": count_params(abstract_model, non_embedding=False)}}
  host_log = HostLog(workdir)
  state, start = _start_state(c, cfg, workdir, mngr, train, data_iter, mesh, host_log, progress)
  if is_main:
    write_json_atomic(workdir / "config.json", meta)

  writer = MetricsWriter(workdir, start, is_main, c.metrics_upload_every_s)
  metrics = StepMetrics(c, cfg, workdir, writer, start, bpt)
  profile = Profile(parse_profile_steps(c.profile_steps, start), workdir, host_log)
  # With jax.distributed, JAX's preemption sync manager owns SIGTERM (its notifier's handler; a
  # Python handler would displace it) and orbax's reached_preemption answers at the agreed step.
  # A single process without the coordination service: a flag, checked at every step.
  preempted = {"flag": False}
  sync_point = jax.distributed.is_initialized()

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True
  old_handler = None if sync_point else signal.signal(signal.SIGTERM, on_sigterm)
  if sync_point and jax.process_count() > 1 and not jax.config.jax_enable_preemption_service:
    host_log("warning: jax_enable_preemption_service is off: SIGTERM ends this process "
             "without a checkpoint")

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k]))
            for k, s in train.batch_sharding(batch).items()}

  def collectives() -> str:
    """The host collectives since the last call (RETRO_JAX_COUNT_HOST_SYNCS), for the log."""
    if not host_syncs.installed():
      return ""
    counts = host_syncs.take()
    return "; host collectives since the last checkpoint: " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("step", "checkpoint", "background"))

  bar = tqdm(total=c.total_steps, initial=start, desc=os.path.basename(str(workdir)) or "train",
             unit="step", disable=not (progress and is_main), dynamic_ncols=True)
  step = start
  failed: list[BaseException] = []
  if host_syncs.installed():
    host_syncs.take()  # setup and restore: not between checkpoints
  try:
    with host_syncs.phase("step"):
      while step < c.total_steps:
        profile.before(step + 1)
        t = time.perf_counter()
        batch = next(data_iter)
        metrics.lose("input", time.perf_counter() - t)
        state, step_metrics = train.step(state, to_global(batch))
        step += 1
        metrics.add(step, step_metrics)
        profile.after(step, step_metrics, step == c.total_steps)
        if step == start + 1:  # Leave compilation out of the first interval's throughput.
          jax.block_until_ready(step_metrics)
          metrics.flush()
          host_log(f"step {step} compiled; {cache.describe()}")
        # The same answer on every host, with no collective here (JAX's sync point); else SIGTERM.
        stop = mngr.reached_preemption(step) or preempted["flag"]
        save = stop or step % c.checkpoint_every == 0 or step == c.total_steps
        if save or step % c.log_every == 0:
          metrics.flush()
          bar.set_postfix(loss=f"{metrics.last['loss']:.3f}",
                          tok_s=f"{metrics.last['tokens_per_s']:.0f}")
        bar.update(1)
        if c.debug_step_delay_s:
          time.sleep(c.debug_step_delay_s)
          metrics.lose("other", c.debug_step_delay_s)
        if save:
          t = time.perf_counter()
          with host_syncs.phase("checkpoint"):
            _check_space(workdir / ckpt_lib.CHECKPOINTS, state, step, metrics.last_good)
            ckpt_lib.save(mngr, step, state, data_iter, {**meta, "step": step})
          metrics.lose("checkpoint", time.perf_counter() - t)
          metrics.last_good = step
          writer.flush()
          host_log(f"checkpoint {step}{collectives()}")
        if stop:
          how = ("JAX preemption sync point, the same step on every host" if sync_point
                 else "SIGTERM")
          logging.warning("preemption at step %d (%s): checkpoint saved, exiting", step, how)
          host_log(f"preempted: stopped at step {step} ({how})")
          if progress and is_main:
            print(f"preempted at step {step}: checkpoint saved", flush=True)
          break
  except Exception as e:  # noqa: BLE001 -- a full disk becomes one message below
    if not errors.is_disk_full(e):
      raise
    failed.append(e)
  finally:
    bar.close()
    if profile.on:  # an error inside the traced steps
      jax.profiler.stop_trace()
    t = time.perf_counter()
    with host_syncs.phase("checkpoint"):
      _keep_disk_full(mngr.wait_until_finished, failed)
    metrics.lose("checkpoint", time.perf_counter() - t)
    _keep_disk_full(writer.close, failed)
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
  if failed:
    quiet.write_failed = True
    raise _disk_full_error(workdir, step, failed) from None
  host_log(f"done at step {step}: {metrics.summary()}; {cache.describe()}{collectives()}")
  return metrics.last
