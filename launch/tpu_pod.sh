#!/usr/bin/env bash
# Runs ogfr_jax on every worker (host) of a Cloud TPU VM slice: v4-32, v5litepod-64, ...
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] [--run NAME] \
#       [--setup] [--stage_data GS_URI=DIR] [--dry_run] -- ARGS_OF_ogfr_jax.main
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --status [--run NAME]
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --stop [--run NAME] [--grace S]
#
# Example (ViT-B stride 12 on Occluded-Duke, global batch 128 on a v4-32):
#   launch/tpu_pod.sh --tpu ogfr-v4-32 --zone us-central2-b --setup \
#       --stage_data gs://my-bucket/data/Occluded_Duke=/mnt/disks/data/Occluded_Duke -- \
#       --config configs/occluded_duke.py --config.dataset.root=/mnt/disks/data/Occluded_Duke \
#       --config.input.ids_per_batch=32 --config.model.dtype=bfloat16 \
#       --workdir gs://my-bucket/runs/oduke_b_v4_32
#
# The run is started on all workers through `gcloud compute tpus tpu-vm ssh --worker=all`
# and detached there (nohup + setsid): closing this terminal or losing the SSH connection
# does not stop it. Each worker is one JAX process driving its local chips; `ogfr_jax.main`
# (--distributed=auto) sees a TPU VM and calls jax.distributed.initialize() without
# arguments, which finds the coordinator (worker 0), the process count and this worker's id.
# Each worker writes its output to REPO/logs/RUN.worker<N>.log and the process id to
# REPO/logs/RUN.worker<N>.pid (N: the worker number from the TPU metadata).
#
# Flags:
#   --tpu NAME        TPU VM name (required)
#   --zone ZONE       its zone (required)
#   --project P       GCP project (default: gcloud's configured one)
#   --repo DIR        the checkout on the workers (default: ~/ogfr_jax)
#   --run NAME        names the logs and pid files of a run (default: ogfr)
#   --python PY       interpreter used by --setup to create the virtualenv (default: python3);
#                     its version is checked against pyproject.toml's requires-python first
#   --setup           copy this checkout (without .venv/.git) to DIR on every worker and
#                     install it there: PY -m venv DIR/.venv; pip install -e '.[tpu,gcs]'
#                     pinned by requirements/constraints.txt
#   --stage_data GS_URI=DIR   copy a dataset from Cloud Storage to DIR on every worker
#                     (gcloud storage rsync; a second call copies only what changed)
#   --status          for each worker: running or not, and the last lines of its log
#   --stop            SIGTERM the run on every worker (it checkpoints at the next step and
#                     exits with status 143; the same command resumes it), then SIGKILL
#                     whatever is left after --grace seconds (default 300)
#   --dry_run         print the gcloud commands instead of running them
#
# Before starting, each worker checks that its virtualenv's Python satisfies requires-python
# and that no run of the same --run name is still alive there (a TPU is held by one process).
#
# Workdir. Every process writes its shards of each orbax checkpoint, so --workdir must be
# shared by all workers. Best: a gs:// URI (ogfr_jax.paths; the [gcs] extra): orbax writes
# straight to the bucket and marks a complete step with a commit file instead of a rename.
# A gcsfuse mount works too, with the settings orbax's rename of a finished step
# (N.orbax-checkpoint-tmp -> N) needs:
#   gcsfuse --implicit-dirs --rename-dir-limit=200000 BUCKET /mnt/gcs
# (without --rename-dir-limit gcsfuse refuses to rename folders; on a bucket without
# hierarchical namespace that rename is a copy of every object, not atomic, so prefer the
# gs:// workdir). Filestore/NFS mounted on every worker works as it is.
#
# Data. The dataset must be at the same path on every worker. Copy it to each worker's disk
# (--stage_data above: many small JPEGs read every epoch are fastest from local disk), or
# mount the bucket read-only with caching:
#   gcsfuse --implicit-dirs -o ro --file-cache-max-size-mb=-1 --cache-dir=/tmp/gcsfuse \
#       BUCKET /mnt/data
# Batch sizes are global (config.input.ids_per_batch x images_per_id and
# config.input.eval_batch_size); they must divide by the number of chips.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

