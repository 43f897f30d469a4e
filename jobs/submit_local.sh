#!/usr/bin/env bash
# Run a config through `ray job submit`, the way scheduled runs use the pipeline:
# start a local Ray head if none answers, submit, print the summary, stop what we started.
#   jobs/submit_local.sh [CONFIG]        (default configs/local.yaml)
# Env: VENV (.venv), DATA (data/sample), OUT (out/local), DASHBOARD_PORT (8265),
#      GCS_PORT (6379), JOB_TIMEOUT (seconds, 900).
# Note: stopping the head it started uses `ray stop`, which stops every Ray process of this user.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
CONFIG=${1:-configs/local.yaml}
DATA=${DATA:-$ROOT/data/sample}
OUT=${OUT:-$ROOT/out/local}
PORT=${DASHBOARD_PORT:-8265}
ADDRESS=http://127.0.0.1:$PORT
# The head's workers and the job's `python` must be this environment's.
export PATH="$ROOT/$VENV/bin:$PATH"
# Token authentication on (Ray's local default since 2.5x): the head, the CLI and the job
# share ~/.ray/auth_token. Generated once if missing; never printed.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate >/dev/null 2>&1
fi

started=0
cleanup() { if [ "$started" = 1 ]; then ray stop --force >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT
if ! python - "$ADDRESS" <<'PY' 2>/dev/null; then
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=3)
except urllib.error.HTTPError:
    pass  # it answered (e.g. 401 before authentication): a head is there
PY
  echo "starting a local Ray head (dashboard $ADDRESS)"
  ray start --head --port "${GCS_PORT:-6379}" --dashboard-host 127.0.0.1 --dashboard-port "$PORT" \
    --disable-usage-stats >/dev/null
  started=1
fi

# Paths are made absolute: the job runs in a copy of the working directory.
timeout "${JOB_TIMEOUT:-900}" ray job submit --address "$ADDRESS" --working-dir "$ROOT" -- \
  python jobs/caption_corpus.py --config "$CONFIG" --input "$DATA" --output "$OUT"
echo "output: $OUT"
