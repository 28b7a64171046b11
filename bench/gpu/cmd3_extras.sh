#!/usr/bin/env bash
# Device command 3 of 3 (issue 19): what time allows after cmd1 and cmd2. At most 8 minutes
# (LIMIT_S=450; shrink it to the lease that is left: LIMIT_S=200 bash bench/gpu/cmd3_extras.sh).
#
#   1. the GPU-only tests (CUDA graphs against eager, batches prepared on another thread: they skip
#      on a CPU), so the graphs=1 figures of cmd2 are known to compute the same logits;
#   2. two workers sharing the one GPU, Offline fp16 (`--workers 2`: both bind cuda:0): runs
#      correctly, and LoadGen's samples/s is their sum (run.json has each worker's share);
#   3. SingleStream fp16 with graphs=1 in process (`--in-process-worker`, the SingleStream default on
#      a GPU), beside cmd2's worker-process figure, and bench/ss_bare.py on a second thread (issue 11);
#   4. Offline with the worker's prepare stage off (DISTBERT_WORKER_PIPELINE=0), the A/B of issue 13;
#   5. the torch profiler on the backend alone (bench/gpu_profile.py), padded masks: eager with each
#      shape's first use inside the capture, eager warm, and graphs=1;
#   6. bf16: Offline eager and SingleStream graphs=1.
#
#   bash bench/gpu/cmd3_extras.sh                 # on the GPU machine: results in $OUT
#   bash bench/gpu/cmd3_extras.sh --dry-run       # on a CPU: tiny model, graphs=1 dropped, same JSON
# Files: $OUT/cmd3_extras.json, cmd3_extras.log, cmd3_extras_runs.tgz (the profiler tables), gpu_check.json.
CMD=cmd3_extras
LIMIT_S="${LIMIT_S:-450}"
# shellcheck source=bench/gpu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

setup
fp16="$PRECISION"
if [[ "$DRYRUN" == 1 ]]; then
    other=bf16 PROFILE_BATCHES=(--batch 1 --batch 8)
else
    other=bf16 PROFILE_BATCHES=(--batch 1 --batch 64 --batch 256)
fi

step gpu-tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_torch_graphs.py \
    tests/test_worker_pipeline.py -k "on_gpu or cuda"
distbert_run "offline-2workers-$fp16" 120 --scenario Offline --workers 2 "${LADDER[@]}" \
    --test-query-count "$OFFLINE_SAMPLES"
distbert_run "singlestream-inprocess-graphs-$fp16" 60 --scenario SingleStream --in-process-worker --max-batch 1 \
    "${LADDER[@]}" "${GRAPHS[@]}" --test-query-count "$SS_QUERIES"

step ss-bare-thread 45 "$PYTHON" bench/ss_bare.py --backend torch --model "$MODEL" --device "$DEVICE" \
    --precision "$fp16" "${LADDER[@]}" "${DATA_ARGS[@]}" --queries "$((SS_QUERIES / 2))" --warmup 0 --thread \
    --json "$WORK/ss-bare-thread-$fp16.bench.json"
DISTBERT_WORKER_PIPELINE=0 distbert_run "offline-nopipeline-$fp16" 90 --scenario Offline --workers 1 \
    "${LADDER[@]}" --test-query-count "$OFFLINE_SAMPLES"

profile() {   # profile TAG CAP ARGS...: key-averages tables into WORK/profile
    step "profile-$1" "$2" "$PYTHON" bench/gpu_profile.py --model "$MODEL" --device "$DEVICE" --precision "$fp16" \
        --seq 192 --mask padded "${PROFILE_BATCHES[@]}" --iters 5 --tag "$1" --out "$WORK/profile" "${@:3}"
}
profile eager-first-use 60 --prewarm 0
profile eager-warm 60 --prewarm 3
if [[ "$DRYRUN" != 1 ]]; then profile graphs 60 --prewarm 1 "${GRAPHS[@]}"; fi

PRECISION="$other" distbert_run "offline-eager-$other" 90 --scenario Offline --workers 1 "${LADDER[@]}" \
    --test-query-count "$OFFLINE_SAMPLES"
PRECISION="$other" distbert_run "singlestream-graphs-$other" 60 --scenario SingleStream --workers 1 --max-batch 1 \
    "${LADDER[@]}" "${GRAPHS[@]}" --test-query-count "$SS_QUERIES"
finish
