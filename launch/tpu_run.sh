#!/usr/bin/env bash
# Run an experiment on a Cloud TPU VM slice: create or reuse the slice (queued resources), install
# this repository on every worker, start `python -m retro_jax.train` on all workers at once,
# detached, with its workdir and per-worker logs in a gs:// bucket. `--help` for the options.
#
#   launch/tpu_run.sh --project=P --zone=us-east5-a --bucket=gs://B --accelerator=v5p-32 --spot \
#     --experiment=experiments/retro_172m.py [--run=NAME] [--config.x=y ...] [-- more train flags]
#   launch/tpu_run.sh ... --num_slices=2 ...   multi-slice: 2 slices (nodes NAME-0, NAME-1) of one
#                                              queued resource, joined over the data-centre network
#   launch/tpu_run.sh --status | --stop | --delete  (same --name / --project / --zone)
#
# Every command is printed, numbered, before it runs; `--dry-run` prints them without running
# any (only read-only `git rev-parse` / `git status` run locally, to name the code revision).
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

Code:
  --ref=REF              git revision to ship (default HEAD; uncommitted changes are not shipped)
  --git-url=URL          workers `git clone` URL and check out REF (REF must be pushed) instead of
                         receiving a `git archive` of REF through scp
  --skip-install         keep the code and venv already installed on the workers

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
  --config.KEY=VALUE     passed to the trainer as is, as is everything after `--`

Layout (WORKSPACE.md): workdir gs://BUCKET/checkpoints/EXPERIMENT/RUN/ (checkpoints/,
metrics.jsonl, tensorboard/, config.json, logs/host-P.txt), logs gs://BUCKET/logs/RUN/worker-N.log
(slice-S/worker-N.log with --num_slices; copied every 60 s and at exit). A preempted Spot slice: `--delete`, then the same command with the same --run.
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
    --config.*=*) TRAIN_FLAGS+=("$arg"); continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --project | --zone | --name | --qr-name | --accelerator | --runtime-version | --wait-timeout | \
      --poll | --ref | --git-url | --experiment | --bucket | --run | --workdir | --db | --env | --grace | \
      --num_slices | --num-slices)
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
        return 0
      fi
      [[ -z $node ]] || die "TPU VM $NAME exists in state $node; wait for READY or delete it"
      if ((DRY_RUN)); then
        note "neither exists: request the slice (a READY TPU VM or an existing queued resource" \
          "is reused instead)"
      fi
      local create=(gcloud compute tpus queued-resources create "$QR_NAME")
      if ((NUM_SLICES > 1)); then
        create+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
      else
        create+=(--node-id="$NAME")
      fi
      create+=("${GC[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION")
      if [[ -n $CAPACITY ]]; then create+=("--$CAPACITY"); fi
      step "${create[@]}"
      ;;
    *) echo "reusing queued resource $QR_NAME ($state)" ;;
  esac
  wait_active
}

install_code() {
  local sha=$SHA archive
  if [[ -n $GIT_URL ]]; then
    on_nodes scp "$SELF_DIR/tpu_worker.sh"
    on_nodes ssh --command="$(worker_cmd install --git-url="$GIT_URL" --ref="$sha")"
  else
    archive=${TMPDIR:-/tmp}/retro-jax-${sha:0:12}.tar.gz
    step git -C "$REPO" archive --format=tar.gz --output="$archive" "$sha"
    on_nodes scp "$SELF_DIR/tpu_worker.sh" "$archive"
    on_nodes ssh --command="$(worker_cmd install --archive="$(basename "$archive")" --revision="$sha")"
  fi
}

TRAIN=()
SHA=""
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
  TRAIN=(python -m retro_jax.train --config="$EXPERIMENT" --workdir="$WORKDIR")
  if [[ -n $DB ]]; then
    [[ $DB == gs://* ]] || DB=$BUCKET/databases/$DB
    TRAIN+=(--config.db="$DB")
  fi
  TRAIN+=("${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}")
  if ((!SKIP_INSTALL)); then
    SHA=$(git -C "$REPO" rev-parse --verify --quiet "$REF^{commit}") ||
      die "--ref=$REF is not a commit of the repository at $REPO"
    git -C "$REPO" cat-file -e "$SHA:$EXPERIMENT" 2>/dev/null ||
      die "$EXPERIMENT is not in commit ${SHA:0:12} ($REF), the code the workers get: commit it"
    if [[ $REF == HEAD && -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
      warn "uncommitted changes in $REPO are not shipped (only commit ${SHA:0:12})"
    fi
  fi
}

do_launch() {
  local e
  ensure_slice
  if ((SKIP_INSTALL)); then
    if ((DRY_RUN)); then note "--skip-install: the code and venv on the workers are used as they are"; fi
  else
    install_code
  fi
  local envs=() i log_dir
  for e in "${ENVS[@]+"${ENVS[@]}"}"; do envs+=(--env="$e"); done
  if ((NUM_SLICES > 1)) && ((DRY_RUN)); then
    note "$NUM_SLICES slices: the same trainer on every worker of ${NODES[*]}; the TPU runtime" \
      "sets MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, and" \
      "jax.distributed.initialize() joins all $NUM_SLICES slices into one run"
  fi
  for i in "${!NODES[@]}"; do  # one slice's logs per directory: worker numbers restart per slice
    log_dir=$BUCKET/logs/$RUN
    if ((NUM_SLICES > 1)); then log_dir+=/slice-$i; fi
    step gcloud compute tpus tpu-vm ssh "${NODES[$i]}" "${SSH_FLAGS[@]}" --command="$(worker_cmd \
      start --run="$RUN" --log-dir="$log_dir" "${envs[@]+"${envs[@]}"}" -- "${TRAIN[@]}")"
  done
  if ((DRY_RUN)); then
    note "each worker starts the trainer detached (setsid nohup) and returns; logs:" \
      "$BUCKET/logs/$RUN/$( ((NUM_SLICES > 1)) && echo 'slice-S/')worker-N.log"
  else
    echo "started $RUN on $NAME; workdir $WORKDIR; logs $BUCKET/logs/$RUN/worker-N.log"
    echo "status: $PROG --status --name=$NAME --zone=$ZONE --project=$PROJECT"
  fi
}

if [[ $ACTION == launch ]]; then check_launch; fi
if ((DRY_RUN)); then
  echo "# $PROG --dry-run: the commands a real run executes, in order; none is run here."
else
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
fi
case $ACTION in
  launch) do_launch ;;
  status) do_status ;;
  stop) do_stop ;;
  delete) do_delete ;;
esac
