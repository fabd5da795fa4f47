r"""Make targets from a fresh clone, timed: docs/testing.md's table of targets.

    python -m bench.fresh_targets --targets=test [--repo=.] [--dest=/tmp/retro_fresh_targets] \
        [--out=bench/results/make_targets.json]

For each target: clones the repository's HEAD into --dest (removed first), runs `make TARGET`
there, and records the wall time, exit status, the pytest summary line (for test targets), the
CPU and the load average, with the command, commit and date. Targets measured before keep their
records (the file holds one per target); `make docs` lists every target of the Makefile, the
ones not measured yet included. The clone creates its own .venv; this machine's pip cache and
installed Debian packages are used as they are.

Runs in different --dest folders may share --out: each reads the file again before it writes.

`--clone=once` clones once and runs the targets one after the other in that clone: each record
then names the targets that ran before it there (`after`), e.g. the benchmarks timed after
`make db` built the database they read (their own `db` prerequisite then only checks it).
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import threading
import time

from bench.common import run_provenance
from retro_jax.evaluation.figures import utc_now

OUT = "bench/results/make_targets.json"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def pytest_summary(log: str) -> str | None:
  """The last `N passed, ... in S s` line of a pytest run, without its `=` padding."""
  found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*? in [\d.]+s.*?)\s*=*$", log, re.M)
  return found[-1] if found else None


def clone(repo: str, dest: str) -> None:
  shutil.rmtree(dest, ignore_errors=True)
  subprocess.run(["git", "clone", "-q", repo, dest], check=True, timeout=600)


def run_target(dest: str, target: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  start, t0 = utc_now(), time.time()
  loads, done = [], threading.Event()

  def sample_load():  # the 1-minute load average through the run, every 10 s
    while not done.wait(10.0):
      loads.append(os.getloadavg()[0])
  sampler = threading.Thread(target=sample_load, daemon=True)
  sampler.start()
  try:
    p = subprocess.run(["make", target], cwd=dest, env=env, capture_output=True, text=True,
                       timeout=6 * 3600)
  finally:
    done.set()
    sampler.join()
  wall = time.time() - t0
  log = p.stdout + p.stderr
  with open(os.path.join(dest, f"make_{target}.log"), "w") as f:
    f.write(log)
  return {"target": target, "start_utc": start, "end_utc": utc_now(),
          "wall_seconds": round(wall, 1), "exit_status": p.returncode,
          "pytest": pytest_summary(log), "cpu": cpu_model(), "cores": os.cpu_count(),
          "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
          "load_during": ({"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2)}
                          if loads else None)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--targets", default="test", help="comma-separated make targets")
  p.add_argument("--repo", default=".")
  p.add_argument("--dest", default="/tmp/retro_fresh_targets")
  p.add_argument("--out", default=OUT)
  p.add_argument("--clone", choices=("each", "once"), default="each",
                 help="a fresh clone for each target, or one for all (records name what ran "
                      "before them in it)")
  a = p.parse_args()
  repo = os.path.abspath(a.repo)
  before: list[str] = []
  for target in a.targets.split(","):
    if a.clone == "each" or not before:
      clone(repo, a.dest)
      before = []
    rec = {**run_provenance("bench.fresh_targets"), **run_target(a.dest, target),
           "after": [f"make {t}" for t in before],
           "commit": subprocess.run(["git", "-C", a.dest, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, check=True).stdout.strip()}
    before.append(target)
    # Read again before each write: runs with other --dest folders may share --out.
    old = {}
    if os.path.exists(a.out):
      with open(a.out) as f:
        old = json.load(f).get("targets", {})
    old[target] = rec
    print(f"make {target}: exit {rec['exit_status']} in {rec['wall_seconds'] / 60:.1f} min"
          + (f" ({rec['pytest']})" if rec["pytest"] else ""), flush=True)
    with open(a.out, "w") as f:  # after each target: a killed run keeps the ones done
      json.dump({**run_provenance("bench.fresh_targets"), "targets": old}, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
