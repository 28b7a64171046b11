"""``distbert run``: one code path for every launch mode.

* under a launcher (mpirun/mpiexec, srun, torchrun-style env) with N > 1 ranks: rank 0 coordinates
  (:mod:`distbert.run.rank0`), ranks >= 1 are workers; ZeroMQ rendezvous by MPI broadcast, or the
  pure MPI transport;
* no launcher: the single-node fallback; rank 0 spawns ``--workers K`` local worker processes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from distbert import topology as topo_mod
from distbert.config import RunConfig
from distbert.errors import UserError
from distbert.run.rank0 import coordinator_main
from distbert.run.rendezvous import bcast_json
from distbert.topology import Topology
from distbert.wire.base import WorkerTransport

log = logging.getLogger(__name__)


def run(cfg: RunConfig, topology: Topology | None = None) -> int:
    topology = topology or topo_mod.detect()
    if topology.distributed:
        import mpi4py

        mpi4py.rc.finalize = False  # finalize_mpi() does it, with a deadline
        from mpi4py import MPI  # only under a launcher: importing it initializes MPI

        code = 1
        try:
            comm = MPI.COMM_WORLD
            if comm.Get_size() != topology.world_size:
                code = 2
                raise UserError(launch_mismatch(topology, comm.Get_size(), MPI.Get_library_version()))
            if topology.rank == 0:
                code = coordinator_main(cfg, topology, comm)
            else:
                code = launched_worker_main(cfg, topology, comm)
            return code
        except UserError as exc:  # said here: MPI_Finalize below may have to be cut short
            print(f"distbert: error: {exc}", file=sys.stderr)
            code = 2
            return code
        except KeyboardInterrupt:
            code = 130
            return code
        except Exception:
            log.exception("rank %d failed", topology.rank)
            return code
        finally:
            finalize_mpi(MPI, code)
    return coordinator_main(cfg, topology, None)


#: How long MPI_Finalize may take before the process exits (status 1) without it.
FINALIZE_S = 5.0


def finalize_mpi(MPI: Any, code: int) -> None:
    """MPI_Finalize, or exit 1 if it has not returned within FINALIZE_S.

    MPI_Finalize waits for every rank. After a worker died (its work requeued, the run complete:
    `srun --kill-on-bad-exit=0`) the survivors would wait in it forever. It is still called: it
    removes MPICH's shared-memory segments, which exiting without it leaves in /dev/shm. The
    deadline is faulthandler's watchdog, a C thread: MPI_Finalize holds the GIL, so no Python timer
    could fire while it waits.
    """
    import faulthandler

    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.devnull, "w") as quiet:
        faulthandler.dump_traceback_later(FINALIZE_S, exit=True, file=quiet)
        try:
            MPI.Finalize()
        finally:
            faulthandler.cancel_dump_traceback_later()


def launch_mismatch(topology: Topology, mpi_size: int, library: str) -> str:
    """The one-line fix when the launcher's rank count and MPI's disagree (each rank then sees
    itself alone, or the wrong world): every rank prints it and exits 2 at once."""
    ours = "Open MPI" if "Open MPI" in library else "MPICH" if "MPICH" in library else library.split()[0]
    head = f"the launcher started {topology.world_size} ranks but MPI sees {mpi_size}"
    if topology.launcher == "slurm":
        return (f"{head}: srun did not start MPI (this cluster's MpiDefault is probably none); run "
                f"`srun --mpi=pmi2 distbert ...` (mpi4py here uses {ours})")
    return (f"{head}: this mpirun/mpiexec belongs to another MPI than mpi4py's ({ours}); run the venv's "
            "`mpiexec` (.venv/bin/mpiexec) or rebuild mpi4py against your MPI")


def launched_worker_main(cfg: RunConfig, topology: Topology, comm: Any) -> int:
    """A rank >= 1 under a launcher: connect as rank 0 says, then serve batches until told to stop."""
    from distbert.engine.worker import worker_run

    hello = bcast_json(comm, None)  # rank 0 says where to connect, or that it failed first
    if "error" in hello:
        log.error("rank 0 failed before the run started (%s); rank %d exits", hello["error"], topology.rank)
        return 2
    transport: WorkerTransport
    if cfg.transport == "mpi":
        from distbert.wire.mpi import MpiWorkerTransport

        transport = MpiWorkerTransport(comm, key=hello["key"])
    else:
        from distbert.wire.base import Endpoint
        from distbert.wire.zmq import ZmqWorkerTransport

        transport = ZmqWorkerTransport.connect(Endpoint(hello["address"], hello["key"]), topology.rank)
    local_index, local_count = worker_slot(topology, hello.get("rank0_host"), cfg.coordinator_hosts_worker)
    return worker_run(transport, topology.rank, local_index, local_count)


def worker_slot(topology: Topology, rank0_host: str | None, rank0_computes: bool) -> tuple[int, int]:
    """(local index, local count) of a launched worker among this node's workers: the index picks
    its GPU or core share. When rank 0 shares the node but runs no model, its share goes to them."""
    if rank0_host == socket.gethostname() and not rank0_computes:
        return max(0, topology.local_rank - 1), max(1, topology.local_size - 1)
    return topology.local_rank, topology.local_size
