#!/usr/bin/env bash
# Create (or update) the project virtual environment in .venv with everything the harness and its
# tests need: distbert itself, LoadGen, MPICH + mpi4py, ZeroMQ, ONNX Runtime, PyTorch (CPU build,
# pinned so pip never pulls a multi-GB CUDA build) and OpenVINO.
# Usage: launch/setup.sh [extra pip args]      (DISTBERT_EXTRAS overrides the extras list)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${DISTBERT_EXTRAS:-test,cpu,torch,openvino}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.distbert-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
echo "[setup] installing distbert[$EXTRAS] into .venv (first time: a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]" "$@"
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import mlperf_loadgen, zmq, mpi4py; print("loadgen, zmq", zmq.zmq_version(), "mpi4py", mpi4py.__version__)')"
