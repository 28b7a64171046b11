"""Under an MPI launcher, rank 0 tells every other rank where to connect (or that it failed first)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def bcast_json(comm: Any, payload: dict[str, Any] | None) -> dict[str, Any]:
    """Broadcast a small JSON object from rank 0 with buffer calls (nothing pickled).

    Rank 0 passes ``payload``; every other rank passes None and receives it. Every rank must call
    this exactly as often as rank 0 does, so rank 0 broadcasts ``{"error": ...}`` even when it fails
    before it has an address: a worker blocked here would otherwise wait forever.
    """
    data = json.dumps(payload).encode() if comm.Get_rank() == 0 else b""
    size = np.array([len(data)], dtype=np.int64)
    comm.Bcast(size, root=0)
    buf = bytearray(data) if comm.Get_rank() == 0 else bytearray(int(size[0]))
    comm.Bcast(buf, root=0)
    return json.loads(bytes(buf))
