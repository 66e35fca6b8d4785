#!/usr/bin/env bash
# Run one kdjax experiment on every worker of a Cloud TPU VM pod slice: the same command on all hosts.
#
#   scripts/launch_tpu.sh setup  TPU_NAME ZONE              copy this checkout to every worker, install .venv
#   scripts/launch_tpu.sh run    TPU_NAME ZONE EXPERIMENT [--flag=value ...]
#   scripts/launch_tpu.sh kill   TPU_NAME ZONE              stop kdjax python processes of this user (all workers)
#
# Examples (see docs/scaling.md for meshes and batch sizes):
#   scripts/launch_tpu.sh run kd-v5p-64 us-east5-a precompute_teacher \
#       --config=configs/precompute_teacher.py --workdir=/mnt/shared/store --config.teacher.workdir=/mnt/shared/teacher
#   scripts/launch_tpu.sh run kd-v5p-64 us-east5-a lm_distill --config=configs/lm_distill.py \
#       --workdir=/mnt/shared/kd --config.teacher.workdir=/mnt/shared/teacher \
#       --config.store_dir=/mnt/shared/store/store-train --config.mesh.data=1 --config.mesh.fsdp=-1 \
#       --config.batch_size=256
#
# Nothing names hosts or process ids: with KDJAX_DISTRIBUTED=auto (set below) `kdjax.distributed.initialize`
# lets `jax.distributed.initialize()` read the worker list and this worker's id from the TPU VM's metadata.
# --workdir (and the teacher / store paths) must be one shared POSIX filesystem mounted at the same path on
# every worker (e.g. Filestore NFS): checkpoints, the store and its manifest are written by several hosts.
#
# Environment: KDJAX_REMOTE_DIR (default ~/kdjax) is where the code lives on the workers; DRY_RUN=1 prints
# the gcloud commands instead of running them; TPU_PROJECT selects a project other than gcloud's default.
set -euo pipefail

usage() { sed -n '2,6p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
remote_dir=${KDJAX_REMOTE_DIR:-'~/kdjax'}
project_flag=()
[[ -n ${TPU_PROJECT:-} ]] && project_flag=(--project "$TPU_PROJECT")

run() {  # prints or runs one command
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {  # the same shell command on every worker of the slice, in parallel
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all --command "$1"
}

case $action in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    # Every worker gets the same code (a pod runs one program; different code per host would deadlock).
    archive=$(mktemp -t kdjax.XXXXXX.tar.gz)
    run tar -C "$repo" --exclude=.venv --exclude=workdirs --exclude=.git -czf "$archive" .
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/kdjax.tar.gz" --zone "$zone" \
      "${project_flag[@]}" --worker=all
    on_all_workers "mkdir -p $remote_dir && tar -C $remote_dir -xzf /tmp/kdjax.tar.gz && cd $remote_dir && \
python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    experiment=$1
    shift
    args=$(printf '%q ' "$@")
    # Unbuffered output, one log per worker in its home directory (gcloud interleaves the streams).
    # KDJAX_DISTRIBUTED=auto: jax.distributed finds the workers and this worker's id in the TPU VM metadata.
    on_all_workers "set -o pipefail; cd $remote_dir && KDJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 \
.venv/bin/python -m experiments.$experiment $args \
2>&1 | tee \$HOME/kdjax-$experiment.log"
    ;;
  kill)
    # A crashed worker leaves the others waiting in a collective; free the TPU chips before relaunching.
    on_all_workers "pkill -u \$USER -f 'python -m experiments\.' || true"
    ;;
  *)
    usage
    ;;
esac
