# shellcheck shell=bash disable=SC2034  # SC2034: the variables set here are the commands' (cmd*.sh)
# What every device command (bench/gpu/cmd*.sh) shares: sourced, never run. See docs/gpu.md.
#
# Before sourcing, a command sets CMD (its name) and LIMIT_S (its own time limit, seconds; the
# environment's LIMIT_S wins, so a session with less device time left can shrink a command). Then:
#   - on the GPU machine, the wheels carried in .whl/ (pyzmq, mlcommons-loadgen for Python 3.12) are
#     installed into /tmp/site, the line of the device README; the SQuAD files carried flat in .data/
#     are laid out where distbert looks for them;
#   - DISTBERT_GPU_DRYRUN=1 (or --dry-run) runs the same steps on this CPU: a tiny random model,
#     fp32, few samples, graphs=1 dropped (the torch backend refuses it on a CPU), JSON of the same shape;
#   - `step NAME CAP CMD...` runs one step under `timeout`, never past the command's deadline (a
#     step that cannot get MIN_STEP_S is skipped), appends its status to WORK/steps.jsonl and
#     rewrites RES/CMD.json (bench/gpu_report.py collect), so a command cut short keeps what it measured;
#   - `finish` packs WORK's small files into RES/CMD_runs.tgz and writes RES/gpu_check.json.
# RES is $OUT on the device machine (at most 8 files come back: CMD.json, CMD.log, CMD_runs.tgz,
# gpu_check.json); WORK (run directories, bench JSON) and GPU_CACHE (the model, the feature cache)
# stay on the machine, so a second command on a warm machine reuses the model and the features.

set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 2
T0=$SECONDS
for arg in "$@"; do
    [[ "$arg" == --dry-run ]] && DISTBERT_GPU_DRYRUN=1
