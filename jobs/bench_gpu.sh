#!/usr/bin/env bash
# The GPU benchmark at LLaVA-1.5-7B shapes (pipeline/bench/gpu.py) as one command for a lent GPU
# machine: random bf16 weights built on the GPU, nothing installed or downloaded, ~8 minutes at
# most; prints a table and ends with one `RESULT {json}` line.
#   bash jobs/bench_gpu.sh [ARGS for python -m pipeline.bench.gpu]     (e.g. --vllm off, --smoke)
# Env: PYTHON      interpreter with torch + transformers (default: python3 on PATH)
#      OUT         a folder: bench_gpu.log (this output), bench_gpu.json (figures after every
#                  phase) and bench_gpu_vllm.log (the vLLM child's log) go there
#      BENCH_TIMEOUT  seconds before SIGTERM (470; the benchmark then reports what it has;
#                  SIGKILL 20 s later). The benchmark's own budget is --budget-s (440).
#      BENCH_TMP   where vLLM's model folder (config + tokenizer, no weights) is made ($TMPDIR)
# Exit status: the benchmark's (0 when it printed RESULT), 124/137 when the timeout ended it.
set -uo pipefail
cd "$(dirname "$0")/.."
# Before the interpreter starts: the budget counts start-up and imports too.
BENCH_T0=$(date +%s.%N)
export BENCH_T0
PY=${PYTHON:-$(command -v python3 || command -v python)}
TIMEOUT=${BENCH_TIMEOUT:-470}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# No network there: anything that tries to reach a hub fails at once instead of retrying.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/bench_gpu.log"
fi
echo "bench_gpu: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)), timeout ${TIMEOUT}s, OUT=${OUT:-unset}" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
timeout -s TERM -k 20 "$TIMEOUT" "$PY" -m pipeline.bench.gpu "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
