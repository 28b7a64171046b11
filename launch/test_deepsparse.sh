#!/usr/bin/env bash
# The DeepSparse backend's tests, in their own virtual environment (.venv-deepsparse).
# deepsparse 1.8.0 (deprecated upstream; a cp311 wheel) pins numpy<2, which the main .venv
# cannot have, so it never goes there. Created on first use (about 2 minutes, ~530 MB); distbert is
# imported from this checkout. onnxruntime is pinned to 1.16.3: newer ones need numpy 2 for
# quantization (the tests build an int8 model) and are not needed by deepsparse. tokenizers lets
# bench/backend_bench.py run from this venv too (--configs ref,ort,deepsparse).
# Usage: launch/test_deepsparse.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-deepsparse
pkgs=("deepsparse==1.8.0" "numpy<2" "onnxruntime==1.16.3" "onnx" "pytest" "pytest-timeout" "tokenizers")
if [ ! -x "$venv/bin/python" ]; then
  echo "[deepsparse] creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "${pkgs[*]}" ]; then
  echo "[deepsparse] installing ${pkgs[*]}"
  "$venv/bin/python" -m pip install --quiet "${pkgs[@]}"
  echo "${pkgs[*]}" > "$venv/.installed"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -rs \
    tests/test_backends.py -k deepsparse "$@"
