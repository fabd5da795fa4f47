#!/usr/bin/env bash
# The worker side of launch/tpu_run.sh: runs on each TPU VM worker (copied to its home directory
# and called through `gcloud compute tpus tpu-vm ssh --worker=all`).
#
#   bash tpu_worker.sh install (--wheels=gs://B/wheels/SHA | --image=IMAGE | --git-url=URL --ref=REF)
#   bash tpu_worker.sh start --run=NAME --log-dir=gs://B/logs/NAME [--image=IMAGE] [--env=K=V ...] -- CMD ...
#   bash tpu_worker.sh stop [--grace=SECONDS]
#   bash tpu_worker.sh status
#
# Install, three ways: --wheels (launch/tpu_run.sh's default) copies the wheelhouse that the
# launcher built once for commit SHA from the bucket (the project's wheel, every dependency's
# wheel, requirements.txt pinning each of them, the source archive for experiments/) and installs
# it with `pip install --no-index`: no package registry on the worker. --image pulls a container
# image built from the repository's Dockerfile; `start --image` runs the command in it (`docker run
# --privileged --net=host`, as the TPU needs). --git-url clones REF and installs from the registry
# (`pip install -e .[tpu]`).
#
# Paths (under RETRO_JAX_BASE, default $HOME): retro-jax/ the code (from wheels: without the
# retro_jax/ package, which comes from the wheel), retro-jax-venv/ the Python environment,
# retro-jax-wheels/SHA/ the wheelhouse, retro-jax-runs/RUN/ per run: worker-N.log, pid, exit_code,
# command. `start` returns at once: the command runs in its own session (setsid nohup), so a
# dropped ssh connection does not stop it; its log is copied to --log-dir every --upload-every
# seconds and at exit, with an exit record worker-N.exit ("exit_code=RC sigterm=0|1") that the
# launcher's requeue loop reads. `stop` sends SIGTERM to the run's process group (the trainer saves
# a checkpoint), then SIGKILL after --grace seconds.
set -euo pipefail

PROG=tpu_worker.sh
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
BASE=${RETRO_JAX_BASE:-$HOME}
CODE=$BASE/retro-jax
VENV=$BASE/retro-jax-venv
WHEELS=$BASE/retro-jax-wheels
RUNS=$BASE/retro-jax-runs

die() { printf '%s (worker %s): error: %s\n' "$PROG" "$(worker_id)" "$*" >&2; exit 2; }
say() { printf 'worker %s: %s\n' "$(worker_id)" "$*"; }

