#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # the venv's mpiexec and python first
exec .venv/bin/python -m pytest -q -ra "$@"
