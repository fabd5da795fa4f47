#!/usr/bin/env bash
# Run an experiment on a Cloud TPU VM slice: build this commit's wheelhouse once and copy it to the
# bucket, create or reuse the slice (queued resources), install the wheelhouse on every worker
# with no package registry (or pull a container image, --image), start `python -m retro_jax.train`
# on all workers at once, detached, with its workdir and per-worker logs in a gs:// bucket; with
# --requeue=N, watch the slice and requeue it when it is preempted. `--help` for the options.
#
#   launch/tpu_run.sh --project=P --zone=us-east5-a --bucket=gs://B --accelerator=v5p-32 --spot \
#     --experiment=experiments/retro_172m.py [--run=NAME] [--config.x=y ...] [-- more train flags]
#   launch/tpu_run.sh ... --num_slices=2 ...   multi-slice: 2 slices (nodes NAME-0, NAME-1) of one
#                                              queued resource, joined over the data-centre network
#   launch/tpu_run.sh ... --spot --requeue=5    stay in the foreground; a preempted slice is
#                                              requested again and the run resumes (<= 5 times)
#   launch/tpu_run.sh ... --image=IMAGE         workers run the trainer in the container IMAGE
#   launch/tpu_run.sh --status | --stop | --delete  (same --name / --project / --zone)
#
# Every command is printed, numbered, before it runs; `--dry-run` prints them without running
# any (only read-only `git rev-parse` / `git status` and the build Python's version query run
# locally, to name the code revision and the wheels' Python).
# The worker side (install, detached start, stop, status) is launch/tpu_worker.sh, copied to
# every worker's home directory with the code.
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SELF_DIR/.." && pwd)
PROG=launch/tpu_run.sh

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh [ACTION] [OPTIONS] [--config.KEY=VALUE ...] [-- TRAIN_FLAGS ...]

Actions (default: create or reuse the slice, install the code, start the experiment):
  --status               state of the queued resource and, per worker, the runs and their last log lines
  --stop                 stop the run on every worker: SIGTERM (the trainer saves a checkpoint),
                         SIGKILL after --grace seconds; the slice stays up
  --delete               delete the slice (the queued resource and its TPU VMs)
  --dry-run              print every command, numbered, exactly as it would run; run none
  -h, --help             this text

Slice:
  --project=PROJECT      Google Cloud project (env PROJECT or CLOUDSDK_CORE_PROJECT)
  --zone=ZONE            zone with capacity for the accelerator, e.g. us-east5-a for v5p (env ZONE)
  --name=NAME            TPU VM (node) name (env TPU_NAME; default retro-ACCELERATOR)
  --qr-name=ID           queued resource id (default: NAME)
  --accelerator=TYPE     accelerator type, e.g. v5p-32, v5litepod-16, v6e-16, v4-32
                         (env ACCELERATOR; default v5p-32); with --num_slices, one slice's type
  --num_slices=N         N slices of --accelerator in one queued resource (--node-count=N,
                         --node-prefix=NAME: nodes NAME-0 .. NAME-(N-1)), joined over the
                         data-centre network (Multislice; the TPU runtime sets MEGASCALE_* on every
                         worker). The trainer's mesh puts its data axis across the slices; use
                         --config.grad_accum_steps=A for a global batch bigger than fits (default 1)
  --runtime-version=V    TPU software version (default from the accelerator: v5p v2-alpha-tpuv5,
                         v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
  --spot | --reserved    Spot VMs (preemptible) or reserved capacity (default: on demand)
  --wait-timeout=SEC     how long to wait for the slice to become ACTIVE (default 3600)
  --poll=SEC             seconds between state checks while waiting (default 30)
  --internal-ip          ssh / scp to internal IPs (when launching from a VM in the same network)

Code (default: a wheelhouse, built here once per commit, installed from the bucket):
  --ref=REF              git revision to ship (default HEAD; uncommitted changes are not shipped)
  --python=PY            the local Python that builds the wheelhouse: `pip wheel` of REF's tree
                         with its [tpu] extra, i.e. the project's wheel and a wheel of every
                         dependency at setup.py's pins (default REPO/.venv/bin/python, else python3;
                         Linux x86_64 CPython >= 3.11: the workers run that Python version). Copied
                         to gs://BUCKET/wheels/SHA/ (the project's wheel, source.tar.gz,
                         requirements.txt pinning every wheel, wheels.txt) and
                         gs://BUCKET/wheels/deps/ (dependency wheels, shared by commits); a commit
                         already there is not built again. Workers: `pip install --no-index`
  --image=IMAGE          instead, run the trainer in this container image, built from the
                         repository's Dockerfile and pushed (e.g.
                         us-docker.pkg.dev/PROJECT/REPO/retro-jax:SHA); workers `docker pull` it and
                         start `docker run --privileged --net=host IMAGE python -m retro_jax.train ...`
  --build-image          with --image: build IMAGE here from REF's tree (`docker build`, the
                         Dockerfile) and `docker push` it, unless the registry has it already; an
                         IMAGE without a tag gets REF's commit as its tag (IMAGE:SHA12)
  --git-url=URL          instead, workers `git clone` URL at REF (REF must be pushed) and
                         `pip install -e .[tpu]` from the package registry
  --skip-install         keep the code and venv (or image) already installed on the workers

