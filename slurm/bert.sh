#!/bin/bash
# distbert under Slurm, any cluster shape. The shape comes from the sbatch command line; every
# argument after the script goes to `distbert run`.
#
#   sbatch -N 1 -n 3 slurm/bert.sh --backend onnxruntime --scenario Offline          # one CPU node, 2 workers
#   sbatch -N 2 --ntasks-per-node=8 --gpus-per-node=8 slurm/bert.sh --scenario Offline  # 2 x 8 GPUs
#   sbatch slurm/bert.sh                                                              # 1 task: local workers
#
# Knobs (sbatch options, or environment variables exported to sbatch):
#   -N/--nodes, -n/--ntasks, --ntasks-per-node   ranks: rank 0 coordinates, the others are workers.
#                                 With one task, distbert spawns its own local workers (--workers K).
#   --gpus-per-node / --gres=gpu:N   GPU mode: each worker binds the GPU of its local rank; rank 0 also
#                                 hosts a worker so its node's GPUs are all used. No GPUs: CPU mode.
#   -c/--cpus-per-task            cores per worker (CPU mode: intra-op threads = its cores)
#   DISTBERT_HOME                 the distbert checkout with its .venv (default: the submit directory;
#                                 launch/setup.sh makes the venv; it must be on a shared filesystem)
#   DISTBERT_VENV                 another venv with distbert installed (default: $DISTBERT_HOME/.venv)
#   DISTBERT_RESULTS              where runs go (default: $HOME/distbert-results): the run is
#                                 $DISTBERT_RESULTS/slurm-<job>/, this script's log slurm-<job>.log beside it
#   DISTBERT_CACHE                feature cache, models (default: ~/.cache/distbert; shared: built once)
#   DISTBERT_DEVICE               cuda | cpu (default: cuda when Slurm gave this job GPUs)
#   DISTBERT_RANK0_WORKER         1 | 0 (default: 1 in GPU mode with the ZeroMQ transport)
#   DISTBERT_SRUN_MPI             srun's --mpi (default pmi2: what the venv's MPICH speaks under srun)
#   DISTBERT_KILL_ON_BAD_EXIT     1 (default): any rank's failure ends the step at once (fail fast);
#                                 0: a dead worker leaves the others running and its work is requeued
#
# Nothing is written into the checkout. Slurm's own output file defaults to /tmp on the batch node;
# everything this script prints also goes to $DISTBERT_RESULTS/slurm-<job>.log.
#SBATCH --job-name=distbert-bert
#SBATCH --time=01:00:00
#SBATCH --output=/tmp/distbert-slurm-%j.out
set -euo pipefail

HOME_DIR="${DISTBERT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
VENV="${DISTBERT_VENV:-$HOME_DIR/.venv}"
if [ ! -x "$VENV/bin/distbert" ]; then
  echo "distbert: error: no $VENV/bin/distbert: run launch/setup.sh in the checkout, and submit from there or set DISTBERT_HOME (or DISTBERT_VENV)" >&2
  exit 2
fi
export PATH="$VENV/bin:$PATH"
RESULTS="${DISTBERT_RESULTS:-$HOME/distbert-results}"
mkdir -p "$RESULTS"
JOB="${SLURM_JOB_ID:-manual-$$}"
OUT="$RESULTS/slurm-$JOB"
exec > >(tee -a "$RESULTS/slurm-$JOB.log") 2>&1

gpus="${SLURM_GPUS_ON_NODE:-0}"
case "$gpus" in ''|*[!0-9]*) gpus=0 ;; esac
DEVICE="${DISTBERT_DEVICE:-$([ "$gpus" -gt 0 ] && echo cuda || echo cpu)}"
extra=(--device "$DEVICE" --output "$OUT")
transport=zmq
prev=""
for a in "$@"; do
  [ "$prev" = "--transport" ] && transport="$a"
  case "$a" in --transport=*) transport="${a#--transport=}" ;; esac
  prev="$a"
done
rank0_worker="${DISTBERT_RANK0_WORKER:-$([ "$DEVICE" = cuda ] && [ "$transport" = zmq ] && echo 1 || echo 0)}"
tasks="${SLURM_NTASKS:-1}"
if [ "$rank0_worker" = 1 ] && [ "$tasks" -gt 1 ]; then
  extra+=(--coordinator-hosts-worker)
fi

echo "[distbert] $(date -Is) job $JOB: ${SLURM_NNODES:-1} nodes, $tasks tasks, device $DEVICE, transport $transport -> $OUT"
if [ "$tasks" -gt 1 ]; then
  srun --mpi="${DISTBERT_SRUN_MPI:-pmi2}" --kill-on-bad-exit="${DISTBERT_KILL_ON_BAD_EXIT:-1}" \
    distbert run "${extra[@]}" "$@"
else
  distbert run "${extra[@]}" "$@"
fi
