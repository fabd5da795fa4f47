r"""`make demo` from a fresh clone, timed: the README's "make demo" row and its figures.

    python -m bench.fresh_demo [--repo=.] [--dest=/tmp/retro_fresh_demo] \
        [--out=bench/results/make_demo_fresh.json]

Clones the repository's HEAD into --dest (removed first), runs `make demo` there with
/usr/bin/time, and writes the wall time, exit status, the database's stage times and the demo's
results (runs/demo/results.json) with the command, commit and date. The clone creates its own
.venv; the pip cache and installed Debian packages of this machine are used as they are.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import time

from retro_jax.evaluation.figures import provenance, utc_now


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--repo", default=".")
  p.add_argument("--dest", default="/tmp/retro_fresh_demo")
  p.add_argument("--out", default="bench/results/make_demo_fresh.json")
  a = p.parse_args()
  repo = os.path.abspath(a.repo)
  rec = provenance(f"git clone {repo} {a.dest} && cd {a.dest} && make demo", repo)
  shutil.rmtree(a.dest, ignore_errors=True)
  subprocess.run(["git", "clone", "-q", repo, a.dest], check=True)
  start, t0 = utc_now(), time.time()
  log = os.path.join(a.dest, "make_demo.log")
  with open(log, "w") as f:
    rc = subprocess.run(["make", "demo"], cwd=a.dest, stdout=f, stderr=subprocess.STDOUT).returncode
  wall = time.time() - t0
  rec.update({"script": "python -m bench.fresh_demo", "start_utc": start, "end_utc": utc_now(),
              "wall_seconds": round(wall, 1), "exit_status": rc,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_at_end": os.getloadavg()})
  times = os.path.join(a.dest, "runs", "dup_db", "build_times.json")
  if os.path.exists(times):
    with open(times) as f:
      rec["db_stages_seconds"] = {k: v.get("seconds") for k, v in json.load(f)["stages"].items()}
  res = os.path.join(a.dest, "runs", "demo", "results.json")
  if os.path.exists(res):
    with open(res) as f:
      demo = json.load(f)
    demo.pop("eval", None)  # per-chunk arrays; the summary and differences stay
    rec["demo"] = demo
  with open(a.out, "w") as f:
    json.dump(rec, f, indent=1)
  print(f"make demo: exit {rc} in {wall / 60:.1f} min; wrote {a.out} (log: {log})")


if __name__ == "__main__":
  main()
