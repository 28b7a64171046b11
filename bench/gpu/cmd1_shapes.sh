#!/usr/bin/env bash
# Device command 1 of 3 (issue 19), the decisive one: does a first use per batch shape eat the GPU's
# time, and do the shape ladder and its warm-up remove it? At most 5 minutes (LIMIT_S=290).
#
#   1. the torch backend alone over the real Offline batches of the dev set (bench/gpu_shapes.py),
#      exact trimming (the old planner, ~43 distinct shapes): pass 1 = first use of every shape,
#      pass 2 = warm, pass 3 = on a new thread (cuBLAS/cuDNN caches are per thread);
#   2. the same over the ladder plan (~20 shapes), first use and warm, for each SDPA kernel (auto,
#      cudnn, efficient, flash, math) and for the old transformers mask (attn_mask=transformers):
#      the A/B that picks the sdpa default;
#   3. one eager `distbert run` Offline over the dev set with the ladder (the backend's GPU policy):
#      its warm-up time and cold_batches in run.json, samples/s;
#   4. SingleStream's floor in a bare loop (bench/ss_bare.py, one-row ladder), cold and warm shapes apart;
#   5. as time allows: sdpa=auto again with TORCH_CUDNN_SDPA_DEPRIORITIZED=1 (torch's cuDNN opt-out).
#
#   bash bench/gpu/cmd1_shapes.sh                 # on the GPU machine: results in $OUT
#   bash bench/gpu/cmd1_shapes.sh --dry-run       # on a CPU: tiny model, few samples, same JSON
# Files: $OUT/cmd1_shapes.json (everything), cmd1_shapes.log, cmd1_shapes_runs.tgz, gpu_check.json.
CMD=cmd1_shapes
LIMIT_S="${LIMIT_S:-290}"
# shellcheck source=bench/gpu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

budget() { local left=$((DEADLINE - SECONDS)); echo $(($1 < left ? $1 : left)); }

setup
SHAPES=(bench/gpu_shapes.py --model "$MODEL" --device "$DEVICE" --precision "$PRECISION" "${DATA_ARGS[@]}")
if [[ -n "$SHAPES_SAMPLES" ]]; then SHAPES+=(--samples "$SHAPES_SAMPLES"); fi

c=$(budget 75)
step shapes-exact "$c" "$PYTHON" "${SHAPES[@]}" --plan exact --thread-pass --deadline-s $((c - 8)) \
    --json "$WORK/shapes-exact-$PRECISION.bench.json"
VARIANTS=()
# flash last of the kernels: it refuses padded batches on CUDA, and a failed variant costs a reload
for v in ${SDPA_VARIANTS:-auto cudnn efficient math flash old-mask:attn_mask=transformers}; do VARIANTS+=(--variant "$v"); done
c=$(budget 100)
step shapes-ladder "$c" "$PYTHON" "${SHAPES[@]}" --plan ladder "${LADDER[@]}" "${VARIANTS[@]}" \
    --deadline-s $((c - 8)) --json "$WORK/shapes-ladder-$PRECISION.bench.json"
distbert_run "offline-ladder-$PRECISION" 120 --scenario Offline --workers 1 "${LADDER[@]}" \
    --test-query-count "$OFFLINE_SAMPLES"
step ss-bare 45 "$PYTHON" bench/ss_bare.py --backend torch --model "$MODEL" --device "$DEVICE" \
    --precision "$PRECISION" "${LADDER[@]}" "${DATA_ARGS[@]}" --queries "$((SS_QUERIES / 2))" --warmup 0 \
    --json "$WORK/ss-bare-$PRECISION.bench.json"
# torch's opt-out of cuDNN attention under auto (PyTorch #171627; read at start: a process of its own)
c=$(budget 45)
TORCH_CUDNN_SDPA_DEPRIORITIZED=1 step shapes-cudnn-deprioritized "$c" "$PYTHON" "${SHAPES[@]}" --plan ladder \
    "${LADDER[@]}" --variant auto --deadline-s $((c - 8)) --json "$WORK/shapes-deprioritized-$PRECISION.bench.json"
finish
