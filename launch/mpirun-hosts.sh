#!/usr/bin/env bash
# distbert on a plain cluster from a hostfile (the venv's MPICH mpiexec, which reaches hosts by ssh).
#
#   launch/mpirun-hosts.sh hosts.txt --backend onnxruntime --scenario Offline --mode both
#
# hosts.txt: one "host[:workers]" per line (workers: worker processes on that host, default 1;
# blank lines and # comments are ignored). Rank 0, the coordinator, runs on the first host in
# addition to its workers. Every argument after the hostfile goes to `distbert run`.
# Needs: this checkout with its .venv (launch/setup.sh) at the same path on every host, password-less
# ssh between them, DISTBERT_CACHE on a shared filesystem (the feature cache is built once).
# DISTBERT_VENV names another venv with distbert installed (default: the checkout's .venv), at the same
# path on every host too.
# DISTBERT_MPIEXEC_ARGS adds mpiexec flags (e.g. "-launcher fork" to try it on one machine).
set -euo pipefail
if [ "$#" -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: launch/mpirun-hosts.sh HOSTFILE [distbert run arguments]" >&2
  exit 2
fi
hostfile=$1
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DISTBERT_VENV:-$repo/.venv}"
[ -x "$venv/bin/distbert" ] && [ -x "$venv/bin/mpiexec" ] || {
  echo "distbert: error: no $venv/bin/distbert or mpiexec: run launch/setup.sh (or set DISTBERT_VENV to a venv with distbert[mpich])" >&2
  exit 2
}
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
workers=0
first=""
while IFS= read -r line || [ -n "$line" ]; do
  line="${line%%#*}"
  line="$(echo "$line" | tr -d '[:space:]')"
  [ -z "$line" ] && continue
  host="${line%%:*}"
  slots=1
  [ "$line" != "$host" ] && slots="${line#*:}"
  case "$slots" in ''|*[!0-9]*) echo "distbert: error: $hostfile: bad worker count in '$line' (want host:N)" >&2; exit 2 ;; esac
  if [ -z "$first" ]; then first="$host"; echo "$host:1" >> "$tmp"; fi   # rank 0
  echo "$host:$slots" >> "$tmp"
  workers=$((workers + slots))
done < "$hostfile"
[ "$workers" -gt 0 ] || { echo "distbert: error: $hostfile names no host" >&2; exit 2; }
export PATH="$venv/bin:$PATH"
echo "[distbert] rank 0 on $first, $workers workers from $hostfile"
# shellcheck disable=SC2086  # DISTBERT_MPIEXEC_ARGS is a list of flags
exec "$venv/bin/mpiexec" ${DISTBERT_MPIEXEC_ARGS:-} -f "$tmp" -n "$((workers + 1))" \
  "$venv/bin/distbert" run "$@"