TPU='' ZONE='' PROJECT='' REPO='~/ogfr_jax' RUN='ogfr' PY='python3' STAGE='' GRACE=300
SETUP=0 STOP=0 STATUS=0 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --stage_data) STAGE="$2"; shift 2 ;;
    --grace) GRACE="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --stop) STOP=1; shift ;;
    --status) STATUS=1; shift ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown flag $1 (arguments of ogfr_jax.main go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo 'tpu_pod.sh: --tpu and --zone are required' >&2; exit 2; }
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "tpu_pod.sh: --run $RUN: use letters, digits, _ . -" >&2; exit 2; }
[[ "$GRACE" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --grace $GRACE: expected seconds" >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

run() {
  if [[ "$DRY" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"
}

# Shell text run on each worker: its number, and the log and pid files of this run there.
WORKER='W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
FILES="$WORKER; LOG=$REPO/logs/$RUN.worker\$W.log; PIDF=$REPO/logs/$RUN.worker\$W.pid"
ALIVE='[ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null'

# Python version against pyproject.toml's requires-python (">=X.Y", optionally ",<A.B").
check_python() {  # $1: interpreter on the worker
  cat <<CHECK
$1 - $REPO/pyproject.toml <<'PYCHECK'
import re, sys
text = open(sys.argv[1]).read()
spec = re.search(r'requires-python\s*=\s*"([^"]+)"', text).group(1)
have = sys.version_info[:2]
for op, ver in re.findall(r'(>=|<=|==|<|>)\s*(\d+(?:\.\d+)?)', spec):
  want = tuple(int(v) for v in ver.split('.'))
  ok = {'>=': have >= want, '<=': have <= want, '==': have[:len(want)] == want,
        '<': have < want, '>': have > want}[op]
  if not ok:
    sys.exit(f'error: {sys.executable} is Python {have[0]}.{have[1]}; ogfr_jax needs '
             f'requires-python {spec!r}: pass --python with a matching interpreter')
PYCHECK
CHECK
}

if [[ "$STATUS" == 1 ]]; then
  on_all_workers "$FILES; if $ALIVE; then echo \"worker \$W: running (pid \$(cat \$PIDF))\"; \
else echo \"worker \$W: not running\"; fi; [ -f \"\$LOG\" ] && tail -n 3 \"\$LOG\" || echo \"worker \$W: no log \$LOG\""
  exit 0
fi

if [[ "$STOP" == 1 ]]; then
  on_all_workers "$FILES; if $ALIVE; then P=\$(cat \$PIDF); kill -TERM -- -\$P 2>/dev/null || kill -TERM \$P; \
for i in \$(seq $GRACE); do kill -0 \$P 2>/dev/null || break; sleep 1; done; \
if kill -0 \$P 2>/dev/null; then echo \"worker \$W: still running after ${GRACE}s, SIGKILL\"; kill -KILL -- -\$P 2>/dev/null || kill -KILL \$P; fi; \
echo \"worker \$W: stopped\"; else echo \"worker \$W: nothing running\"; fi"
  exit 0
fi

if [[ "$SETUP" == 1 ]]; then
  HERE="$(cd "$(dirname "$0")/.." && pwd)"
  ARCHIVE="${TMPDIR:-/tmp}/ogfr_jax.$$.tar.gz"
  run tar -C "$HERE" --exclude=.venv --exclude=.git --exclude='__pycache__' -czf "$ARCHIVE" .
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU":ogfr_jax.tar.gz "${WHERE[@]}" --worker=all
  on_all_workers "set -e; mkdir -p $REPO && tar -C $REPO -xzf ogfr_jax.tar.gz && cd $REPO && \
$(check_python "$PY")
$PY -m venv .venv && .venv/bin/pip install -q -c requirements/constraints.txt -e '.[tpu,gcs]'"
fi

if [[ -n "$STAGE" ]]; then
  [[ "$STAGE" == gs://*=* ]] || { echo "tpu_pod.sh: --stage_data $STAGE: expected gs://BUCKET/PATH=DIR" >&2; exit 2; }
  SRC="${STAGE%%=*}" DST="${STAGE#*=}"
  on_all_workers "set -e; mkdir -p $(printf '%q' "$DST") && gcloud storage rsync --recursive $(printf '%q' "$SRC") $(printf '%q' "$DST")"
fi

[[ $# -gt 0 ]] || { [[ "$SETUP" == 1 || -n "$STAGE" ]] && exit 0; echo 'tpu_pod.sh: nothing to run (put the arguments of ogfr_jax.main after --)' >&2; exit 2; }
ARGS="$(printf '%q ' "$@")"
on_all_workers "set -e; cd $REPO && mkdir -p logs && $FILES; \
if $ALIVE; then echo \"worker \$W: run $RUN is still running (pid \$(cat \$PIDF)); --stop it first\" >&2; exit 1; fi; \
$(check_python .venv/bin/python)
PYTHONUNBUFFERED=1 nohup setsid .venv/bin/python -m ogfr_jax.main $ARGS >\"\$LOG\" 2>&1 </dev/null & \
echo \$! >\"\$PIDF\"; echo \"worker \$W: started pid \$(cat \$PIDF), log \$LOG\""
echo "tpu_pod.sh: started run $RUN; follow it with --status, end it with --stop"