done
DRYRUN="${DISTBERT_GPU_DRYRUN:-0}"
LIMIT_S="${LIMIT_S:?a command sets LIMIT_S before sourcing lib.sh}"
RESERVE_S="${RESERVE_S:-8}"      # kept for the last collect, the tarball and the summary
MIN_STEP_S="${MIN_STEP_S:-10}"   # a step with less time than this left is skipped
DEADLINE=$((T0 + LIMIT_S - RESERVE_S))

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
# the device README's wheel line (pyzmq and mlcommons-loadgen are not in the machine's image)
if [[ "$DRYRUN" != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    if ! PYTHONPATH=/tmp/site "$PYTHON" -c "import zmq, mlperf_loadgen" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing the carried wheels failed"; exit 3; }
    fi
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DISTBERT_NO_PROGRESS=1
export PYTHON

GPU_CACHE="${GPU_CACHE:-/tmp/distbert-gpu}"
export DISTBERT_CACHE="${DISTBERT_CACHE:-$GPU_CACHE/cache}"
if [[ -z "${DATASET:-}" && -z "${DISTBERT_DATA_DIR:-}" ]]; then
    if [[ -f .data/dev-v1.1.json && -f .data/vocab.txt ]]; then
        DATASET="$REPO/.data/dev-v1.1.json" VOCAB="$REPO/.data/vocab.txt"
    else
        for d in ../shared/data shared/data; do
            if [[ -d "$d" ]]; then DISTBERT_DATA_DIR="$(cd "$d" && pwd)"; export DISTBERT_DATA_DIR; break; fi
        done
    fi
fi
DATA_ARGS=()
if [[ -n "${DATASET:-}" ]]; then DATA_ARGS+=(--dataset "$DATASET"); fi
if [[ -n "${VOCAB:-}" ]]; then DATA_ARGS+=(--vocab "$VOCAB"); fi

if [[ "$DRYRUN" == 1 ]]; then
    DEVICE=cpu SHAPE=tiny PRECISION="${PRECISION:-fp32}" GRAPHS=()
    OFFLINE_SAMPLES="${OFFLINE_SAMPLES:-96}" SS_QUERIES="${SS_QUERIES:-40}" SHAPES_SAMPLES="${SHAPES_SAMPLES:-96}"
    # no --find-peak: LoadGen's Server early stopping needs ~500+ queries per probe (400 fail, 700
    # pass, measured here), too slow on a CPU; one Server test at a QPS the tiny model holds instead
    SERVER_QPS="${SERVER_QPS:-100}" SERVER_QUERIES="${SERVER_QUERIES:-700}" FIND_PEAK=()
    # the CPU policy is exact trimming: force the GPU policy's step
    LADDER=(--shape-ladder "${LADDER_STEP:-$("$PYTHON" -c 'from distbert.backends.shapes import DEFAULT_STEP as s; print(s)')}")
else
    DEVICE="${DEVICE:-cuda}" SHAPE="${SHAPE:-large}" PRECISION="${PRECISION:-fp16}" GRAPHS=(--option graphs=1)
    OFFLINE_SAMPLES="${OFFLINE_SAMPLES:-10833}" SS_QUERIES="${SS_QUERIES:-2000}" SHAPES_SAMPLES="${SHAPES_SAMPLES:-}"
    # 3 s probes from 3000 QPS: every probe above ~230 QPS has the 700 queries early stopping needs
    SERVER_QPS="${SERVER_QPS:-3000}" SERVER_QUERIES="${SERVER_QUERIES:-12000}"
    FIND_PEAK=(--find-peak --find-peak-probe-s "${PROBE_S:-3}")
    LADDER=()                                      # the backend's own policy (a ladder on a GPU)
    if [[ -n "${LADDER_STEP:-}" ]]; then LADDER=(--shape-ladder "$LADDER_STEP"); fi
fi
MODEL="${MODEL:-$GPU_CACHE/model-$SHAPE-torch}"
STAMP="$(date +%Y%m%d-%H%M%S)"
WORK="$GPU_CACHE/work-$CMD-$STAMP"                 # a rerun on a warm machine starts clean
RES="${OUT:-$REPO/results/gpu-$CMD-$STAMP}"
mkdir -p "$WORK" "$RES"
exec > >(tee -a "$RES/$CMD.log") 2>&1

say() { printf '\n== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }

collect() {
    local dry=()
    if [[ "$DRYRUN" == 1 ]]; then dry=(--dry-run); fi
    "$PYTHON" bench/gpu_report.py collect --cmd "$CMD" --work "$WORK" --out "$RES/$CMD.json" \
        --limit-s "$LIMIT_S" "${dry[@]}" || echo "collect failed (exit $?)"
}

# step NAME CAP CMD...: run CMD under timeout min(CAP, time to the deadline); record; collect.
step() {
    local name=$1 cap=$2 left status rc start
    shift 2
    left=$((DEADLINE - SECONDS))
    start=$((SECONDS - T0))
    if ((left < MIN_STEP_S)); then
        say "$name: skipped, ${left}s left before the deadline (${cap}s wanted)"
        printf '{"step":"%s","status":"skipped","rc":null,"wall_s":0,"limit_s":0,"end_s":%d}\n' \
            "$name" "$start" >>"$WORK/steps.jsonl"
        return 0
    fi
    if ((cap > left)); then cap=$left; fi
    say "$name (at most ${cap}s)"
    printf '+ %s\n' "$*"
    timeout -k 5 "$cap" "$@"
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '{"step":"%s","status":"%s","rc":%d,"wall_s":%d,"limit_s":%d,"end_s":%d}\n' \
        "$name" "$status" "$rc" "$((SECONDS - T0 - start))" "$cap" "$((SECONDS - T0))" >>"$WORK/steps.jsonl"
    echo "-- $name: $status (exit $rc) after $((SECONDS - T0 - start))s"
    collect
    return 0
}

# the environment and the model: the first steps of every command
setup() {
    say "$CMD: device $DEVICE, $SHAPE, $PRECISION, limit ${LIMIT_S}s, dry run $DRYRUN, results in $RES"
    step env 30 "$PYTHON" - "$DEVICE" "$WORK/env.json" <<'EOF'
import json, os, platform, subprocess, sys, torch, transformers
device, out = sys.argv[1], sys.argv[2]
gpu = "cpu (dry run)"
if device != "cpu":
    assert torch.cuda.is_available(), "torch sees no CUDA GPU"
    p = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    gpu = f"{p.name} ({smi or 'nvidia-smi silent'}; {p.multi_processor_count} SMs; kernel {platform.release()})"
# the device machine gets the working tree without .git: the calling session passes DISTBERT_COMMIT
commit = os.environ.get("DISTBERT_COMMIT") or subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
env = {"gpu": gpu, "software": f"python {platform.python_version()}, torch {torch.__version__} "
       f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}, distbert {commit or 'unknown commit'}"}
json.dump(env, open(out, "w"))
print(env)
EOF
    if [[ ! -f "$MODEL/model.pytorch" ]]; then
        step model 120 "$PYTHON" -m distbert model make --shape "$SHAPE" --format torch --seed 0 --out "$MODEL"
    fi
    step features 120 "$PYTHON" bench/gpu_report.py prep --shape "$SHAPE" "${DATA_ARGS[@]}" --json "$WORK/dataset.json"
}

# distbert_run NAME CAP ARGS...: one `distbert run` of the torch backend into WORK/NAME
distbert_run() {
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" "$PYTHON" -m distbert run --backend torch --model "$MODEL" --device "$DEVICE" \
        --precision "$PRECISION" --mode performance --execution-mode test --heartbeat-timeout 120 \
        "${DATA_ARGS[@]}" --output "$WORK/$name" "$@"
}

finish() {
    say "$CMD: done in $((SECONDS - T0))s"
    collect
    (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.log' \) \
        -size -4M -print0 | tar czf "$RES/${CMD}_runs.tgz" --null -T -) || echo "tarball failed"
    "$PYTHON" bench/gpu_report.py summary "$RES/$CMD.json" --precision "$PRECISION" --out "$RES/gpu_check.json" \
        || echo "summary failed (exit $?)"
    ls -la "$RES"
}
