#!/usr/bin/env bash
# Device command 2 of 3 (issue 19): the GPU check, fp16, the real distbert path (rank 0 + a worker
# process), with the bare PyTorch loop's best batch throughput measured in the same command. At most
# 8 minutes (LIMIT_S=450; the session's lease decides: see notes/gpu.md "Device plan").
#
#   1. bench/gpu_bare.py: BERT-Large in a bare loop, batches 64/128/256 at length 192 (the issue's
#      "bare best"), batch 1 eager and as a CUDA graph;
#   2. Offline over the dev set, SingleStream, Server --find-peak (3 s probes), each eager and with
#      --option graphs=1 (CUDA graphs per ladder shape), in the order below.
# The ladder is the backend's GPU policy (LADDER_STEP=N forces --shape-ladder N).
#
#   bash bench/gpu/cmd2_check.sh                  # on the GPU machine: results in $OUT
#   bash bench/gpu/cmd2_check.sh --dry-run        # on a CPU: tiny model, graphs=1 dropped, same JSON
# Files: $OUT/cmd2_check.json, cmd2_check.log, cmd2_check_runs.tgz, gpu_check.json (the headline).
CMD=cmd2_check
LIMIT_S="${LIMIT_S:-450}"
# shellcheck source=bench/gpu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

setup
if [[ "$DRYRUN" == 1 ]]; then
    BARE=(--device cpu --dtype fp32 --shape tiny --iters 10 --batch 8 --batch 16)
    SERVER_GRAPHS_QPS="$SERVER_QPS"
else
    BARE=(--device cuda --dtype "$PRECISION" --shape large --iters 100 --batch 64 --batch 128 --batch 256)
    SERVER_GRAPHS_QPS="${SERVER_GRAPHS_QPS:-3600}"
fi
# cmd1's results on this warm machine pick the sdpa kernel and, if its warm-up ran long, a coarser
# ladder (bench/gpu_report.py choose; AUTO_CHOOSE=0: the backend's defaults). No cmd1 here: no choice.
CHOSEN=()
if [[ "${AUTO_CHOOSE:-1}" == 1 ]]; then
    keep=()
    if ((${#LADDER[@]})); then keep=(--keep-ladder); fi
    mapfile -t CHOSEN < <("$PYTHON" bench/gpu_report.py choose --cmd1-glob "$GPU_CACHE/work-cmd1_shapes-*" \
        --precision "$PRECISION" "${keep[@]}" --json "$WORK/choices.json")
    if ((${#CHOSEN[@]})); then say "chosen from cmd1: ${CHOSEN[*]}"; else say "chosen from cmd1: nothing"; fi
fi
BASE=("${LADDER[@]}" "${CHOSEN[@]}")
step bare 60 "$PYTHON" bench/gpu_bare.py "${BARE[@]}" --seq 192 --json "$WORK/bare-$PRECISION.bench.json"

# Most decisive first (the guard skips what no longer fits): Offline eager; SingleStream with graphs
# (the only way to ~2 ms: the bare loop's eager batch 1 took 14.7 ms); Server eager; then the rest.
# SingleStream runs one row a query: --max-batch 1 keeps its ladder, and so its warm-up, to one-row shapes.
# --workers 1: a worker process (the issue's path), not the in-process default of SingleStream on a GPU.
offline() { distbert_run "offline-$1-$PRECISION" 90 --scenario Offline --workers 1 "${@:2}" \
    --test-query-count "$OFFLINE_SAMPLES"; }
singlestream() { distbert_run "singlestream-$1-$PRECISION" 60 --scenario SingleStream --workers 1 --max-batch 1 \
    "${@:3}" --test-query-count "$2"; }
server() { distbert_run "server-$1-$PRECISION" 100 --scenario Server --workers 1 "${@:3}" "${FIND_PEAK[@]}" \
    --target-qps "$2" --test-query-count "$SERVER_QUERIES"; }

offline eager "${BASE[@]}"
singlestream graphs "$SS_QUERIES" "${BASE[@]}" "${GRAPHS[@]}"
server eager "$SERVER_QPS" "${BASE[@]}"
offline graphs "${BASE[@]}" "${GRAPHS[@]}"
server graphs "$SERVER_GRAPHS_QPS" "${BASE[@]}" "${GRAPHS[@]}"
singlestream eager "$((SS_QUERIES / 2))" "${BASE[@]}"   # ~15 ms a query eager on the last check
finish