Run:
  --experiment=FILE      experiment file inside this repository, e.g. experiments/retro_172m.py
  --bucket=gs://BUCKET   bucket for workdirs and logs (env BUCKET)
  --run=NAME             run name (default EXPERIMENT-YYYYMMDD-HHMMSS); starting the same NAME
                         again resumes from the checkpoints in its workdir
  --workdir=gs://...     default gs://BUCKET/checkpoints/EXPERIMENT/RUN
  --db=NAME|gs://...     retrieval database: adds --config.db=gs://BUCKET/databases/NAME
  --env=KEY=VALUE        exported on every worker for the run (repeatable), e.g.
                         --env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --grace=SEC            with --stop: seconds between SIGTERM and SIGKILL (default 300)
  --requeue=N            after the start, stay in the foreground and watch the queued resource
                         every --poll seconds. Preempted (SUSPENDING, SUSPENDED) or FAILED: delete
                         it, request it again with the same spec, install the same wheelhouse (or
                         image) and start the same run again (same --run, workdir and flags: the
                         trainer resumes from its last checkpoint), at most N times. Ends when
                         worker 0's run ends (its exit record gs://BUCKET/logs/RUN/.../worker-0.exit),
                         with its exit code. Ctrl-C stops the watching only. Default 0: start and
                         return
  --config.KEY=VALUE     passed to the trainer as is, as is everything after `--`

