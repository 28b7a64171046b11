"""Transports: how rank 0 and its workers exchange :mod:`distbert.wire.messages` (contract: :mod:`.base`).

=========  =====================================  =====================================
kind       coordinator side                       worker side
=========  =====================================  =====================================
zmq        ``ZmqCoordinatorTransport.bind(a, k)``  ``ZmqWorkerTransport.connect(ep, rank)``
mpi        ``MpiCoordinatorTransport(comm, k)``    ``MpiWorkerTransport(comm, k)``
inproc     ``InprocHub(k).coordinator``            ``hub.connect(rank)``
=========  =====================================  =====================================

Names are imported lazily: importing this package must not import ``mpi4py.MPI`` (that
initializes MPI) or ``zmq`` for a run that uses neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from distbert.wire._common import RankZeroGone, TransportClosed
from distbert.wire.base import CoordinatorTransport, Endpoint, WorkerTransport

_LAZY = {
    "ZmqCoordinatorTransport": "zmq",
    "ZmqWorkerTransport": "zmq",
    "MpiCoordinatorTransport": "mpi",
    "MpiWorkerTransport": "mpi",
    "InprocHub": "inproc",
    "InprocCoordinatorTransport": "inproc",
    "InprocWorkerTransport": "inproc",
}

__all__ = ["CoordinatorTransport", "WorkerTransport", "Endpoint", "RankZeroGone", "TransportClosed", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