worker_id() {  # index of this host in the slice
  local id
  if [[ -n ${RETRO_JAX_WORKER_ID:-} ]]; then
    echo "$RETRO_JAX_WORKER_ID"
  elif id=$(curl -sf -m 3 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null) && [[ $id =~ ^[0-9]+$ ]]; then
    echo "$id"
  elif [[ $(hostname) =~ -w-([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    echo 0
  fi
}

alive_pid() {  # the pid of a run whose process is alive, or nothing
  local pid
  [[ -f $1/pid ]] || return 1
  pid=$(<"$1/pid")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

running_run() {  # the run directory of a live run, if any
  local d
  for d in "$RUNS"/*/; do
    [[ -d $d ]] || continue
    if alive_pid "${d%/}" >/dev/null; then
      echo "${d%/}"
      return 0
    fi
  done
  return 1
}

upload() {  # upload LOCAL DEST: DEST is gs://... or a local path
  local src=$1 dest=$2
  [[ -f $src && -n $dest ]] || return 0
  if [[ $dest == gs://* ]]; then
    gcloud storage cp --quiet "$src" "$dest" >/dev/null 2>&1 ||
      gsutil -q cp "$src" "$dest" >/dev/null 2>&1 || echo "$PROG: could not copy $src to $dest" >&2
  else
    mkdir -p "$(dirname "$dest")" && cp "$src" "$dest"
  fi
}

gs_get() {  # gs_get URL... DIR/: copy objects from gs:// (gcloud storage, else gsutil)
  gcloud storage cp --quiet "$@" || gsutil -m -q cp "$@"
}

docker_cmd() {  # the docker command line: plain, or through sudo where the user may not use it
  if docker info >/dev/null 2>&1; then
    echo docker
  else
    echo sudo -n docker
  fi
}

python_exact() {  # python_exact X.Y: that Python (the wheelhouse's wheels are built for it)
  local want=$1 p="python$1"
  if ! command -v "$p" >/dev/null; then
    sudo apt-get update -qq >&2
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" "$p-venv" >&2
  fi
  command -v "$p" >/dev/null || die "no $p for the wheelhouse (built for Python $want)"
  echo "$p"
}

python_311() {  # a Python >= 3.11 (setup.py's python_requires), installed from apt if need be
  local p
  for p in python3.13 python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$p"
      return 0
    fi
  done
  sudo apt-get update -qq >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv >&2
  echo python3.11
}

cmd_install() {
  local wheels="" image="" git_url="" ref="" revision="" arg
  for arg in "$@"; do
    case $arg in
      --wheels=gs://?*) wheels=${arg#*=} ;;
      --image=?*) image=${arg#*=} ;;
      --git-url=?*) git_url=${arg#*=} ;;
      --ref=?*) ref=${arg#*=} ;;
      *) die "install: unknown argument '$arg'" ;;
    esac
  done
  [[ -n $wheels || -n $image || -n $git_url ]] ||
    die "install: pass --wheels=gs://BUCKET/wheels/SHA, --image=IMAGE or --git-url=URL --ref=REF"
  [[ -z $wheels || -z $image ]] || die "install: --wheels and --image exclude each other"
  local busy
  if busy=$(running_run); then
    die "run $(basename "$busy") is still running; stop it first (tpu_run.sh --stop)"
  fi
  if [[ -n $image ]]; then
    install_image "$image"
    return 0
  fi
  rm -f "$BASE/retro-jax-image"
  local new=$CODE.new py dir=""
  rm -rf "$new"
  mkdir -p "$new"
  if [[ -n $wheels ]]; then
    wheels=${wheels%/}
    revision=${wheels##*/}
    dir=$WHEELS/$revision
    rm -rf "$dir"
    mkdir -p "$dir"
    gs_get "$wheels/requirements.txt" "$wheels/wheels.txt" "$wheels/source.tar.gz" "$dir/"
    local urls=()
    mapfile -t urls < <(grep -v '^#' "$dir/wheels.txt" | grep .)
    ((${#urls[@]})) || die "install: $wheels/wheels.txt lists no wheels"
    gs_get "${urls[@]}" "$dir/"
    # retro_jax itself comes from its wheel (with the embedder's weights); the source tree keeps
    # the rest (experiments/), so `python -m retro_jax.train` run there imports the wheel's code.
    tar -xzf "$dir/source.tar.gz" -C "$new" --anchored --exclude=retro_jax
    local pyver
    pyver=$(sed -n 's/^# python: *\([0-9]\.[0-9]*\).*/\1/p' "$dir/requirements.txt")
    [[ -n $pyver ]] || die "install: $wheels/requirements.txt names no '# python: X.Y'"
    py=$(python_exact "$pyver")
  else
    [[ -n $ref ]] || die "install: --git-url needs --ref"
    git clone --quiet "$git_url" "$new"
    git -C "$new" checkout --quiet "$ref"
    revision=$(git -C "$new" rev-parse HEAD)
    py=$(python_311)
  fi
  echo "${revision:-unknown}" >"$new/.revision"
  rm -rf "$CODE"
  mv "$new" "$CODE"

  if [[ -n $dir ]]; then  # a fresh environment holding exactly the wheelhouse's pins
    rm -rf "$VENV"
  fi
  if [[ ! -x $VENV/bin/python ]] ||
    ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then  # Debian/Ubuntu split venv into its own package
      rm -rf "$VENV"
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "python$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv" >&2
      "$py" -m venv "$VENV"
    fi
  fi
  if [[ -n $dir ]]; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links="$dir" --requirement="$dir/requirements.txt"
  else
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "${CODE}[tpu]"
  fi
  local where
  where=$(cd "$CODE" && "$VENV/bin/python" -c 'import retro_jax; print(retro_jax.__file__)')
  say "installed retro-jax ${revision:0:12} from ${wheels:-$git_url} ($where, $("$VENV/bin/python" --version))"
}

install_image() {  # pull the image (Artifact Registry / gcr.io: docker credentials from gcloud)
  local image=$1 host docker
  read -ra docker <<<"$(docker_cmd)"
  host=${image%%/*}
  if [[ $host == *.pkg.dev || $host == gcr.io || $host == *.gcr.io ]]; then
    if [[ ${docker[0]} == sudo ]]; then
      sudo -n "$(command -v gcloud)" auth configure-docker "$host" --quiet >&2
    else
      gcloud auth configure-docker "$host" --quiet >&2
    fi
  fi
  "${docker[@]}" pull --quiet "$image" >&2
  echo "$image" >"$BASE/retro-jax-image"
  say "pulled $image"
}

parse_run_args() {  # sets RUN LOG_DIR EVERY ENVS CMD from start/_supervise arguments
  RUN="" LOG_DIR="" EVERY=60 IMAGE="" ENVS=() CMD=()
  while (($#)); do
    case $1 in
      --run=?*) RUN=${1#*=} ;;
      --log-dir=?*) LOG_DIR=${1#*=} ;;
      --upload-every=?*) EVERY=${1#*=} ;;
      --image=?*) IMAGE=${1#*=} ;;
      --env=?*=*) ENVS+=("${1#*=}") ;;
      --) shift; CMD=("$@"); break ;;
      *) die "start: unknown argument '$1'" ;;
    esac
    shift
  done
  [[ -n $RUN ]] || die "start: --run=NAME is required"
  [[ $RUN =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "start: bad run name '$RUN'"
  [[ $EVERY =~ ^[0-9]+$ && $EVERY -gt 0 ]] || die "start: --upload-every=$EVERY: whole seconds > 0"
  ((${#CMD[@]})) || die "start: no command after --"
}

cmd_start() {
  parse_run_args "$@"
  [[ -n $IMAGE || -d $CODE ]] ||
    die "no code in $CODE: run 'tpu_run.sh' without --skip-install first"
  local busy
  if busy=$(running_run); then
    die "run $(basename "$busy") is still running (pid $(<"$busy/pid")); stop it first" \
      "(tpu_run.sh --stop)"
  fi
  local id rundir
  id=$(worker_id)
  rundir=$RUNS/$RUN
  mkdir -p "$rundir"
  rm -f "$rundir/pid" "$rundir/exit_code" "$rundir/exit" "$rundir/container"
  printf '%q ' "${CMD[@]}" >"$rundir/command"
  echo >>"$rundir/command"
  # Its own session and process group: survives the ssh session, and `stop` signals the group.
  setsid nohup bash "$SELF" _supervise "$@" </dev/null >>"$rundir/supervisor.log" 2>&1 &
  local _
  for _ in $(seq 50); do
    [[ -s $rundir/pid ]] && break
    sleep 0.1
  done
  [[ -s $rundir/pid ]] || die "the run did not start; see $rundir/supervisor.log"
  say "started $RUN (pid $(<"$rundir/pid")), log $rundir/worker-$id.log${LOG_DIR:+ -> $LOG_DIR/worker-$id.log}"
}

cmd_supervise() {  # internal: the session leader of one run
  parse_run_args "$@"
  local id rundir log remote="" e
  id=$(worker_id)
  rundir=$RUNS/$RUN
  log=$rundir/worker-$id.log
  [[ -z $LOG_DIR ]] || remote=${LOG_DIR%/}/worker-$id.log
  echo "$remote" >"$rundir/remote_log"
  echo "$$" >"$rundir/pid"
  unset JAX_PLATFORMS  # the TPU, whatever the login environment says
  export PYTHONUNBUFFERED=1
  for e in "${ENVS[@]+"${ENVS[@]}"}"; do export "${e?}"; done
  local code_note
  if [[ -n $IMAGE ]]; then
    # The container: the TPU devices need --privileged, the multi-host runtime and the metadata
    # server --net=host; --init relays SIGTERM to the trainer. Variables go in by value (sudo
    # drops the environment): --env ones, and what the TPU runtime set (MEGASCALE_*, TPU_*).
    local docker name=retro-jax-$RUN v
    read -ra docker <<<"$(docker_cmd)"
    local run=(run --rm --init --privileged --net=host --name="$name" -e PYTHONUNBUFFERED=1)
    for e in "${ENVS[@]+"${ENVS[@]}"}"; do run+=(-e "$e"); done
    for v in $(compgen -e); do
      if [[ $v == MEGASCALE_* || $v == TPU_* ]]; then run+=(-e "$v=${!v}"); fi
    done
    "${docker[@]}" rm -f "$name" >/dev/null 2>&1 || true  # a container left by a killed run
    echo "$name" >"$rundir/container"
    CMD=("${docker[@]}" "${run[@]}" "$IMAGE" "${CMD[@]}")
    code_note="image $IMAGE"
    cd "$BASE"
  else
    # shellcheck disable=SC1091  # the venv exists on the worker only
    if [[ -f $VENV/bin/activate ]]; then source "$VENV/bin/activate"; fi
    cd "$CODE"
    code_note="code $(cat .revision 2>/dev/null || echo '?')"
  fi
  {
    echo "== $(date -u '+%F %T') UTC worker $id on $(hostname): run $RUN, $code_note"
    echo "== command: $(<"$rundir/command")"
  } >>"$log"
  "${CMD[@]}" >>"$log" 2>&1 </dev/null &
  local child=$! rc=0 sigterm=0
  # SIGTERM reaches the whole group (stop, or a TPU VM shutting down): the child handles it; the
  # supervisor keeps waiting so that it can record the exit code and upload the log. The exit
  # record says whether a SIGTERM came: a preempted slice's trainer also exits 0.
  trap 'sigterm=1' TERM INT HUP
  (while kill -0 "$child" 2>/dev/null; do
    sleep "$EVERY"
    upload "$log" "$remote"
  done) &
  local uploader=$!
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  kill "$uploader" 2>/dev/null || true
  echo "== $(date -u '+%F %T') UTC exit code $rc" >>"$log"
  echo "$rc" >"$rundir/exit_code"
  echo "exit_code=$rc sigterm=$sigterm" >"$rundir/exit"
  upload "$log" "$remote"
  if [[ -n $remote ]]; then upload "$rundir/exit" "${remote%.log}.exit"; fi
  rm -f "$rundir/pid"
}

cmd_stop() {
  local grace=300 arg
  for arg in "$@"; do
    case $arg in
      --grace=*) grace=${arg#*=} ;;
      *) die "stop: unknown argument '$arg'" ;;
    esac
  done
  [[ $grace =~ ^[0-9]+$ ]] || die "stop: --grace=$grace: whole seconds"
  local rundir pid waited
  if ! rundir=$(running_run); then
    say "nothing running"
    return 0
  fi
  pid=$(<"$rundir/pid")
  say "stopping $(basename "$rundir") (pid $pid): SIGTERM, SIGKILL after $grace s"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((waited = 0; waited < grace * 10; waited++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    if [[ -s $rundir/container ]]; then  # the container outlives its killed `docker run` client
      local docker
      read -ra docker <<<"$(docker_cmd)"
      "${docker[@]}" kill "$(<"$rundir/container")" >/dev/null 2>&1 || true
    fi
    echo "== $(date -u '+%F %T') UTC killed (SIGKILL) after $grace s" >>"$rundir/worker-$(worker_id).log"
    rm -f "$rundir/pid"
    upload "$rundir/worker-$(worker_id).log" "$(cat "$rundir/remote_log" 2>/dev/null)"
    say "killed $(basename "$rundir")"
  else
    say "stopped $(basename "$rundir") (exit code $(cat "$rundir/exit_code" 2>/dev/null || echo '?'))"
  fi
}

cmd_status() {
  local id d pid
  id=$(worker_id)
  if [[ -f $BASE/retro-jax-image ]]; then
    say "image $(<"$BASE/retro-jax-image")"
  elif [[ -f $CODE/.revision ]]; then
    say "code $(<"$CODE/.revision") in $CODE"
  else
    say "no code installed"
  fi
  for d in "$RUNS"/*/; do
    [[ -d $d ]] || continue
    d=${d%/}
    if pid=$(alive_pid "$d"); then
      say "$(basename "$d"): running (pid $pid)"
    elif [[ -f $d/exit_code ]]; then
      say "$(basename "$d"): finished, exit code $(<"$d/exit_code")"
    else
      say "$(basename "$d"): not running, no exit code (killed)"
    fi
    if [[ -f $d/worker-$id.log ]]; then tail -n 3 "$d/worker-$id.log" | sed 's/^/    /'; fi
  done
}

(($#)) || die "usage: $PROG install|start|stop|status [ARGS]"
sub=$1
shift
case $sub in
  install) cmd_install "$@" ;;
  start) cmd_start "$@" ;;
  _supervise) cmd_supervise "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status "$@" ;;
  *) die "unknown command '$sub' (install, start, stop, status)" ;;
esac