Layout (WORKSPACE.md): workdir gs://BUCKET/checkpoints/EXPERIMENT/RUN/ (checkpoints/,
metrics.jsonl, tensorboard/, config.json, logs/host-P.txt), logs gs://BUCKET/logs/RUN/worker-N.log
(slice-S/worker-N.log with --num_slices; requeue-K/ after the K-th requeue; copied every 60 s and at
exit, with worker-N.exit). A preempted Spot slice without --requeue: `--delete`, then the same
command with the same --run.
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# ---- printing and running commands --------------------------------------------------------------
quote() {  # quote a string for a POSIX shell, only when it needs it
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s == *\'* && $s != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

shq() {  # one word for a shell line; --flag=VALUE keeps the flag bare: --flag='a b'
  if [[ $1 =~ ^(--?[A-Za-z0-9][A-Za-z0-9._-]*=)(.+)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  else
    quote "$1"
  fi
}

cmdline() {  # argv -> one shell line that runs it
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shq "$w")"; done
  printf '%s' "$out"
}

STEP=0
show() { STEP=$((STEP + 1)); printf '%2d  %s\n' "$STEP" "$(cmdline "$@")"; }
note() { printf '    # %s\n' "$*"; }

step() {  # print numbered, then run (unless --dry-run)
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  local rc=0
  "$@" || rc=$?
  ((rc == 0)) || { printf '%s: step %d failed (exit code %d)\n' "$PROG" "$STEP" "$rc" >&2; exit "$rc"; }
}

query() {  # query VAR DRY_VALUE CMD...: print numbered, capture stdout (empty on failure)
  local _var=$1 _dry=$2 _out=""
  shift 2
  show "$@"
  if ((DRY_RUN)); then
    _out=$_dry
  else
    _out=$("$@" 2>/dev/null) || _out=""
  fi
  printf -v "$_var" '%s' "$_out"
}

# ---- arguments ----------------------------------------------------------------------------------
ACTION=launch
DRY_RUN=0
PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${ZONE:-}
BUCKET=${BUCKET:-}
NAME=${TPU_NAME:-}
QR_NAME=""
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME_VERSION=""
CAPACITY=""
NUM_SLICES=1
WAIT_TIMEOUT=3600
POLL=30
INTERNAL_IP=0
REF=HEAD
GIT_URL=""
PYTHON=""
IMAGE=""
BUILD_IMAGE=0
REQUEUE=0
SKIP_INSTALL=0
EXPERIMENT=""
RUN=""
WORKDIR=""
DB=""
GRACE=300
ENVS=()
TRAIN_FLAGS=()

set_action() {
  [[ $ACTION == launch || $ACTION == "$1" ]] || die "--$ACTION and --$1 exclude each other"
  ACTION=$1
}

set_capacity() {
  [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "--spot and --reserved exclude each other"
  CAPACITY=$1
}

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) TRAIN_FLAGS+=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; continue ;;
    --status) set_action status; continue ;;
    --stop) set_action stop; continue ;;
    --delete) set_action delete; continue ;;
    --spot) set_capacity spot; continue ;;
    --reserved) set_capacity reserved; continue ;;
    --internal-ip) INTERNAL_IP=1; continue ;;
    --skip-install) SKIP_INSTALL=1; continue ;;
    --build-image) BUILD_IMAGE=1; continue ;;
    --config.*=*) TRAIN_FLAGS+=("$arg"); continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --project | --zone | --name | --qr-name | --accelerator | --runtime-version | --wait-timeout | \
      --poll | --ref | --git-url | --experiment | --bucket | --run | --workdir | --db | --env | --grace | \
      --num_slices | --num-slices | --python | --image | --requeue)
      (($#)) || die "$arg needs a value (see --help)"
      key=$arg; val=$1; shift ;;
    *) die "unknown argument '$arg' (see --help; trainer flags go after --)" ;;
  esac
  [[ -n $val ]] || die "$key needs a non-empty value"
  case $key in
    --project) PROJECT=$val ;;
    --zone) ZONE=$val ;;
    --name) NAME=$val ;;
    --qr-name) QR_NAME=$val ;;
    --accelerator) ACCELERATOR=$val ;;
    --num_slices | --num-slices) NUM_SLICES=$val ;;
    --runtime-version) RUNTIME_VERSION=$val ;;
    --wait-timeout) WAIT_TIMEOUT=$val ;;
    --poll) POLL=$val ;;
    --ref) REF=$val ;;
    --git-url) GIT_URL=$val ;;
    --python) PYTHON=$val ;;
    --image) IMAGE=$val ;;
    --requeue) REQUEUE=$val ;;
    --experiment) EXPERIMENT=$val ;;
    --bucket) BUCKET=$val ;;
    --run) RUN=$val ;;
    --workdir) WORKDIR=$val ;;
    --db) DB=$val ;;
    --env) ENVS+=("$val") ;;
    --grace) GRACE=$val ;;
    *) die "unknown option '$key' (see --help)" ;;
  esac
done

# ---- checks -------------------------------------------------------------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

