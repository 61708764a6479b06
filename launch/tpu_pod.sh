#!/usr/bin/env bash
# Runs ogfr_jax on every worker (host) of a Cloud TPU VM slice: v4-32, v5litepod-64, ...
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] \
#       [--setup] [--stop] [--dry_run] -- ARGS_OF_ogfr_jax.main
#
# Example (ViT-B stride 12 on Occluded-Duke, global batch 128 on a v4-32):
#   launch/tpu_pod.sh --tpu ogfr-v4-32 --zone us-central2-b --setup -- \
#       --config configs/occluded_duke.py --config.dataset.root=/mnt/data/Occluded_Duke \
#       --config.input.ids_per_batch=32 --config.model.dtype=bfloat16 \
#       --workdir /mnt/shared/runs/oduke_b_v4_32
#
# The same command runs on all workers through
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...
# Each worker is one JAX process driving its local chips; `ogfr_jax.main` (--distributed=auto)
# sees a TPU VM and calls jax.distributed.initialize() without arguments, which finds the
# coordinator (worker 0), the process count and this worker's id from the TPU metadata.
#
# Flags:
#   --tpu NAME        TPU VM name (required)
#   --zone ZONE       its zone (required)
#   --project P       GCP project (default: gcloud's configured one)
#   --repo DIR        the checkout on the workers (default: ~/ogfr_jax)
#   --setup           first copy this checkout (without .venv/.git) to DIR on every worker
#                     and install it there: python3 -m venv DIR/.venv; pip install -e '.[tpu]'
#                     pinned by requirements/constraints.txt
#   --stop            only stop a run left on the workers (a TPU is held by one process)
#   --dry_run         print the gcloud commands instead of running them
#
# Requirements: the dataset at the same path on every worker (a local copy or a shared mount),
# and --workdir on a file system that every worker mounts (Filestore/NFS, or a gcsfuse
# mount): process 0 writes config.json, logs and results there, every process reads
# config.json and writes its shards of each orbax checkpoint there. Batch sizes are global
# (config.input.ids_per_batch x images_per_id and config.input.eval_batch_size); they must
# divide by the number of chips. Output of all workers is streamed here, prefixed by gcloud.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

TPU='' ZONE='' PROJECT='' REPO='~/ogfr_jax' SETUP=0 STOP=0 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --stop) STOP=1; shift ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (arguments of ogfr_jax.main go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo 'tpu_pod.sh: --tpu and --zone are required' >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

run() {
  if [[ "$DRY" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"
}

if [[ "$STOP" == 1 ]]; then
  # The bracket keeps pkill from matching the shell that runs this very command.
  on_all_workers "pkill -f '[o]gfr_jax.main' || true"
  exit 0
fi

if [[ "$SETUP" == 1 ]]; then
  HERE="$(cd "$(dirname "$0")/.." && pwd)"
  ARCHIVE="$(mktemp -d)/ogfr_jax.tar.gz"
  tar -C "$HERE" --exclude=.venv --exclude=.git --exclude='__pycache__' -czf "$ARCHIVE" .
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU":ogfr_jax.tar.gz "${WHERE[@]}" --worker=all
  on_all_workers "mkdir -p $REPO && tar -C $REPO -xzf ogfr_jax.tar.gz && cd $REPO && \
python3 -m venv .venv && .venv/bin/pip install -q -c requirements/constraints.txt -e '.[tpu]'"
fi

[[ $# -gt 0 ]] || { [[ "$SETUP" == 1 ]] && exit 0; echo 'tpu_pod.sh: nothing to run (put the arguments of ogfr_jax.main after --)' >&2; exit 2; }
ARGS="$(printf '%q ' "$@")"
on_all_workers "cd $REPO && PYTHONUNBUFFERED=1 .venv/bin/python -m ogfr_jax.main $ARGS"
