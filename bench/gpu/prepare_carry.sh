#!/usr/bin/env bash
# Run HERE (the machine without a GPU), before the first device call: what the device commands need
# that the GPU machine lacks, into the two folders the device tool's `carry` names.
#   .whl/   pyzmq and mlcommons-loadgen wheels for the GPU machine's Python 3.12 (its image has neither;
#           the device README's `pip download` recipe);
#   .data/  dev-v1.1.json and vocab.txt, copied flat from DISTBERT_DATA_DIR (or ../shared/data);
# both ignored by git through .git/info/exclude (added here if missing). Then a dry run of cmd1.
#
#   bash bench/gpu/prepare_carry.sh [--no-dry-run]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
WHEELS=("pyzmq==27.3.0" "mlcommons-loadgen==6.0.17")   # the versions the project pins / was tested with

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for p in /.whl/ /.data/; do
    grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
done

mkdir -p .whl
for w in "${WHEELS[@]}"; do
    name="${w%%==*}"
    if compgen -G ".whl/${name//-/_}-${w##*==}-cp312-*.whl" >/dev/null; then continue; fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done

data="${DISTBERT_DATA_DIR:-../shared/data}"
mkdir -p .data
for f in squad/dev-v1.1.json bert/vocab.txt; do
    [[ -f "$data/$f" ]] || { echo "prepare_carry: $data/$f is missing: set DISTBERT_DATA_DIR to the folder holding squad/ and bert/"; exit 2; }
    cp -f "$data/$f" .data/
done
ls -la .whl .data
git status --short --ignored .whl .data | head -3   # '!!': ignored, so they travel only when carried

if [[ "${1:-}" != --no-dry-run ]]; then
    bash bench/gpu/cmd1_shapes.sh --dry-run | tail -20
fi