[[ -n $PROJECT ]] || die "no project: pass --project=PROJECT or set PROJECT"
[[ -n $ZONE ]] || die "no zone: pass --zone=ZONE (one with capacity for $ACCELERATOR) or set ZONE"
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator=$ACCELERATOR: expected TYPE-CHIPS such as v5p-32, v5litepod-16, v6e-16, v4-32"
NAME=${NAME:-retro-$ACCELERATOR}
QR_NAME=${QR_NAME:-$NAME}
for n in "$NAME" "$QR_NAME"; do
  [[ $n =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "name '$n': lowercase letters, digits and hyphens, starting with a letter, at most 63"
done
for v in WAIT_TIMEOUT POLL GRACE; do
  is_uint "${!v}" || die "--$(tr '[:upper:]_' '[:lower:]-' <<<"$v")=${!v}: expected whole seconds"
done
is_uint "$REQUEUE" || die "--requeue=$REQUEUE: expected a whole number of requeues"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$NUM_SLICES: expected a whole number >= 1"
# The TPU VMs: NAME for one slice; NAME-0 .. NAME-(N-1) for a multi-slice queued resource.
NODES=("$NAME")
if ((NUM_SLICES > 1)); then
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NAME-$i"); done
fi
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for $ACCELERATOR: pass --runtime-version" ;;
  esac
fi

GC=(--zone="$ZONE" --project="$PROJECT")
SSH_FLAGS=("${GC[@]}" --worker=all)
if ((INTERNAL_IP)); then SSH_FLAGS+=(--internal-ip); fi

# ---- actions ------------------------------------------------------------------------------------
worker_cmd() { cmdline bash tpu_worker.sh "$@"; }  # run in the worker's home directory

on_nodes() {  # on_nodes ssh ARGS... | on_nodes scp FILES...: every worker of every node (slice)
  local verb=$1 node
  shift
  for node in "${NODES[@]}"; do
    if [[ $verb == scp ]]; then
      step gcloud compute tpus tpu-vm scp "$@" "$node:" "${SSH_FLAGS[@]}"
    else
      step gcloud compute tpus tpu-vm ssh "$node" "${SSH_FLAGS[@]}" "$@"
    fi
  done
}

do_status() {
  local state
  query state ACTIVE gcloud compute tpus queued-resources describe "$QR_NAME" "${GC[@]}" \
    --format='value(state.state)'
  if [[ -z $state ]] && ((NUM_SLICES == 1)); then
    query state READY gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format='value(state)'
  fi
  [[ -n $state ]] || die "neither a queued resource '$QR_NAME' nor a TPU VM '$NAME' in $ZONE"
  ((DRY_RUN)) || echo "slice $NAME ($QR_NAME): $state"
  if [[ $state == ACTIVE || $state == READY ]]; then
    on_nodes ssh --command="$(worker_cmd status)"
  fi
}

do_stop() {
  on_nodes ssh --command="$(worker_cmd stop --grace="$GRACE")"
}

do_delete() {
  local state
  query state ACTIVE gcloud compute tpus queued-resources describe "$QR_NAME" "${GC[@]}" \
    --format='value(state.state)'
  if [[ -n $state ]] || ((NUM_SLICES > 1)); then
    if ((DRY_RUN)); then
      note "--force deletes the TPU VMs (every slice) first; without a queued resource" \
        "'$QR_NAME' the TPU VM is deleted instead: gcloud compute tpus tpu-vm delete $NAME ... --quiet"
    fi
    step gcloud compute tpus queued-resources delete "$QR_NAME" "${GC[@]}" --force --quiet
  else
    step gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
  fi
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GC[@]}"
    --format='value(state.state)')
  local state="" deadline=$((SECONDS + WAIT_TIMEOUT))
  show "${describe[@]}"
  note "repeated every ${POLL} s until the state is ACTIVE (at most ${WAIT_TIMEOUT} s);" \
    "FAILED or SUSPENDED stops with an error"
  if ((DRY_RUN)); then return 0; fi
  while :; do
    state=$("${describe[@]}" 2>/dev/null) || state=""
    case $state in
      ACTIVE) echo "slice $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $QR_NAME is $state (a Spot slice may have been preempted). See" \
          "'gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE" \
          "--project=$PROJECT'; then '$PROG --delete --name=$NAME' and run again" ;;
    esac
    ((SECONDS < deadline)) ||
      die "slice $NAME not ACTIVE after ${WAIT_TIMEOUT} s (state: ${state:-unknown}). The request" \
        "stays queued: run the same command again to keep waiting, or --delete to withdraw it"
    echo "slice $NAME: ${state:-no state yet}, waiting (${POLL} s)"
    sleep "$POLL"
  done
}

create_slice() {  # request the slice: the same spec at the start and at every requeue
  local create=(gcloud compute tpus queued-resources create "$QR_NAME")
  if ((NUM_SLICES > 1)); then
    create+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
  else
    create+=(--node-id="$NAME")
  fi
  create+=("${GC[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION")
  if [[ -n $CAPACITY ]]; then create+=("--$CAPACITY"); fi
  step "${create[@]}"
}

