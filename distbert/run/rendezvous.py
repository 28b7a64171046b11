"""Under an MPI launcher, rank 0 tells every other rank where to connect (or that it failed first)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np


class BroadcastTimeout(TimeoutError):
    """A broadcast did not complete within its deadline: a rank on its path is gone (or rank 0 is)."""


def bcast_json(comm: Any, payload: dict[str, Any] | None, poll_s: float | None = None,
               timeout_s: float | None = None) -> dict[str, Any]:
    """Broadcast a small JSON object from rank 0 with buffer calls (nothing pickled).

    Rank 0 passes ``payload``; every other rank passes None and receives it. Every rank must call
    this exactly as often as rank 0 does, so rank 0 broadcasts ``{"error": ...}`` even when it fails
    before it has an address: a worker blocked here would otherwise wait forever.

    ``poll_s``: wait in a non-blocking broadcast, sleeping this long between tests, instead of in
    MPICH's busy-polling ``MPI_Bcast`` (a rank that waits minutes for the next step must not take a
    core). Every rank of one broadcast must pass the same kind: blocking and non-blocking collectives
    do not match.

    ``timeout_s`` (with ``poll_s``): raise :class:`BroadcastTimeout` if the broadcast has not completed
    by then. A rank that died between two broadcasts leaves the ranks below it in the broadcast tree
    (and, under MPI's rules, possibly rank 0) waiting forever otherwise. The request cannot be
    cancelled (MPI has no cancel for collectives): the caller exits.
    """
    data = json.dumps(payload).encode() if comm.Get_rank() == 0 else b""
    size = np.array([len(data)], dtype=np.int64)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    _bcast(comm, size, poll_s, deadline, timeout_s)
    buf = bytearray(data) if comm.Get_rank() == 0 else bytearray(int(size[0]))
    _bcast(comm, buf, poll_s, deadline, timeout_s)
    return json.loads(bytes(buf))


def _bcast(comm: Any, buf: Any, poll_s: float | None, deadline: float | None, timeout_s: float | None) -> None:
    if poll_s is None:
        comm.Bcast(buf, root=0)
        return
    request = comm.Ibcast(buf, root=0)
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise BroadcastTimeout(f"rank {comm.Get_rank()}: a broadcast from rank 0 did not complete within "
                                   f"{timeout_s:g} s")
        time.sleep(poll_s)
