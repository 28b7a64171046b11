"""``distbert run``: one code path for every launch mode.

* under a launcher (mpirun/mpiexec, srun, torchrun-style env) with N > 1 ranks: rank 0 coordinates
  (:mod:`distbert.run.rank0`), ranks >= 1 are workers; ZeroMQ rendezvous by MPI broadcast, or the
  pure MPI transport;
* no launcher: the single-node fallback; rank 0 spawns ``--workers K`` local worker processes.
"""

from __future__ import annotations

import logging
import socket
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
        from mpi4py import MPI  # only under a launcher: importing it initializes MPI

        comm = MPI.COMM_WORLD
        if comm.Get_size() != topology.world_size:
            raise UserError(f"launcher says {topology.world_size} ranks but MPI has {comm.Get_size()}: "
                            "run distbert with the mpiexec of the MPI that mpi4py uses")
        if topology.rank == 0:
            return coordinator_main(cfg, topology, comm)
        return launched_worker_main(cfg, topology, comm)
    return coordinator_main(cfg, topology, None)


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
    # ranks on this node that are workers: local index among them picks GPU / cores
    local_count = topology.local_size
    local_index = topology.local_rank
    if hello.get("rank0_host") == socket.gethostname() and not cfg.coordinator_hosts_worker:
        # rank 0 shares this node but runs no model: give its share to the workers
        local_count = max(1, local_count - 1)
        local_index = max(0, local_index - 1)
    return worker_run(transport, topology.rank, local_index, local_count)
