#!/usr/bin/env bash
# Set up .venv (if needed), then a short Offline run (accuracy + performance) on this machine with
# ONNX Runtime: the official model if it is in the cache (`distbert download model`), otherwise a
# generated random-weight model (speed representative, accuracy meaningless: said in the output).
# Extra arguments go to `distbert run`, e.g. launch/quickstart.sh --random-shape large
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec distbert run --backend onnxruntime --scenario Offline --mode both \
  --random-shape base --max-examples 128 "$@"
