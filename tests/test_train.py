"""The train command on a real tiny database: kill -9 and resume, NaN stop, metrics, retrofit.

Every run is a subprocess `python -m retro_jax.train --config=experiments/tiny.py` with overrides
that shrink the model to the tiny database (SentencePiece vocab 1000, 64-token chunks).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retro_jax.training import experiment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import tiny_db  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  return tiny_db.get(tmp_path_factory)[0]


def overrides(db, **kw):
  base = {"db": str(db), "model_overrides.vocab_size": 1024, "model_overrides.d_model": 32,
          "model_overrides.num_heads": 2, "model_overrides.num_layers": 2,
          "model_overrides.ffw_size": 64, "model_overrides.cca_layers": "(2,)",
          "model_overrides.encoder_d_model": 16, "model_overrides.encoder_num_heads": 1,
          "seq_len": 128, "global_batch": 2, "total_steps": 12, "warmup_steps": 2,
          "checkpoint_every": 4, "log_every": 1, "peak_lr": 3e-3, "read_threads": 1}
  base.update(kw)
  return [f"--config.{k}={v}" for k, v in base.items()]


def train_cmd(workdir, db, **kw):
  return [sys.executable, "-m", "retro_jax.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}"] + overrides(db, **kw)


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def run(cmd, check=True):
  p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  if check and p.returncode:
    raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_kill9_then_resume_equals_uninterrupted(db, tmp_path):
  ref = tmp_path / "ref"
  run(train_cmd(ref, db))
  want = losses(ref)
  assert sorted(want) == list(range(1, 13))
  assert sorted(os.listdir(ref / "checkpoints")) == ["12", "4", "8"]

  killed = tmp_path / "killed"
  p = subprocess.Popen(train_cmd(killed, db, debug_step_delay_s=0.5), cwd=ROOT, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:  # kill -9 between checkpoints 4 and 8
    ckpts = (killed / "checkpoints")
    if (ckpts / "4").exists() and max(losses(killed), default=0) >= 6:
      break
    time.sleep(0.1)
  assert p.poll() is None, "the run ended before it could be killed"
  os.kill(p.pid, signal.SIGKILL)
  p.wait(timeout=60)
  assert "12" not in os.listdir(killed / "checkpoints")

  out = run(train_cmd(killed, db))
  assert "resuming" in out.stdout and "from step 4" in out.stdout, out.stdout
  got = losses(killed)
  assert sorted(got) == list(range(1, 13))  # lines logged after step 4 by the killed run dropped
  for s in range(5, 13):
    assert got[s] == want[s], (s, got[s], want[s])  # bitwise: same state, same batches


@pytest.mark.slow  # keeps make test within CI time; run by make test-slow
def test_nan_stops_and_keeps_last_good_checkpoint(db, tmp_path):
  wd = tmp_path / "nan"
  run(train_cmd(wd, db, total_steps=4))
  p = run(train_cmd(wd, db, total_steps=12, peak_lr=1e30, warmup_steps=1), check=False)
  assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
  assert "last good checkpoint is step 4" in p.stderr
  assert sorted(os.listdir(wd / "checkpoints")) == ["4"]


def test_metrics_and_config(db, tmp_path):
  wd = tmp_path / "m"
  run(train_cmd(wd, db, total_steps=4, retrieval=False))
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["model_config"]["cca_layers"] == [] and cfg["db"] == str(db)
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  for key in ("loss", "bpb", "tokens_per_s", "learning_rate", "grad_norm", "step_time_s"):
    assert all(np.isfinite(r[key]) for r in recs), key
  assert recs[0]["learning_rate"] < recs[-1]["learning_rate"]  # warm-up
  assert any(f.startswith("events") for f in os.listdir(wd / "tensorboard"))


def test_an_experiment_setting_a_retired_field_still_loads():
  c = experiment.defaults()
  c.stop_check_every = 5  # retired: preemption is JAX's sync point at every step
  assert "stop_check_every" not in experiment.with_defaults(c)


def test_unknown_field_is_an_error(db, tmp_path):
  p = run(train_cmd(tmp_path / "x", db) + ["--config.totl_steps=3"], check=False)
  assert p.returncode != 0 and "totl_steps" in p.stderr


@pytest.mark.slow  # keeps make test within 11 minutes; run by make test-slow
def test_profile_compile_cache_and_goodput(db, tmp_path):
  """`profile_steps` leaves a trace in WORKDIR/profile, every metrics row says where the time went
  (input wait, checkpoints, goodput), and a resumed run compiles from WORKDIR/compile_cache."""
  wd = tmp_path / "ops"
  env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the default: WORKDIR
  kw = dict(total_steps=4, checkpoint_every=2, profile_steps="2",
            compile_cache_min_compile_s=0.0)
  for total in (4, 6):  # a run, then the same command resumed for two more steps
    p = subprocess.run(train_cmd(wd, db, **{**kw, "total_steps": total}), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
  traces = list((wd / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 2 and all(t.stat().st_size > 0 for t in traces), traces  # one per run
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(1, 7))
  for r in recs:
    assert r["input_wait_s"] >= 0 and r["checkpoint_s"] >= 0, r
    assert 0 <= r["goodput"] <= 1 and 0 <= r["goodput_run"] <= 1, r
  assert recs[0]["goodput"] == 0  # the first step compiles
  assert recs[2]["checkpoint_s"] > 0  # step 3's interval paid for step 2's checkpoint
  assert any(r["goodput"] > 0 for r in recs)
  assert any((wd / "compile_cache").iterdir())
  log = (wd / "logs" / "host-0.txt").read_text()
  assert "profile of steps 2-3 written" in log and "profile of steps 6-6 written" in log, log
  first, resumed = [l for l in log.splitlines() if "compiled; compilation cache" in l]
  hits = [int(l.split(": ")[-1].split(" hits")[0]) for l in (first, resumed)]
  assert hits[0] == 0 and hits[1] > 0, log  # the resumed run's train step came from the cache
  print(f"resumed run: {hits[1]} executables from {wd / 'compile_cache'}")


def test_sigterm_stops_a_single_process_at_the_next_step_with_a_checkpoint(db, tmp_path):
  """No coordination service: the loop's own SIGTERM handler stops the run at the next step,
  which it checkpoints, and the process exits 0."""
  wd = tmp_path / "term"
  p = subprocess.Popen(train_cmd(wd, db, checkpoint_every=100, debug_step_delay_s=0.5), cwd=ROOT,
                       env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if (wd / "metrics.jsonl").exists() and max(losses(wd), default=0) >= 2:
      break
    time.sleep(0.1)
  assert p.poll() is None, "the run ended before it could be signalled"
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  steps = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
  assert len(steps) == 1 and 2 <= steps[0] < 12, steps
  assert f"preempted at step {steps[0]}: checkpoint saved" in out, out[-2000:]
  assert f"stopped at step {steps[0]} (SIGTERM)" in (wd / "logs" / "host-0.txt").read_text()
  assert max(losses(wd)) == steps[0]
