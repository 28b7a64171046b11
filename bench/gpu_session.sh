#!/usr/bin/env bash
# Everything issue 13 still needs from one GPU, in one call of the lent machine (about 9 minutes):
#   1. the GPU-only tests: CUDA graphs against eager, batches prepared ahead on another thread;
#   2. bench/gpu_check.sh in fp16 (Offline, Server, SingleStream eager / in-process / graphs=1, the
#      torch-profiler tables);
#   3. Offline with the worker's prepare stage off (DISTBERT_WORKER_PIPELINE=0), for the A/B;
#   4. SingleStream's floor: the same backend in a bare loop (bench/ss_bare.py), for issue 11's
#      "what distbert adds on real hardware".
# Results go to $OUT (the device tool's output folder) or ./results/gpu-session-<time>.
#
#   bench/gpu_session.sh                                 # on the GPU machine
#   DEVICE=cpu SHAPE=tiny OFFLINE_SAMPLES=64 SERVER_QPS=20 SERVER_QUERIES=40 SS_QUERIES=50 \
#       bench/gpu_session.sh                             # dry run on a CPU box
#
# On the lent machine (DEVELOPERS.md): pyzmq and mlcommons-loadgen come from wheels carried in .whl/,
# the data from .data/ (both ignored by git, carried with the device tool's `carry`).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
if [[ -d "$REPO/.data" && -z "${DISTBERT_DATA_DIR:-}" ]]; then
    # the device carry has the two files flat in .data/: give distbert the layout it looks for
    mkdir -p /tmp/distbert-data/squad /tmp/distbert-data/bert
    ln -sf "$REPO/.data/dev-v1.1.json" /tmp/distbert-data/squad/dev-v1.1.json
    ln -sf "$REPO/.data/vocab.txt" /tmp/distbert-data/bert/vocab.txt
    export DISTBERT_DATA_DIR=/tmp/distbert-data
fi
RESULTS="${OUT:-$REPO/results}/gpu-session-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RESULTS"
export WORK="$RESULTS/check" PRECISIONS="${PRECISIONS:-fp16}" DEVICE="${DEVICE:-cuda}"
export DISTBERT_CACHE="${DISTBERT_CACHE:-/tmp/distbert-cache}"
log="$RESULTS/session.log"
exec > >(tee -a "$log") 2>&1

echo "== $(date -u +%FT%TZ) gpu_session on $(hostname): DEVICE=$DEVICE PRECISIONS=$PRECISIONS"
echo "== 1. GPU-only tests"
if "$PYTHON" -c "import pytest, psutil" 2>/dev/null; then
    timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_torch_graphs.py tests/test_worker_pipeline.py \
        -o addopts="" 2>&1 | tail -15
else
    echo "pytest or psutil missing here: tests skipped (install them from carried wheels to run them)"
fi

echo "== 2. bench/gpu_check.sh ($PRECISIONS)"
timeout 420 bash bench/gpu_check.sh
echo "gpu_check exit $?"

echo "== 3. Offline with the worker's prepare stage off (A/B against step 2's offline-$PRECISIONS)"
MODEL="$WORK/model-${SHAPE:-large}-torch"
for p in $PRECISIONS; do
    DISTBERT_WORKER_PIPELINE=0 timeout 150 "$PYTHON" -m distbert run --scenario Offline --backend torch \
        --model "$MODEL" --device "$DEVICE" --precision "$p" --workers 1 --execution-mode test \
        --heartbeat-timeout 120 --test-query-count "${OFFLINE_SAMPLES:-10833}" --output "$WORK/offline-nopipeline-$p"
done
echo "== 4. SingleStream's floor: the same backend in a bare loop (bench/ss_bare.py; gpu_summary sets it beside step 2's SingleStream runs)"
BARE_QUERIES=$(( ${SS_QUERIES:-2000} < 500 ? ${SS_QUERIES:-2000} : 500 ))
for p in $PRECISIONS; do
    timeout 90 "$PYTHON" bench/ss_bare.py --backend torch --model "$MODEL" --device "$DEVICE" --precision "$p" \
        --queries "$BARE_QUERIES" --json "$WORK/ss-bare-$p.json"
    # the same on a second thread (a worker process computes Offline/Server batches on one)
    timeout 90 "$PYTHON" bench/ss_bare.py --backend torch --model "$MODEL" --device "$DEVICE" --precision "$p" \
        --queries "$BARE_QUERIES" --thread --json "$WORK/ss-bare-thread-$p.json"
done
"$PYTHON" bench/gpu_summary.py "$WORK"
echo "== done $(date -u +%FT%TZ); results in $RESULTS"
