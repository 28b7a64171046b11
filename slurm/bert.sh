#!/bin/bash
# distbert on a Slurm cluster: one task per GPU, rank 0 also drives LoadGen.
#
#   sbatch slurm/bert.sh                       # defaults below: 2 nodes x 8 GPUs, Offline, both modes
#   sbatch --nodes=4 slurm/bert.sh --scenario Offline --target-qps 290000
#
# Every extra argument goes to `distbert run`. Rank 0 (coordinator) also hosts a worker
# (--coordinator-hosts-worker), so all 8 GPUs of its node are used. Needs the project venv on a
# shared filesystem (launch/setup.sh), and an MPI that srun can start (the MPICH wheel: --mpi=pmi2).
#SBATCH --job-name=distbert-bert
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=01:00:00
#SBATCH --output=distbert-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PATH="$PWD/.venv/bin:$PATH"
export DISTBERT_CACHE="${DISTBERT_CACHE:-$PWD/.cache/distbert}"   # shared: the feature cache is built once
OUT="results/slurm-${SLURM_JOB_ID:-manual}"
echo "[distbert] $(date -Is) job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-?} nodes, ${SLURM_NTASKS:-?} tasks -> $OUT"
srun --mpi="${DISTBERT_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 \
  distbert run --coordinator-hosts-worker --backend torch --device cuda --precision fp16 \
  --mode both --output "$OUT" "$@"