HAVE_QR=1  # 0 when a READY TPU VM without a queued resource is reused (nothing to requeue)
ensure_slice() {
  local state node
  query state "" gcloud compute tpus queued-resources describe "$QR_NAME" "${GC[@]}" \
    --format='value(state.state)'
  case $state in
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      die "queued resource $QR_NAME is $state: '$PROG --delete --name=$NAME', then run again" ;;
    "")
      if ((NUM_SLICES == 1)); then
        query node "" gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format='value(state)'
      else
        node=""
      fi
      if [[ $node == READY ]]; then
        echo "reusing TPU VM $NAME (READY, no queued resource)"
        HAVE_QR=0
        return 0
      fi
      [[ -z $node ]] || die "TPU VM $NAME exists in state $node; wait for READY or delete it"
      if ((DRY_RUN)); then
        note "neither exists: request the slice (a READY TPU VM or an existing queued resource" \
          "is reused instead)"
      fi
      create_slice
      ;;
    *) echo "reusing queued resource $QR_NAME ($state)" ;;
  esac
  wait_active
}

# ---- the wheelhouse: built here once per commit, copied to the bucket --------------------------
PY_VERSION=""
check_python() {  # the build Python must make wheels the workers (Linux x86_64) can install
  local info
  if ! info=$("$PYTHON" -c 'import platform, sys; print(sys.implementation.name, platform.system(),
platform.machine(), "%d.%d" % sys.version_info[:2], platform.libc_ver()[1])' 2>/dev/null); then
    ((DRY_RUN)) || die "--python=$PYTHON: cannot run it (the Python that builds the wheelhouse)"
    PY_VERSION="X.Y"
    return 0
  fi
  local glibc=${info##* }
  info=${info% *}
  PY_VERSION=${info##* }
  [[ $info =~ ^cpython\ Linux\ x86_64\ 3\.(1[1-9]|[2-9][0-9])$ ]] ||
    die "--python=$PYTHON is '$info': the wheelhouse must be built by Linux x86_64 CPython >= 3.11" \
      "(the TPU VMs' platform; Cloud Shell will do), or use --image=IMAGE"
  # pip picks the newest manylinux wheels this glibc runs; the TPU VMs' Ubuntu 22.04 has 2.35.
  if [[ $glibc =~ ^2\.([0-9]+)$ ]] && ((BASH_REMATCH[1] > 35)); then
    warn "building with glibc $glibc, newer than the TPU VMs' (2.35): a wheel that needs it would" \
      "not install there (pip --no-index fails on the workers, naming it)"
  fi
}

write_lock() {  # write_lock DEPS COMMIT_DIR LOCK: the project's wheel aside, the pins, the URLs
  local deps=$1 commit=$2 lock=$3 f base dist version rest
  local -a lines=() urls=()
  for f in "$deps"/*.whl; do
    [[ -e $f ]] || die "no wheels in $deps"
    base=${f##*/}
    IFS=- read -r dist version rest <<<"$base"
    [[ -n $rest ]] || die "not a wheel file name: $base"
    lines+=("$dist==$version")
    if [[ $dist == retro_jax ]]; then
      mv "$f" "$commit/$base"
      urls+=("$WHEELS_URL/$base")
    else
      urls+=("$BUCKET/wheels/deps/$base")
    fi
  done
  [[ -n $(compgen -G "$commit/retro_jax-*.whl") ]] || die "pip built no retro_jax wheel"
  {
    echo "# retro-jax $SHA: every wheel of gs://${WHEELS_URL#gs://}/ (built by $PROG, $(date -u '+%F %T') UTC)"
    echo "# python: $PY_VERSION (the workers' Python; cpython, Linux x86_64)"
    printf '%s\n' "${lines[@]}"
  } >"$lock"
  printf '%s\n' "${urls[@]}" >"$commit/wheels.txt"
}

# The commit's tree as TARBALL, unpacked into DIR (the wheelhouse's and the image's sources).
export_commit() {
  step git -C "$REPO" archive --format=tar.gz --output="$1" "$SHA"
  step tar -xzf "$1" -C "$2"
}

prepare_wheels() {
  local build=${TMPDIR:-/tmp}/retro-jax-wheelhouse-${SHA:0:12} built
  local src=$build/src deps=$build/deps commit=$build/commit lock=$build/requirements.txt
  query built "" gcloud storage ls "$WHEELS_URL/requirements.txt"
  if [[ -n $built ]]; then
    echo "wheelhouse of ${SHA:0:12} already in $WHEELS_URL: reused"
    return 0
  fi
  if ((DRY_RUN)); then
    note "not in the bucket yet: build it here, once (a launch of the same commit reuses it)"
  fi
  step rm -rf "$build"
  step mkdir -p "$src" "$deps" "$commit"
  export_commit "$commit/source.tar.gz" "$src"
  step "$PYTHON" -m pip wheel --quiet --no-build-isolation --wheel-dir="$deps" "${src}[tpu]"
  if ((DRY_RUN)); then
    note "the project's wheel moves to $commit; $lock pins every wheel (name==version," \
      "'# python: $PY_VERSION'); $commit/wheels.txt lists their gs:// paths"
  else
    write_lock "$deps" "$commit" "$lock"
  fi
  step gcloud storage rsync "$deps" "$BUCKET/wheels/deps"
  step gcloud storage rsync "$commit" "$WHEELS_URL"
  step gcloud storage cp "$lock" "$WHEELS_URL/requirements.txt"  # last: the wheelhouse is complete
}

# ---- the image (--build-image): built here once per commit, pushed to its registry -------------
prepare_image() {
  local build=${TMPDIR:-/tmp}/retro-jax-image-${SHA:0:12} present
  query present "" docker manifest inspect "$IMAGE"
  if [[ -n $present ]]; then
    echo "image $IMAGE already in its registry: reused"
    return 0
  fi
  if ((DRY_RUN)); then
    note "not in the registry yet: build it here from commit ${SHA:0:12} (the Dockerfile) and push it"
  fi
  step rm -rf "$build"
  step mkdir -p "$build/src"
  export_commit "$build/source.tar.gz" "$build/src"
  step docker build --tag="$IMAGE" "$build/src"
  step docker push "$IMAGE"
}

# ---- install, start, watch ----------------------------------------------------------------------
install_code() {
  on_nodes scp "$SELF_DIR/tpu_worker.sh"
  if [[ -n $IMAGE ]]; then
    on_nodes ssh --command="$(worker_cmd install --image="$IMAGE")"
  elif [[ -n $GIT_URL ]]; then
    on_nodes ssh --command="$(worker_cmd install --git-url="$GIT_URL" --ref="$SHA")"
  else
    on_nodes ssh --command="$(worker_cmd install --wheels="$WHEELS_URL")"
  fi
}

log_dir() {  # log_dir ATTEMPT SLICE: where the workers of one slice copy their logs
  local dir=$BUCKET/logs/$RUN
  if (($1 > 0)); then dir+=/requeue-$1; fi
  if ((NUM_SLICES > 1)); then dir+=/slice-$2; fi
  printf '%s' "$dir"
}

start_run() {  # start_run ATTEMPT: the trainer on every worker of every slice
  local attempt=$1 e i image=()
  local envs=()
  for e in "${ENVS[@]+"${ENVS[@]}"}"; do envs+=(--env="$e"); done
  if [[ -n $IMAGE ]]; then image=(--image="$IMAGE"); fi
  for i in "${!NODES[@]}"; do  # one slice's logs per directory: worker numbers restart per slice
    step gcloud compute tpus tpu-vm ssh "${NODES[$i]}" "${SSH_FLAGS[@]}" --command="$(worker_cmd \
      start --run="$RUN" --log-dir="$(log_dir "$attempt" "$i")" "${image[@]+"${image[@]}"}" \
      "${envs[@]+"${envs[@]}"}" -- "${TRAIN[@]}")"
  done
}

RUN_RC=0
watch_run() {  # watch_run ATTEMPT: 0 when the run ended (RUN_RC), 1 when the slice is lost
  local attempt=$1
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GC[@]}"
    --format='value(state.state)')
  local cat=(gcloud storage cat "$(log_dir "$attempt" 0)/worker-0.exit")
  local state record sigterm_polls=0 missing=0
  show "${describe[@]}"
  show "${cat[@]}"
  if ((DRY_RUN)); then
    ((attempt > 0)) && return 0
    note "both every ${POLL} s: ACTIVE with worker 0's exit record (exit_code=RC sigterm=0|1): the" \
      "run ended, exit RC (after a SIGTERM, 3 more polls first: a preemption's SIGTERM comes" \
      "before the state changes); SUSPENDING, SUSPENDED (preempted) or FAILED: requeue"
    note "shown here as if the slice were then preempted: requeue 1 of $REQUEUE, with the same" \
      "slice spec, wheelhouse (or image), run and workdir"
    return 1
  fi
  echo "watching $QR_NAME every ${POLL} s (Ctrl-C stops the watching; the run goes on)"
  while :; do
    sleep "$POLL"
    state=$("${describe[@]}" 2>/dev/null) || state=""
    case $state in
      ACTIVE)
        missing=0
        record=$("${cat[@]}" 2>/dev/null) || record=""
        [[ -n $record ]] || continue
        if [[ $record == *sigterm=1* ]] && ((sigterm_polls < 3)); then
          sigterm_polls=$((sigterm_polls + 1))
          echo "worker 0 stopped after a SIGTERM ($record): checking the slice ($sigterm_polls/3)"
          continue
        fi
        RUN_RC=${record#*exit_code=}
        RUN_RC=${RUN_RC%% *}
        is_uint "$RUN_RC" || RUN_RC=1
        echo "run $RUN ended on $NAME: $record (worker 0)"
        return 0 ;;
      SUSPENDING | SUSPENDED | FAILED)
        echo "queued resource $QR_NAME is $state: the slice was preempted or lost"
        return 1 ;;
      DELETING)
        die "queued resource $QR_NAME is being deleted (--delete?): stopped watching" ;;
      "")
        missing=$((missing + 1))
        ((missing < 3)) || die "queued resource $QR_NAME not found 3 times: stopped watching"
        ;;
    esac
  done
}

