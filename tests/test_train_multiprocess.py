"""Training as two JAX processes (a pod in miniature) on a local GCS emulator: one preemption
decision for all hosts (JAX's preemption sync point, with no host collective between checkpoints:
counted), resumption, and the same losses as one process.

Two subprocesses `python -m retro_jax.train --num_processes=2 --process_id=i` with 4 CPU devices
each (8 in all, as the single-process reference run has), coordinated by jax.distributed on a local
port, read the tiny database from gs://BUCKET/db and write the workdir to gs://BUCKET/run on the
emulator (tests/gcs_emulator.py): orbax checkpoints through tensorstore, metrics.jsonl and host logs
through etils.epath (gcsfs), TensorBoard events through google-cloud-storage.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from retro_jax.training import checkpoint as ckpt_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8
RTOL = 1e-5


@pytest.fixture(scope="module")
def local_db(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)[0]


def upload_db(local_db, url):
  """The chunk store and training neighbours (what training reads) into the bucket."""
  fs, path = fsspec.core.url_to_fs(url)
  for part in ("chunks", "neighbours"):
    fs.put(str(local_db / part), f"{path}/{part}", recursive=True)


def overrides(db, **kw):
  base = {"db": db, "model_overrides.vocab_size": 1024, "model_overrides.d_model": 32,
          "model_overrides.num_heads": 2, "model_overrides.num_layers": 2,
          "model_overrides.ffw_size": 64, "model_overrides.cca_layers": "(2,)",
          "model_overrides.encoder_d_model": 16, "model_overrides.encoder_num_heads": 1,
          "seq_len": 128, "global_batch": 8, "total_steps": TOTAL, "warmup_steps": 2,
          "checkpoint_every": 100, "log_every": 1, "peak_lr": 3e-3, "read_threads": 1,
          "metrics_upload_every_s": 0.0}
  base.update(kw)
  return [f"--config.{k}={v}" for k, v in base.items()]


def env(devices):
  # RETRO_JAX_COUNT_HOST_SYNCS: the loop counts every host collective (retro_jax.training.host_syncs)
  # and logs the counts at each checkpoint.
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, RETRO_JAX_COUNT_HOST_SYNCS="1",
              XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +  # the run's flags (conftest.py)
                         f" --xla_force_host_platform_device_count={devices}").strip())


def collectives(log):
  """[(checkpoint step, {phase: host collectives since the previous checkpoint})] of a host log."""
  return [(int(m[1]), {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", m[2])})
          for m in re.finditer(r"checkpoint (\d+); host collectives since the last checkpoint: "
                               r"(.*)", log)]


def cmd(workdir, db, *extra, **kw):
  return [sys.executable, "-m", "retro_jax.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}", *extra] + overrides(db, **kw)


def start_pair(workdir, db, **kw):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(
      cmd(workdir, db, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={i}", **kw), cwd=ROOT, env=env(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"process exited {p.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
  return outs


def read_losses(gcs, name):
  text = gcs.read(name).decode() if gcs.exists(name) else ""
  return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


def assert_close(got, want, steps):
  for s in steps:
    assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (s, got[s], want[s])
  worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
  print(f"steps {min(steps)}-{max(steps)}: largest relative loss difference {worst:.2e}")


def test_two_processes_on_gcs_preempt_resume_and_match_one_process(gcs, local_db, tmp_path):
  db = f"gs://{gcs.bucket}/db"
  upload_db(local_db, db)

  ref = tmp_path / "ref"  # one process, 8 devices, the same global batch, reading the same bucket
  p = subprocess.run(cmd(ref, db), cwd=ROOT, env=env(8), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(ref / "metrics.jsonl") as f:
    want = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert sorted(want) == list(range(1, TOTAL + 1))

  run = f"gs://{gcs.bucket}/run"
  procs = start_pair(run, db, debug_step_delay_s=1.0)
  deadline = time.time() + 500
  seen_during_run = False
  while time.time() < deadline and all(q.poll() is None for q in procs):
    if max(read_losses(gcs, "run/metrics.jsonl"), default=0) >= 2:
      seen_during_run = True  # metrics.jsonl is in the bucket while both processes run
      break
    time.sleep(0.2)
  if not seen_during_run:
    for q in procs:
      q.kill()
  assert seen_during_run, [q.communicate(timeout=60)[1][-3000:] for q in procs]
  procs[1].send_signal(signal.SIGTERM)  # preempt one host only
  finish(procs)
  steps = sorted({int(n.split("/")[2]) for n in gcs.names("run/checkpoints/")
                  if n.split("/")[2].isdigit()})
  assert len(steps) == 1 and 2 <= steps[0] < TOTAL, steps  # one step, saved by both hosts
  stop = steps[0]
  print(f"SIGTERM to process 1: both processes saved step {stop} and exited 0")
  for i in range(2):  # every host stopped at that step (host 1 got the signal, host 0 agreed)
    log = gcs.read(f"run/logs/host-{i}.txt").decode()
    assert f"stopped at step {stop} (JAX preemption sync point" in log, log
    # Between the start and the preemption's checkpoint: no host collective on the step path;
    # orbax's checkpoint barriers are counted, so the counter is live.
    (at, counts), = collectives(log)
    assert at == stop and counts["step"] == 0 and counts["checkpoint"] > 0, (i, counts)
    print(f"host {i}, steps 1-{stop}: host collectives {counts}")
  got = read_losses(gcs, "run/metrics.jsonl")
  assert sorted(got) == list(range(1, stop + 1))
  assert_close(got, want, range(1, stop + 1))
  events = [n for n in gcs.names("run/tensorboard/") if "tfevents" in n]
  assert events and all(len(gcs.read(n)) > 0 for n in events)

  outs = finish(start_pair(run, db))  # both again: resume at the saved step, run to the end
  assert f"resuming {run} from step {stop}" in outs[0][0], outs[0][0][-2000:]
  got = read_losses(gcs, "run/metrics.jsonl")
  assert sorted(got) == list(range(1, TOTAL + 1))
  assert_close(got, want, range(stop + 1, TOTAL + 1))
  for i in range(2):  # the resumed run: none on the step path either
    (_, first), (at, counts) = collectives(gcs.read(f"run/logs/host-{i}.txt").decode())
    assert at == TOTAL and counts["step"] == 0 and counts["checkpoint"] > 0, (i, counts)
    print(f"host {i}, steps {stop + 1}-{TOTAL}: host collectives {counts}")
  # Evaluation, sampling and retrofitting load the model the same way, straight from the bucket.
  model, config, info = ckpt_lib.load_model(run)
  assert info["step"] == TOTAL and info["db"] == db and config.d_model == 32
  assert model.config.num_layers == 2
