#!/usr/bin/env bash
# A rule-abiding submission dry run of the whole pipeline, without a model (23 minutes when measured on 2 vCPUs).
#
# Two `distbert run --mode submission --execution-mode valid` runs (Offline and SingleStream, each
# 600 s performance + accuracy + 600 s TEST01, the MLPerf rules from LoadGen's mlperf.conf) with the
# oracle backend slowed to a fixed latency (oracle_latency), then `distbert submission build` and its
# checks. The oracle's answers come from the gold spans, so its F1 means nothing, and the builder needs
# --allow-invalid. Every other rule applies: 600 s, seeds, sample counts, truncation, TEST01.
# Usage: bench/submission_dryrun.sh [OUT_DIR]   (default results/submission-dryrun)
set -euo pipefail
cd "$(dirname "$0")/.."
# the team's copy of the SQuAD dev set and vocab, when this checkout sits beside one (or holds shared/)
if [ -z "${DISTBERT_DATA_DIR:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -d "$d" ]; then DISTBERT_DATA_DIR="$(cd "$d" && pwd)"; export DISTBERT_DATA_DIR; break; fi
  done
fi
out=${1:-results/submission-dryrun}
bin=.venv/bin/distbert
mkdir -p "$out"
# Offline: 128-sample batches at 50 ms = 2,560 samples/s at most; target 2,400 -> 1.58 M samples, ~635 s
$bin run --backend oracle --workers 1 --scenario Offline --mode submission --execution-mode valid \
    --target-qps 2400 --max-batch 128 --option oracle_latency=0.05 --output "$out/runs/Offline" &
offline=$!
# SingleStream: ~4.5 ms per query, 600 s
$bin run --backend oracle --workers 1 --scenario SingleStream --mode submission --execution-mode valid \
    --target-latency-ms 5 --option oracle_latency=0.004 --output "$out/runs/SingleStream" &
single=$!
wait $offline
wait $single
cat > "$out/system.json" <<'JSON'
{"host_memory_configuration": "N/A (dry run)", "host_storage_type": "N/A (dry run)", "cooling": "N/A (dry run)"}
JSON
set +e
$bin submission build "$out/runs/Offline" "$out/runs/SingleStream" --out "$out/tree" --submitter distbert \
    --system dryrun --system-json "$out/system.json" --allow-invalid
echo "submission build exit status $?"