requeue_loop() {
  local attempt=0
  while ! watch_run "$attempt"; do
    if ((attempt >= REQUEUE)); then
      die "the slice was lost again after $REQUEUE requeues (--requeue=$REQUEUE). The run's" \
        "checkpoints are in $WORKDIR: '$PROG --delete --name=$NAME', then the same command" \
        "(same --run) resumes it"
    fi
    attempt=$((attempt + 1))
    if ((!DRY_RUN)); then
      echo "requeue $attempt of $REQUEUE: $QR_NAME again, run $RUN resumes from $WORKDIR"
    fi
    step gcloud compute tpus queued-resources delete "$QR_NAME" "${GC[@]}" --force --quiet
    create_slice
    wait_active
    install_code
    start_run "$attempt"
  done
  if ((DRY_RUN)); then
    note "... at most $REQUEUE requeues; then it stops with an error and leaves the slice as it is"
  fi
  return "$RUN_RC"
}

TRAIN=()
SHA=""
WHEELS_URL=""
check_launch() {  # validate and fill in the run's settings (before anything is printed)
  [[ -n $EXPERIMENT ]] || die "no experiment: pass --experiment=experiments/NAME.py"
  EXPERIMENT=${EXPERIMENT#./}
  [[ $EXPERIMENT != /* && $EXPERIMENT != *..* ]] ||
    die "--experiment=$EXPERIMENT: give the path inside the repository, e.g. experiments/retro_172m.py"
  [[ -f $REPO/$EXPERIMENT ]] || die "--experiment=$EXPERIMENT: no such file in $REPO"
  [[ -n $BUCKET ]] || die "no bucket: pass --bucket=gs://BUCKET or set BUCKET"
  [[ $BUCKET == gs://* ]] || BUCKET=gs://$BUCKET
  BUCKET=${BUCKET%/}
  [[ $BUCKET =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]] || die "--bucket=$BUCKET: not a bucket name"
  local exp_name
  exp_name=$(basename "$EXPERIMENT" .py)
  RUN=${RUN:-$exp_name-$(date -u +%Y%m%d-%H%M%S)}
  [[ $RUN =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--run=$RUN: letters, digits, . _ - only"
  WORKDIR=${WORKDIR:-$BUCKET/checkpoints/$exp_name/$RUN}
  WORKDIR=${WORKDIR%/}
  [[ $WORKDIR == gs://?* ]] ||
    die "--workdir=$WORKDIR: every worker writes there, so it must be a gs:// path"
  local e
  for e in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$e: expected KEY=VALUE"
  done
  [[ -z $IMAGE || -z $GIT_URL ]] || die "--image and --git-url exclude each other"
  ((!BUILD_IMAGE)) || [[ -n $IMAGE ]] || die "--build-image needs --image=IMAGE (where to push it)"
  if [[ -n $IMAGE ]]; then
    [[ $IMAGE =~ ^[a-z0-9][a-z0-9._:/-]*[a-z0-9](:[A-Za-z0-9_][A-Za-z0-9_.-]*)?(@sha256:[0-9a-f]{64})?$ ]] ||
      die "--image=$IMAGE: not an image reference such as us-docker.pkg.dev/PROJECT/REPO/retro-jax:TAG"
  fi
  if ((REQUEUE > 0 && SKIP_INSTALL)); then
    die "--requeue needs an install on the new slice: drop --skip-install"
  fi
  TRAIN=(python -m retro_jax.train --config="$EXPERIMENT" --workdir="$WORKDIR")
  if [[ -n $DB ]]; then
    [[ $DB == gs://* ]] || DB=$BUCKET/databases/$DB
    TRAIN+=(--config.db="$DB")
  fi
  TRAIN+=("${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}")
  if ((!SKIP_INSTALL)) && [[ -z $IMAGE || $BUILD_IMAGE == 1 ]]; then
    SHA=$(git -C "$REPO" rev-parse --verify --quiet "$REF^{commit}") ||
      die "--ref=$REF is not a commit of the repository at $REPO"
    git -C "$REPO" cat-file -e "$SHA:$EXPERIMENT" 2>/dev/null ||
      die "$EXPERIMENT is not in commit ${SHA:0:12} ($REF), the code the workers get: commit it"
    if [[ $REF == HEAD && -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
      warn "uncommitted changes in $REPO are not shipped (only commit ${SHA:0:12})"
    fi
    if [[ -n $IMAGE ]]; then  # --build-image: tag it with the commit unless a tag is given
      if [[ ${IMAGE##*/} != *:* && $IMAGE != *@* ]]; then IMAGE+=:${SHA:0:12}; fi
    elif [[ -z $GIT_URL ]]; then
      WHEELS_URL=$BUCKET/wheels/$SHA
      if [[ -z $PYTHON ]]; then
        PYTHON=python3
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; fi
      fi
    fi
  fi
}

