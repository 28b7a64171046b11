"""Which process am I? The one place that reads launcher environment variables.

``detect()`` looks at, in order: MPICH/Hydra (``PMI_RANK``), Open MPI (``OMPI_COMM_WORLD_*``),
Slurm ``srun`` steps (``SLURM_PROCID`` with ``SLURM_STEP_NUM_TASKS``; a bare ``sbatch`` script has no
step, so it counts as no launcher) and torchrun-style ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. A launcher
with one process is treated as no launcher: the single-node fallback spawns local workers.

Device binding is here too: a worker's local index picks its GPU, or its share of this process's
CPU cores (split along socket boundaries when the counts allow).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Topology:
    launcher: str       # "mpi", "slurm", "env" (torchrun-style) or "none"
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    host: str

    @property
    def distributed(self) -> bool:
        return self.launcher != "none" and self.world_size > 1


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value.split("(")[0].split(",")[0])
            except ValueError:
                continue
    return None


def detect(env: Mapping[str, str] | None = None) -> Topology:
    env = os.environ if env is None else env
    host = socket.gethostname()
    found: tuple[str, int | None, int | None, int | None, int | None] | None = None
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        # hydra names the local rank; srun --mpi=pmi2 sets PMI_RANK but leaves it to SLURM_LOCALID
        found = ("mpi", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"),
                 _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"),
                 _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"))
    elif "OMPI_COMM_WORLD_RANK" in env:
        found = ("mpi", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
                 _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"))
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        found = ("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                 _int(env, "SLURM_LOCALID"), _int(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"))
    elif "RANK" in env and "WORLD_SIZE" in env:
        found = ("env", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                 _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE"))
    if found is None:
        return Topology("none", 0, 1, 0, 1, host)
    launcher, rank, size, local_rank, local_size = found
    if not size or size <= 1:
        return Topology("none", 0, 1, 0, 1, host)
    rank = rank or 0
    local_rank = rank if local_rank is None else local_rank
    return Topology(launcher, rank, size, local_rank, local_size or size, host)


# --- devices ---------------------------------------------------------------------------------

def visible_gpus() -> int:
    """GPUs this process may use, without importing a framework when it can be avoided."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    try:
        import torch  # lazy: optional

        return int(torch.cuda.device_count())
    except Exception:  # torch absent or broken: count device nodes
        return len(glob.glob("/dev/nvidia[0-9]*"))


def cpu_sockets(cores: list[int] | None = None) -> dict[int, list[int]]:
    """Map socket id -> allowed cores of this process (all on socket 0 when sysfs is silent)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    sockets: dict[int, list[int]] = {}
    for core in cores:
        path = f"/sys/devices/system/cpu/cpu{core}/topology/physical_package_id"
        try:
            with open(path) as fh:
                sock = int(fh.read().strip())
        except OSError:
            sock = 0
        sockets.setdefault(sock, []).append(core)
    return sockets


def default_local_workers() -> int:
    """Single-node default: one worker per visible GPU, else one per CPU socket."""
    return visible_gpus() or max(1, len(cpu_sockets()))


def core_set(index: int, count: int, cores: list[int] | None = None) -> list[int]:
    """Cores for local worker ``index`` of ``count``: whole sockets when ``count`` divides them,
    else a contiguous even split. With more workers than cores, workers share cores round-robin."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    sockets = cpu_sockets(cores)
    if count <= len(sockets) and len(sockets) % count == 0:
        per = len(sockets) // count
        ids = sorted(sockets)[index * per:(index + 1) * per]
        return sorted(c for s in ids for c in sockets[s])
    if count >= len(cores):
        return [cores[index % len(cores)]]
    lo = index * len(cores) // count
    hi = (index + 1) * len(cores) // count
    return cores[lo:hi]


@dataclasses.dataclass(frozen=True)
class DeviceBinding:
    device: str            # "cpu", "cuda:N" or "rocm:N"
    cores: tuple[int, ...]  # CPU core set (all allowed cores for GPU workers)


def bind_worker(requested: str, local_index: int, local_count: int) -> DeviceBinding:
    """Bind this worker process: pick its GPU or pin it to its core set. Returns what it got.

    ``requested`` is the user's ``--device`` ("cpu", "cuda", "cuda:N", "rocm", "rocm:N"). For
    "cuda"/"rocm" the local index picks the GPU; an explicit ":N" is respected as given.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if requested in ("cuda", "rocm"):
        ngpu = visible_gpus()
        gpu = local_index % ngpu if ngpu else 0
        return DeviceBinding(f"{requested}:{gpu}", tuple(allowed))  # keep the kind: rocm picks ROCm's provider
    if requested.startswith(("cuda:", "rocm:")):
        return DeviceBinding(requested, tuple(allowed))
    cores = core_set(local_index, local_count, allowed)
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        cores = allowed
    return DeviceBinding("cpu", tuple(cores))
