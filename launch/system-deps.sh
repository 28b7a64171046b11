#!/usr/bin/env bash
# Debian packages for the launcher tests (root): a one-node Slurm cluster (slurmctld, slurmd, the
# clients, munge) and iproute2 for network namespaces. Idempotent; the tests start and stop their own
# daemons with private configs, nothing here is started or configured.
set -euo pipefail
need=()
for cmd in slurmctld slurmd sbatch srun sinfo scontrol scancel munged ip; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "[system-deps] slurm, munge and iproute2 present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[system-deps] missing ${need[*]}; run as root (apt-get) or skip the launcher tests" >&2
  exit 1
fi
echo "[system-deps] installing slurmctld slurmd slurm-client munge iproute2 (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 >/dev/null
echo "[system-deps] done: slurm $(dpkg-query -W -f='${Version}' slurmd)"