do_launch() {
  # The wheelhouse or image first: a failed build costs no TPU time.
  if [[ -n $WHEELS_URL ]]; then prepare_wheels; fi
  if ((BUILD_IMAGE)); then prepare_image; fi
  ensure_slice
  if ((SKIP_INSTALL)); then
    if ((DRY_RUN)); then note "--skip-install: the code and venv on the workers are used as they are"; fi
  else
    install_code
  fi
  if ((NUM_SLICES > 1)) && ((DRY_RUN)); then
    note "$NUM_SLICES slices: the same trainer on every worker of ${NODES[*]}; the TPU runtime" \
      "sets MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, and" \
      "jax.distributed.initialize() joins all $NUM_SLICES slices into one run"
  fi
  start_run 0
  if ((DRY_RUN)); then
    note "each worker starts the trainer detached (setsid nohup) and returns; logs:" \
      "$BUCKET/logs/$RUN/$( ((NUM_SLICES > 1)) && echo 'slice-S/')worker-N.log"
  else
    echo "started $RUN on $NAME; workdir $WORKDIR; logs $BUCKET/logs/$RUN/worker-N.log"
    echo "status: $PROG --status --name=$NAME --zone=$ZONE --project=$PROJECT"
  fi
  if ((REQUEUE > 0)); then
    if ((HAVE_QR)); then
      requeue_loop
    else
      warn "--requeue: TPU VM $NAME has no queued resource to request again; not watching"
    fi
  elif ((DRY_RUN)) && [[ $CAPACITY == spot ]]; then
    note "--requeue=N would watch the Spot slice and requeue it when preempted"
  fi
}

if [[ $ACTION == launch ]]; then check_launch; fi
if ((DRY_RUN)); then
  echo "# $PROG --dry-run: the commands a real run executes, in order; none is run here."
else
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
fi
if [[ $ACTION == launch && -n $WHEELS_URL ]]; then check_python; fi
if ((BUILD_IMAGE && !DRY_RUN)); then
  command -v docker >/dev/null || die "--build-image: docker not found (or build and push it" \
    "elsewhere: docker build -t IMAGE . && docker push IMAGE)"
fi
case $ACTION in
  launch) do_launch ;;
  status) do_status ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
