#!/usr/bin/env bash
# GPU check: the real distbert path on one NVIDIA GPU, BERT-Large shape, PyTorch backend.
#
# For a GPU box of your own: with fp16 and bf16 it runs 7-15 minutes, more than one command on the
# lent GPU machine may run (10 minutes) and most of that machine's 15-minute lease. There, run the
# device commands of bench/gpu/ instead (docs/gpu.md, "Measuring on a GPU").
#
#   bench/gpu_check.sh                     # fp16 and bf16: Offline, Server, SingleStream (worker process
#                                          # and --in-process-worker), Offline and SingleStream again with
#                                          # --option graphs=1 (CUDA graphs), then a torch-profiler capture
#                                          # of the backend (bench/gpu_profile.py) for the first precision
#   PRECISIONS=fp16 SERVER_QPS=800 bench/gpu_check.sh
#   DEVICE=cpu SHAPE=tiny PRECISIONS=fp32 OFFLINE_SAMPLES=64 SERVER_QPS=20 SERVER_QUERIES=40 \
#       bench/gpu_check.sh                 # dry run of the script itself on a CPU box
#
# Needs: PyTorch with CUDA + transformers + distbert's deps in $PYTHON's environment, the SQuAD dev
# set and vocab where `distbert run` finds them (DISTBERT_DATA_DIR, the cache, or DATASET=/VOCAB=).
# No internet: the model is a generated random-weight BERT-Large (speed is real, accuracy is not).
# Prints every command before running it, then samples/s and p99 latency per run (bench/gpu_summary.py).
# The profiler's key-averages tables land in $WORK/profile/ (batch 1 and 64 at seq 192, eager and graphs=1).
# Budget: 10-30 s to generate the model, then up to RUN_TIMEOUT (240 s) per run; 386 s in all on the
# H200 of 2026-11-30 with PRECISIONS="fp16 bf16", before every shape of the ladder was warmed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# the team's copy of the SQuAD dev set and vocab, when this checkout sits beside one (or holds shared/)
if [ -z "${DISTBERT_DATA_DIR:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -d "$d" ]; then DISTBERT_DATA_DIR="$(cd "$d" && pwd)"; export DISTBERT_DATA_DIR; break; fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
export DISTBERT_NO_PROGRESS=1

WORK="${WORK:-$REPO/results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
DEVICE="${DEVICE:-cuda}"
SHAPE="${SHAPE:-large}"
PRECISIONS="${PRECISIONS:-fp16 bf16}"
OFFLINE_SAMPLES="${OFFLINE_SAMPLES:-10833}"      # one pass over the dev set
SERVER_QPS="${SERVER_QPS:-400}"
SERVER_QUERIES="${SERVER_QUERIES:-4000}"         # ~10 s at the default QPS
SS_QUERIES="${SS_QUERIES:-2000}"                 # SingleStream queries per run (~5 s at 2 ms)
RUN_TIMEOUT="${RUN_TIMEOUT:-240}"                # seconds per distbert run
PROFILE_BATCHES="${PROFILE_BATCHES:-1 64}"       # batch sizes the profiler captures (seq PROFILE_SEQ)
PROFILE_SEQ="${PROFILE_SEQ:-192}"
# loading BERT-Large (1.3 GB) onto the GPU can keep a worker busy longer than the default heartbeat timeout
HEARTBEAT_TIMEOUT="${HEARTBEAT_TIMEOUT:-120}"
DATA_ARGS=()
if [[ -n "${DATASET:-}" ]]; then DATA_ARGS+=(--dataset "$DATASET"); fi
if [[ -n "${VOCAB:-}" ]]; then DATA_ARGS+=(--vocab "$VOCAB"); fi

say() { printf '\n== %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }

say "environment"
run mkdir -p "$WORK"
if command -v nvidia-smi >/dev/null; then
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
run "$PYTHON" -c 'import sys, torch, transformers
gpu = sys.argv[1] != "cpu"
assert torch.cuda.is_available() or not gpu, "torch sees no CUDA GPU"
print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| transformers", transformers.__version__, "|", torch.cuda.get_device_name(0) if gpu else "cpu")' "$DEVICE"

MODEL="${MODEL:-$WORK/model-$SHAPE-torch}"
if [[ ! -f "$MODEL/model.pytorch" ]]; then
    say "random-weight BERT-$SHAPE (torch format)"
    run "$PYTHON" -m distbert model make --shape "$SHAPE" --format torch --seed 0 --out "$MODEL"
fi

for precision in $PRECISIONS; do
    base=(--backend torch --model "$MODEL" --device "$DEVICE" --precision "$precision"
          --mode performance --execution-mode test --heartbeat-timeout "$HEARTBEAT_TIMEOUT"
          ${DATA_ARGS[@]+"${DATA_ARGS[@]}"})
    common=("${base[@]}" --workers 1)
    say "Offline, $precision"
    run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario Offline "${common[@]}" \
        --test-query-count "$OFFLINE_SAMPLES" --output "$WORK/offline-$precision"
    say "Server at $SERVER_QPS QPS, $precision"
    run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario Server "${common[@]}" \
        --target-qps "$SERVER_QPS" --test-query-count "$SERVER_QUERIES" --output "$WORK/server-$precision"
    say "SingleStream, $precision, worker process"
    run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario SingleStream "${common[@]}" \
        --test-query-count "$SS_QUERIES" --output "$WORK/singlestream-$precision"
    say "SingleStream, $precision, --in-process-worker"
    run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario SingleStream "${base[@]}" \
        --in-process-worker --test-query-count "$SS_QUERIES" --output "$WORK/singlestream-inprocess-$precision"
    if [[ "$DEVICE" == cpu ]]; then
        say "Offline and SingleStream with graphs=1, $precision: skipped (CUDA graphs need a GPU; the torch backend refuses graphs=1 on cpu)"
    else
        say "Offline, $precision, graphs=1"
        run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario Offline "${common[@]}" --option graphs=1 \
            --test-query-count "$OFFLINE_SAMPLES" --output "$WORK/offline-graphs-$precision"
        say "SingleStream, $precision, worker process, graphs=1"
        run timeout "$RUN_TIMEOUT" "$PYTHON" -m distbert run --scenario SingleStream "${common[@]}" --option graphs=1 \
            --test-query-count "$SS_QUERIES" --output "$WORK/singlestream-graphs-$precision"
    fi
done

say "results ($WORK)"
run "$PYTHON" "$REPO/bench/gpu_summary.py" "$WORK"

read -r -a precision_list <<< "$PRECISIONS"
profile=("$REPO/bench/gpu_profile.py" --model "$MODEL" --device "$DEVICE" --precision "${precision_list[0]}"
         --seq "$PROFILE_SEQ" --out "$WORK/profile")
for b in $PROFILE_BATCHES; do profile+=(--batch "$b"); done
say "torch profiler: the backend alone, ${precision_list[0]}, batches $PROFILE_BATCHES at seq $PROFILE_SEQ"
run timeout "$RUN_TIMEOUT" "$PYTHON" "${profile[@]}" --tag eager
if [[ "$DEVICE" == cpu ]]; then
    say "torch profiler with graphs=1: skipped (CUDA graphs need a GPU)"
else
    run timeout "$RUN_TIMEOUT" "$PYTHON" "${profile[@]}" --tag graphs --option graphs=1
fi
run ls "$WORK/profile"
