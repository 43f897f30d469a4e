#!/usr/bin/env bash
# Run a config through `ray job submit`, the way scheduled runs use the pipeline: start a local
# Ray head if none answers (and, with WORKER_GPUS, a worker node with logical GPUs: a local
# rehearsal of a CPU head + GPU workers cluster), submit, follow the logs, stop what we started.
#   jobs/submit_local.sh [CONFIG [JOB ARGS...]]   (default configs/local.yaml; e.g. --incremental)
# The demo's corpus: when DATA is a missing local path and the config sets input.create_sample_rows
# (demo only), a sample corpus of that many rows is drawn there first; the job never draws one.
# Env: VENV (.venv), DATA (data/sample), OUT (out/local), DASHBOARD_PORT (8265), GCS_PORT (6379),
#      JOB_TIMEOUT (seconds, 900), WORKER_GPUS (0: no worker node), WORKER_CPUS (2),
#      HEAD_CPUS (all), OBJECT_STORE_BYTES (Ray's default), READY_TIMEOUT (seconds, 120).
# Exit status: the job's (0 succeeded, 1 otherwise; the job's own status is printed), 124 on timeout.
# Note: stopping the head it started uses `ray stop`, which stops every Ray process of this user.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
CONFIG=${1:-configs/local.yaml}
shift $(( $# > 0 ? 1 : 0 ))
DATA=${DATA:-$ROOT/data/sample}
OUT=${OUT:-$ROOT/out/local}
PORT=${DASHBOARD_PORT:-8265}
GCS_PORT=${GCS_PORT:-6379}
ADDRESS=http://127.0.0.1:$PORT
READY_TIMEOUT=${READY_TIMEOUT:-120}
# The head's workers and the job's `python` must be this environment's.
export PATH="$ROOT/$VENV/bin:$PATH"
# Token authentication (Ray's default since 2.5x): once any local Ray run has written
# ~/.ray/auth_token, `ray job submit` to a head started without RAY_AUTH_MODE=token fails with
# "Authentication required". The head, the worker, the CLI and the job share the token;
# generated once if missing; never printed.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# The vLLM engine's interpreter (make vllm-env), for the head this script starts: a submitted job's
# working dir is a copy without the (git-ignored) .venv-vllm, so the job is told where it is.
if [ -z "${RESPRUNE_VLLM_PYTHON:-}" ] && [ -x "$ROOT/.venv-vllm/bin/python" ]; then
  export RESPRUNE_VLLM_PYTHON="$ROOT/.venv-vllm/bin/python"
fi
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate >/dev/null 2>&1
fi
if [[ "$DATA" != *://* ]] && [ ! -e "$DATA" ]; then
  rows=$(python -c 'import sys; from pipeline.config import load_config
print(load_config(sys.argv[1]).input.create_sample_rows or "")' "$CONFIG")
  if [ -n "$rows" ]; then
    echo "drawing the sample corpus ($rows rows) into $DATA"
    python -m pipeline.tiny.shapes_world "$DATA" --rows "$rows" >/dev/null
  fi
fi
store=()
[ -n "${OBJECT_STORE_BYTES:-}" ] && store=(--object-store-memory "$OBJECT_STORE_BYTES")

started=0
cleanup() { if [ "$started" = 1 ]; then ray stop --force >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT
answers() {  # a head answers on its dashboard port (401 before authentication counts)
  python - "$ADDRESS" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=3)
except urllib.error.HTTPError:
    pass
PY
}
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if ! answers; then
  echo "starting a local Ray head (dashboard $ADDRESS)"
  head_cpus=()
  [ -n "${HEAD_CPUS:-}" ] && head_cpus=(--num-cpus "$HEAD_CPUS")
  # The job agent's HTTP port is fixed (52365) unless given: a second Ray instance on the machine
  # (another user's, a test run's, this script's worker node) then holds it and no job can be
  # submitted. Each node takes a free one.
  ray start --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$PORT" \
    --dashboard-agent-listen-port "$(free_port)" --num-gpus 0 "${head_cpus[@]}" "${store[@]}" --disable-usage-stats >/dev/null
  started=1
  if [ "${WORKER_GPUS:-0}" != 0 ]; then
    echo "starting a local worker node: ${WORKER_CPUS:-2} CPUs, $WORKER_GPUS logical GPUs"
    ray start --address "127.0.0.1:$GCS_PORT" --dashboard-agent-listen-port "$(free_port)" --num-cpus "${WORKER_CPUS:-2}" --num-gpus "$WORKER_GPUS" \
      "${store[@]}" --disable-usage-stats >/dev/null
  fi
fi

# Right after `ray start` the job agent may not be up yet: Ray answers "No available agent to
# submit job, please try again later". Wait until the head lists jobs, then retry that answer.
deadline=$(( SECONDS + READY_TIMEOUT ))
until ray job list --address "$ADDRESS" >/dev/null 2>&1; do
  if (( SECONDS >= deadline )); then echo "the Ray head at $ADDRESS is not ready after ${READY_TIMEOUT}s" >&2; exit 1; fi
  sleep 2
done
id="caption-$(date -u +%Y%m%dT%H%M%S)-$$"
# The retries get their own bound: on a loaded machine the wait above can spend most of its bound
# and the agent still come up after it (seen: the first submit refused, no time left to retry).
deadline=$(( SECONDS + 90 ))
# Paths are made absolute: the job runs in a copy of the working directory.
for attempt in $(seq 1 18); do
  if reply=$(ray job submit --address "$ADDRESS" --no-wait --submission-id "$id" --working-dir "$ROOT" -- \
      python jobs/caption_corpus.py --config "$CONFIG" --input "$DATA" --output "$OUT" "$@" 2>&1); then
    break
  fi
  if [[ "$reply" == *"No available agent"* ]] && (( attempt < 18 && SECONDS < deadline )); then
    echo "the head has no job agent yet (attempt $attempt): retrying in 5 s"; sleep 5; continue
  fi
  echo "$reply" >&2; exit 1
done
echo "submitted $id"
rc=0
timeout "${JOB_TIMEOUT:-900}" ray job logs --address "$ADDRESS" --follow "$id" || rc=$?
if [ "$rc" = 124 ]; then
  echo "job $id still running after ${JOB_TIMEOUT:-900}s: stopping it" >&2
  ray job stop --address "$ADDRESS" "$id" >/dev/null 2>&1 || true
  exit 124
fi
status=$(ray job status --address "$ADDRESS" "$id" 2>&1 | tail -n 3)
echo "$status"
echo "output: $OUT"
[[ "$status" == *"succeeded"* ]]
