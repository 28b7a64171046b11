#!/usr/bin/env bash
# Debian packages for the launcher tests (root): a one-node Slurm cluster (slurmctld, slurmd, the
# clients, munge), iproute2 for network namespaces and nftables for the chaos test's loss bursts.
# Idempotent; the tests start and stop their own daemons with private configs, nothing here is
# started or configured.
set -euo pipefail
need=()
for cmd in slurmctld slurmd sbatch srun sinfo scontrol scancel munged ip nft; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "[system-deps] slurm, munge, iproute2 and nftables present"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[system-deps] missing ${need[*]}; run as root (apt-get) or skip the launcher tests" >&2
  exit 1
fi
echo "[system-deps] installing slurmctld slurmd slurm-client munge iproute2 nftables (missing: ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmctld slurmd slurm-client munge iproute2 nftables >/dev/null
echo "[system-deps] done: slurm $(dpkg-query -W -f='${Version}' slurmd)"
