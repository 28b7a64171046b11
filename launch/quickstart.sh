#!/usr/bin/env bash
# Set up .venv (if needed), then a short Offline run (accuracy + performance) on this machine with
# ONNX Runtime: the official model if it is in the cache (`distbert download model`), otherwise a
# generated random-weight model (speed representative, accuracy meaningless: said in the output).
# Extra arguments go to `distbert run`, e.g. launch/quickstart.sh --random-shape large
set -euo pipefail
cd "$(dirname "$0")/.."
# the team's copy of the SQuAD dev set and vocab, when this checkout sits beside one
if [ -z "${DISTBERT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  DISTBERT_DATA_DIR="$(cd ../shared/data && pwd)"
  export DISTBERT_DATA_DIR
fi
launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec distbert run --backend onnxruntime --scenario Offline --mode both \
  --random-shape base --max-examples 128 "$@"
